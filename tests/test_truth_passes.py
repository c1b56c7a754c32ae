"""Which backward passes a report describes (issue 12, classes 1, 4 and 11).

A report describes the gradient that trains the step: the backward passes that accumulate
into parameter gradients. Passes of ``torch.autograd.grad`` that do not train are not
counted; a recomputation under activation checkpointing is not a call; the calls of an
aborted forward or backward are dropped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from truth_support import Wrap, assert_matches, fixed_loss, reference_stats

import gradwatch

T, B, I, H = 6, 3, 4, 5


def _setup(seed=0, kind=nn.LSTM):
    torch.manual_seed(seed)
    model = Wrap(kind(I, H))
    x = torch.randn(T, B, I, requires_grad=True)
    return model, x, fixed_loss(seed + 1, T, B, H, H)


def _loss_of(model, x, loss_fn):
    out, state = model(x)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    return loss_fn(out, h_n, c_n)


# ------------------------------------------------------------------------------ class 1
def test_trace_ignores_autograd_grad_passes_that_do_not_train():
    model, x, loss_fn = _setup()
    with gradwatch.trace(model) as tr:
        loss = _loss_of(model, x, loss_fn)
        (saliency,) = torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()
    rep = tr.report()
    assert list(rep) == ["rnn"]
    assert rep["rnn"].exact
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))
    assert saliency.abs().sum() > 0


def test_monitor_ignores_autograd_grad_passes_that_do_not_train():
    model, x, loss_fn = _setup(1, nn.GRU)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.Monitor(model, every_n_steps=1) as mon:
        loss = _loss_of(model, x, loss_fn)
        torch.autograd.grad(loss, x, retain_graph=True)
        torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()
        rep = mon.step(opt)
    assert rep is not None and list(rep) == ["rnn"]
    assert rep["rnn"].exact
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))


def test_only_autograd_grad_says_that_no_training_pass_ran():
    model, x, loss_fn = _setup()
    with gradwatch.trace(model) as tr:
        torch.autograd.grad(_loss_of(model, x, loss_fn), x)
    with pytest.raises(gradwatch.BackwardNotRunError, match=r"torch\.autograd\.grad"):
        tr.report()


@pytest.mark.parametrize("where", ["trace", "monitor"])
def test_gradient_penalty_is_flagged_not_exact_with_the_reason(where):
    # mkldnn's fused kernel has no double backward on the CPU; the composite path has
    torch.backends.mkldnn.enabled = False
    try:
        model, x, loss_fn = _setup(2, nn.GRU)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        mon = gradwatch.Monitor(model, every_n_steps=1) if where == "monitor" else None
        tr = gradwatch.trace(model) if where == "trace" else None
        if tr is not None:
            tr.__enter__()
        loss = _loss_of(model, x, loss_fn)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + gx.pow(2).sum()).backward()
        if tr is not None:
            tr.__exit__(None, None, None)
            rep = tr.report()
        else:
            rep = mon.step(opt)
            mon.close()
    finally:
        torch.backends.mkldnn.enabled = True
    m = rep["rnn"]
    assert m.exact is False
    assert "create_graph" in m.approximate_reason
    assert "second-order" in m.approximate_reason


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
def test_backward_with_create_graph_alone_stays_exact():
    torch.backends.mkldnn.enabled = False
    try:
        model, x, loss_fn = _setup(3, nn.GRU)
        with gradwatch.trace(model) as tr:
            _loss_of(model, x, loss_fn).backward(create_graph=True)
        want = reference_stats(model.rnn, x, loss_fn)
    finally:
        torch.backends.mkldnn.enabled = True
    for p in model.parameters():  # break the reference cycle create_graph leaves behind
        p.grad = None
    assert tr.report()["rnn"].exact
    assert_matches(tr.report()["rnn"], want)


# ------------------------------------------------------------------------------ class 4
class Block(nn.Module):
    """Embedding-like input layer, an LSTM and a head, optionally under checkpointing."""

    def __init__(self, ckpt: str, scope: str) -> None:
        super().__init__()
        self.inp = nn.Linear(I, I)
        self.lstm = nn.LSTM(I, H)
        self.head = nn.Linear(H, 1)
        self.ckpt, self.scope = ckpt, scope

    def _rnn(self, e):
        return self.lstm(e)[0]

    def _block(self, e):
        return self.head(self.lstm(e)[0])

    def forward(self, x):
        e = self.inp(x)
        if self.ckpt == "none":
            return self.head(self.lstm(e)[0]).sum()
        reentrant = self.ckpt == "reentrant"
        if self.scope == "module":
            out = checkpoint(self._rnn, e, use_reentrant=reentrant)
            return self.head(out).sum()
        return checkpoint(self._block, e, use_reentrant=reentrant).sum()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ckpt", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("scope", ["module", "block"])
@pytest.mark.parametrize("where", ["trace", "monitor"])
def test_activation_checkpointing_adds_no_call(ckpt, scope, where):
    def run(mode):
        torch.manual_seed(4)
        model = Block(mode, scope)
        x = torch.randn(T, B, I)
        if where == "trace":
            with gradwatch.trace(model) as tr:
                model(x).backward()
            return tr.report()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradwatch.Monitor(model, every_n_steps=1) as mon:
            reps = []
            for _ in range(2):
                model(x).backward()
                reps.append(mon.step(opt))
                opt.step()
                opt.zero_grad()
        return reps[-1]

    plain, ckpted = run("none"), run(ckpt)
    assert list(ckpted) == list(plain) == ["lstm"]
    assert ckpted["lstm"].exact
    for f in ("total", "direct", "carried", "cell_total"):
        torch.testing.assert_close(getattr(ckpted["lstm"], f), getattr(plain["lstm"], f))


# ----------------------------------------------------------------------------- class 11
def test_aborted_forward_is_dropped_at_the_next_step():
    model, x, loss_fn = _setup(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.Monitor(model, every_n_steps=1) as mon:
        try:
            _loss_of(model, x * 2, loss_fn)
            raise FloatingPointError("bad batch")  # the loop's own check: skip the batch
        except FloatingPointError:
            opt.zero_grad()
        _loss_of(model, x, loss_fn).backward()
        rep = mon.step(opt)
    assert list(rep) == ["rnn"]
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))


def test_aborted_backward_is_dropped_at_the_next_step():
    model, x, loss_fn = _setup(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def explode(grad):
        raise FloatingPointError("non-finite gradient")

    with gradwatch.Monitor(model, every_n_steps=1) as mon:
        out, (h_n, c_n) = model(x * 3)
        h_n.register_hook(explode)  # runs after part of the gradient reached the module
        try:
            loss_fn(out, h_n, c_n).backward()
        except FloatingPointError:
            opt.zero_grad()
        _loss_of(model, x, loss_fn).backward()
        rep = mon.step(opt)
    assert list(rep) == ["rnn"]
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))


def test_aborted_forward_inside_a_trace_is_not_a_call():
    model, x, loss_fn = _setup(7)
    with gradwatch.trace(model) as tr:
        try:
            _loss_of(model, x * 2, loss_fn)
            raise FloatingPointError("bad batch")
        except FloatingPointError:
            pass
        _loss_of(model, x, loss_fn).backward()
    rep = tr.report()
    assert list(rep) == ["rnn"]
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))


def test_call_unused_by_a_trained_forward_is_still_reported_as_zeros():
    # The other side of class 11: a call of a forward that did train, whose outputs just
    # do not reach the loss, stays in the report (zeros, received_gradient False).
    torch.manual_seed(8)

    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(I, H)

        def forward(self, x):
            self.rnn(x)  # unused
            return self.rnn(x)[0].sum()

    model = TwoCalls()
    with gradwatch.trace(model) as tr:
        model(torch.randn(T, B, I)).backward()
    rep = tr.report()
    assert list(rep) == ["rnn", "rnn#1"]
    assert rep["rnn"].received_gradient is False and float(rep["rnn"].total.abs().max()) == 0
    assert rep["rnn#1"].received_gradient is True


class CellBlock(nn.Module):
    """An LSTMCell loop, optionally under checkpointing."""

    def __init__(self, ckpt: str) -> None:
        super().__init__()
        self.inp = nn.Linear(I, I)
        self.cell = nn.LSTMCell(I, H)
        self.head = nn.Linear(H, 1)
        self.ckpt = ckpt

    def _loop(self, e):
        state, outs = None, []
        for t in range(e.shape[0]):
            state = self.cell(e[t], state)
            outs.append(state[0])
        return torch.stack(outs)

    def forward(self, x):
        e = self.inp(x)
        if self.ckpt == "none":
            return self.head(self._loop(e)).sum()
        out = checkpoint(self._loop, e, use_reentrant=self.ckpt == "reentrant")
        return self.head(out).sum()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ckpt", ["non_reentrant", "reentrant"])
def test_activation_checkpointing_of_a_cell_loop_adds_no_sequence(ckpt):
    def run(mode):
        torch.manual_seed(9)
        model = CellBlock(mode)
        with gradwatch.trace(model) as tr:
            model(torch.randn(T, B, I)).backward()
        return tr.report()

    plain, ckpted = run("none"), run(ckpt)
    assert list(ckpted) == list(plain) == ["cell"]
    for f in ("total", "direct", "carried", "cell_total"):
        torch.testing.assert_close(getattr(ckpted["cell"], f), getattr(plain["cell"], f))
