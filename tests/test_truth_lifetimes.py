"""Lifetimes, threads and unusual calls (issue 12, classes 5, 7, 9 and 10).

No global strong reference to a model or session; deep copies are plain models; marks go
to the traces of the calling thread; empty batches and other output shapes are measured
(or named in a warning) without switching monitoring off.
"""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import warnings
import weakref

import pytest
import torch
from torch import nn
from truth_support import Wrap, assert_matches, fixed_loss, gradwatch_hooks, reference_stats

import gradwatch

T, B, I, H = 5, 3, 4, 6


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(I, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).sum()


def _steps(model, mon, n=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(n):
        model(torch.randn(T, B, I)).backward()
        mon.step(opt)
        opt.step()
        opt.zero_grad()


# ------------------------------------------------------------------------------ class 7
def test_a_dropped_monitor_lets_its_model_be_collected():
    model = LM()
    mon = gradwatch.Monitor(model, every_n_steps=1)
    _steps(model, mon)
    ref = weakref.ref(model)
    del model, mon
    gc.collect()
    assert ref() is None


def test_a_dropped_monitor_leaves_no_working_hook_on_a_living_model():
    model = LM()
    mon = gradwatch.Monitor(model, every_n_steps=1)
    session = weakref.ref(mon._core.session)
    del mon
    gc.collect()
    assert session() is None  # the model's hooks do not keep the session alive
    model(torch.randn(T, B, I)).backward()  # the leftover hooks are inert, then removed
    assert gradwatch_hooks(model) == 0


def test_a_trace_entered_and_dropped_lets_its_model_be_collected():
    model = LM()
    tr = gradwatch.trace(model).__enter__()
    model(torch.randn(T, B, I)).backward()
    ref = weakref.ref(model)
    del model, tr
    gc.collect()
    assert ref() is None


def test_a_closed_monitor_keeps_its_results_without_pinning_the_model():
    model = LM()
    with gradwatch.Monitor(model, every_n_steps=1) as mon:
        _steps(model, mon)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert list(mon.reports) == [0, 1] and mon.reports[1]["rnn"].total.shape == (1, 1, T)
    assert mon.verdicts.keys() == {"rnn"}


@pytest.mark.parametrize("watch", ["monitor", "trace"])
def test_a_deep_copy_of_a_watched_model_is_a_plain_model(watch):
    torch.manual_seed(0)
    model = LM()
    mon = gradwatch.Monitor(model, every_n_steps=1) if watch == "monitor" else None
    tr = gradwatch.trace(model).__enter__() if watch == "trace" else None
    ema = copy.deepcopy(model)  # EMA / teacher copies
    assert gradwatch_hooks(ema) == 0
    assert gradwatch_hooks(model) > 0
    x = torch.randn(T, B, I)
    for _ in range(3):
        ema(x).backward()
    model(x).backward()
    if mon is not None:
        rep = mon.step()
        mon.close()
    else:
        tr.__exit__(None, None, None)
        rep = tr.report()
    assert list(rep) == ["rnn"]  # the copy's calls are not recorded
    assert gradwatch_hooks(ema) == 0 and gradwatch_hooks(model) == 0
    restored = pickle.loads(pickle.dumps(ema))
    assert gradwatch_hooks(restored) == 0


def test_a_watched_model_can_be_pickled_and_the_copy_is_plain():
    model = LM()
    with gradwatch.Monitor(model, every_n_steps=1) as mon:
        blob = pickle.dumps(model)  # the monitor is not pickled with it
        restored = pickle.loads(blob)
        # a pickle has no end-of-copy moment: the copied hooks are inert and remove
        # themselves at the copy's first forward
        restored(torch.randn(T, B, I)).backward()
        assert gradwatch_hooks(restored) == 0
        model(torch.randn(T, B, I)).backward()
        assert list(mon.step()) == ["rnn"]


# ----------------------------------------------------------------------------- class 10
class Marked(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.eye(3) * 0.5)
        self.name = name

    def forward(self, x):
        h, outs = x, []
        for _ in range(4):
            h = torch.tanh(h @ self.w)
            out, h = gradwatch.mark_state(self.name, h)
            outs.append(out)
        return torch.stack(outs).sum()


def test_mark_state_goes_to_the_traces_of_the_calling_thread():
    ours, theirs = Marked("ours"), Marked("theirs")
    entered, ours_done = threading.Event(), threading.Event()
    errors, reports = [], {}

    def other_thread():
        try:
            with gradwatch.trace(theirs) as tr:  # started after the main thread's trace
                entered.set()
                ours_done.wait(10)
                theirs(torch.randn(2, 3)).backward()
            reports["theirs"] = list(tr.report())
        except Exception as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=other_thread)
    with gradwatch.trace(ours) as tr:
        t.start()
        entered.wait(10)
        ours(torch.randn(2, 3)).backward()
    ours_done.set()
    t.join(10)
    assert not errors, errors
    assert list(tr.report()) == ["ours"]
    assert reports["theirs"] == ["theirs"]


