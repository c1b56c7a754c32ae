"""Training patterns that work and must keep working (issue 12, "beyond these eleven").

Each test checks values against the float64 reference or bit-identity of training.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from truth_support import Wrap, assert_matches, fixed_loss, reference_stats

import gradwatch

T, B, I, H = 5, 3, 4, 6


def _loss_of(model, x, loss_fn):
    out, state = model(x)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    return loss_fn(out, h_n, c_n)


def _traced(model, x, loss_fn):
    with gradwatch.trace(model) as tr:
        _loss_of(model, x, loss_fn).backward()
    return tr.report()


def test_functional_call_uses_the_swapped_weights():
    torch.manual_seed(0)
    model = Wrap(nn.LSTM(I, H))
    params = {k: v.detach() * 0.5 + 0.01 for k, v in model.named_parameters()}
    params = {k: v.requires_grad_() for k, v in params.items()}
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(1, T, B, H, H)
    with gradwatch.trace(model) as tr:
        out, (h_n, c_n) = torch.func.functional_call(model, params, (x,))
        loss_fn(out, h_n, c_n).backward()
        twin = Wrap(nn.LSTM(I, H))
        twin.load_state_dict({k: v.detach() for k, v in params.items()})
    assert tr.report()["rnn"].exact
    assert_matches(tr.report()["rnn"], reference_stats(twin.rnn, x, loss_fn))


def test_pruned_weights_are_the_weights_of_the_forward():
    torch.manual_seed(1)
    model = Wrap(nn.GRU(I, H))
    prune.l1_unstructured(model.rnn, "weight_hh_l0", amount=0.5)
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(2, T, B, H, H)
    rep = _traced(model, x, loss_fn)
    assert rep["rnn"].exact
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))


class WeightDrop(nn.LSTM):
    """AWD-LSTM style DropConnect on the recurrent weights, set before each forward."""

    def __init__(self, *a, p=0.5, **kw):
        super().__init__(*a, **kw)
        raw = self.weight_hh_l0
        del self._parameters["weight_hh_l0"]
        self.weight_hh_raw = nn.Parameter(raw.detach().clone())
        self.p = p

    def forward(self, x, hx=None):
        w = nn.functional.dropout(self.weight_hh_raw, self.p, self.training)
        self.weight_hh_l0 = w
        return super().forward(x, hx)


def test_weight_drop_subclass_is_exact_against_the_dropped_weights():
    torch.manual_seed(2)
    model = Wrap(WeightDrop(I, H))
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(3, T, B, H, H)
    rep = _traced(model, x, loss_fn)
    assert rep["rnn"].exact
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float64_and_bfloat16_models(dtype):
    torch.manual_seed(3)
    model = Wrap(nn.GRU(I, H)).to(dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    loss_fn = fixed_loss(4, T, B, H, H)
    rep = _traced(model, x, loss_fn)
    if dtype == torch.float64:
        assert rep["rnn"].exact
        assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))
    else:  # replayed in float32 from bfloat16 tensors: honest about it
        assert rep["rnn"].total.shape == (1, 1, T)
        assert bool(torch.isfinite(rep["rnn"].total).all())


@pytest.mark.parametrize("steps", [1, 2000])
def test_one_step_and_long_sequences(steps):
    torch.manual_seed(4)
    model = Wrap(nn.RNN(2, 3))
    x = torch.randn(steps, 1, 2) * 0.3
    loss_fn = fixed_loss(5, steps, 1, 3, 3)
    rep = _traced(model, x, loss_fn)
    assert rep["rnn"].steps == steps and rep["rnn"].exact
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))


def test_nonfinite_inputs_are_reported_not_raised():
    torch.manual_seed(5)
    model = Wrap(nn.LSTM(I, H))
    x = torch.randn(T, B, I)
    x[2, 1, 0] = float("nan")
    x[3, 0, 1] = float("inf")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.Monitor(model, every_n_steps=1) as mon:
        model(x)[0].sum().backward()
        with pytest.warns(RuntimeWarning, match="NONFINITE"):
            rep = mon.step(opt)
    assert rep["rnn"].verdict == "nonfinite"


def test_torch_compile_model_is_bit_identical():
    pytest.importorskip("torch._dynamo")

    def run(watch):
        torch.manual_seed(6)
        model = nn.Sequential()
        model.rnn = nn.GRU(I, H)
        compiled = torch.compile(lambda x: model.rnn(x)[0].sum(), backend="eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = gradwatch.Monitor(model, every_n_steps=1) if watch else None
        for _ in range(2):
            compiled(torch.randn(T, B, I)).backward()
            if mon is not None:
                mon.step(opt)
            opt.step()
            opt.zero_grad()
        if mon is not None:
            mon.close()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------- the next class of break
def test_a_no_grad_call_then_a_training_call_reports_only_the_training_call():
    torch.manual_seed(7)
    model = Wrap(nn.GRU(I, H))
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(8, T, B, H, H)
    with gradwatch.trace(model) as tr:
        with torch.no_grad():
            model(x)  # e.g. a teacher pass of the same network
        _loss_of(model, x, loss_fn).backward()
    assert list(tr.report()) == ["rnn"]
    assert_matches(tr.report()["rnn"], reference_stats(model.rnn, x, loss_fn))


def test_retain_graph_double_backward_reports_what_accumulated():
    torch.manual_seed(8)
    model = Wrap(nn.GRU(I, H))
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(9, T, B, H, H)
    with gradwatch.trace(model) as tr:
        loss = _loss_of(model, x, loss_fn)
        loss.backward(retain_graph=True)
        loss.backward()  # both passes accumulate into the parameter gradients
    want = reference_stats(model.rnn, x, lambda o, h, c: 2 * loss_fn(o, h, c))
    assert_matches(tr.report()["rnn"], want)


def test_accumulation_with_a_skipped_micro_batch():
    torch.manual_seed(9)
    model = Wrap(nn.LSTM(I, H))
    xs = torch.randn(3, T, B, I)
    loss_fn = fixed_loss(10, T, B, H, H)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.Monitor(model, every_n_steps=1) as mon:
        for k, x in enumerate(xs):
            loss = _loss_of(model, x, loss_fn)
            if k == 1:
                continue  # the loop skips this micro-batch (e.g. a non-finite loss)
            loss.backward()
        rep = mon.step(opt)
    assert list(rep) == ["rnn"]
    # merged over the two trained micro-batches: their mean
    a = reference_stats(model.rnn, xs[0], loss_fn)["total"]
    b = reference_stats(model.rnn, xs[2], loss_fn)["total"]
    got = rep["rnn"].total
    err = float((got - (a + b).float() / 2).abs().max() / (a + b).abs().max() * 2)
    assert err <= 1e-4


def test_one_module_shared_by_two_watched_models():
    torch.manual_seed(10)
    shared = nn.GRU(I, H)
    m1, m2 = Wrap(shared), nn.Sequential(copy.deepcopy(nn.Linear(I, I)), Wrap(shared))
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(11, T, B, H, H)
    opt = torch.optim.SGD(shared.parameters(), lr=0.0)
    with gradwatch.Monitor(m1, every_n_steps=1) as a, gradwatch.Monitor(m2, every_n_steps=1) as b:
        _loss_of(m1, x, loss_fn).backward()
        ra, rb = a.step(opt), b.step(opt)
    want = reference_stats(shared, x, loss_fn)
    assert_matches(ra["rnn"], want)
    assert_matches(rb["1.rnn"], want)