def test_nested_traces_each_receive_the_marks():
    model = Marked("custom")
    with gradwatch.trace(model) as outer, gradwatch.trace(model) as inner:
        model(torch.randn(2, 3)).backward()
    a, b = outer.report()["custom"], inner.report()["custom"]
    assert a.steps == b.steps == 4
    torch.testing.assert_close(a.total, b.total)


# ------------------------------------------------------------------------------ class 5
class Router(nn.Module):
    """Sends each sample to one of two LSTMs; a batch may send none to one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.LSTM(I, H)
        self.b = nn.LSTM(I, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x, route):
        loss = x.new_zeros(())
        for rnn, mask in ((self.a, route), (self.b, ~route)):
            loss = loss + self.head(rnn(x[:, mask])[0]).sum()
        return loss


def test_a_call_with_zero_samples_reports_zero_valid_samples_and_monitoring_goes_on():
    torch.manual_seed(1)
    model = Router()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    routes = [torch.tensor([True, True, True]), torch.tensor([True, False, True])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning, no module switched off
        with gradwatch.Monitor(model, every_n_steps=1) as mon:
            reps = []
            for route in routes:
                model(torch.randn(T, B, I), route).backward()
                reps.append(mon.step(opt))
                opt.step()
                opt.zero_grad()
    empty = reps[0]["b"]
    assert empty.valid_samples.tolist() == [0] * T
    assert float(empty.total.abs().max()) == 0
    assert not reps[0].failures and not reps[1].failures
    assert reps[1]["b"].valid_samples.tolist() == [1] * T
    assert mon._core.disabled == {}


def test_a_traced_call_with_zero_samples():
    model = Wrap(nn.GRU(I, H))
    with gradwatch.trace(model) as tr:
        out, h_n = model(torch.randn(T, 0, I))
        (out.sum() + h_n.sum()).backward()
    m = tr.report()["rnn"]
    assert m.valid_samples.tolist() == [0] * T and m.total.shape == (1, 1, T)


# ------------------------------------------------------------------------------ class 9
class OutputOnly(nn.LSTM):
    """The ``nn.Sequential`` idiom: return only the output sequence."""

    def forward(self, x, hx=None):
        return super().forward(x, hx)[0]


class AsDict(nn.GRU):
    def forward(self, x, hx=None):
        out, h = super().forward(x, hx)
        return {"sequence": out, "last": h}


class Flat(nn.LSTM):
    def forward(self, x, hx=None):
        out, (h, c) = super().forward(x, hx)
        return out, h, c


@pytest.mark.parametrize("cls", [OutputOnly, AsDict, Flat])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_subclasses_returning_other_structures_are_measured(cls, batch):
    torch.manual_seed(2)
    rnn = cls(I, H)
    model = nn.Sequential(rnn)
    x = torch.randn(T, batch, I)
    loss_fn = fixed_loss(3, T, batch, H, H)
    with gradwatch.trace(model) as tr:
        res = model(x)
        if isinstance(res, dict):
            out = res["sequence"]
        else:
            out = res if isinstance(res, torch.Tensor) else res[0]
        loss_fn(out, out[-1:] * 0, None).backward()
    rep = tr.report()
    assert list(rep) == ["0"]
    want = reference_stats(rnn, x, lambda o, h, c: loss_fn(o, o[-1:] * 0, None))
    assert rep["0"].exact
    assert_matches(rep["0"], want)


class Weird(nn.GRU):
    def forward(self, x, hx=None):
        out, _ = super().forward(x, hx)
        return [out.sum(-1)]  # nothing recognisable


def test_unrecognisable_output_warns_once_naming_the_module_and_what_it_returned():
    model = nn.Sequential(Weird(I, H))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning) as rec, gradwatch.Monitor(model, every_n_steps=1) as mon:
        for _ in range(3):
            model(torch.randn(T, B, I))[0].sum().backward()
            mon.step(opt)
    texts = [str(w.message) for w in rec if "gradwatch" in str(w.message)]
    assert len(texts) == 1, texts
    assert "'0'" in texts[0] and "Weird" in texts[0] and "list" in texts[0]


def test_unrecognisable_output_in_a_trace_names_the_real_cause():
    model = nn.Sequential(Weird(I, H))
    with gradwatch.trace(model) as tr:
        model(torch.randn(T, B, I))[0].sum().backward()
    with pytest.raises(gradwatch.GradwatchError) as err:
        tr.report()
    text = str(err.value)
    assert "returned" in text and "list" in text
    assert "no_grad" not in text
