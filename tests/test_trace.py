"""Contract of gradwatch.trace: non-intrusiveness, hook hygiene, errors, the three capture paths."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import (
    BackwardNotRunError,
    GradwatchError,
    NoRecurrentModuleError,
    UnsupportedModuleError,
)
from gradwatch._capture.math_mode import TOLERANCE


class Seq2Seq(nn.Module):
    """Fused LSTM with inter-layer dropout, an LSTMCell loop, a marked custom recurrence."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.LSTM(3, 6, num_layers=2, dropout=0.3)
        self.cell = nn.LSTMCell(6, 6)
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, (h, c) = self.enc(x)
        outs = []
        for t in range(4):
            h, c = self.cell(self.drop(out[t]), (h[-1] if t == 0 else h, c[-1] if t == 0 else c))
            outs.append(h)
        s = outs[-1]
        for _ in range(3):
            s = torch.tanh(s @ self.w)
            y, s = gradwatch.mark_state("custom", s)
            outs.append(y)
        return self.head(torch.stack(outs)).sum()


def _step(model, x, traced: bool):
    torch.manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if traced:
        with gradwatch.trace(model) as tr:
            loss = model(x)
            loss.backward()
    else:
        tr = None
        loss = model(x)
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    opt.step()
    return loss.detach(), grads, rng, [p.detach().clone() for p in model.parameters()], tr


def test_training_is_bit_identical_with_and_without_trace():
    torch.manual_seed(0)
    model = Seq2Seq().train()
    twin = copy.deepcopy(model)
    x = torch.randn(5, 2, 3)
    loss_a, grads_a, rng_a, weights_a, _ = _step(model, x, traced=False)
    loss_b, grads_b, rng_b, weights_b, tr = _step(twin, x, traced=True)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert torch.equal(rng_a, rng_b)
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
    rep = tr.report()
    assert list(rep) == ["enc", "cell", "custom"]
    assert rep["enc"].exact is False  # inter-layer dropout in training: flagged, not hidden
    assert "dropout" in rep["enc"].approximate_reason
    assert rep["cell"].exact and rep["custom"].exact
    assert rep["cell"].steps == 4 and rep["custom"].steps == 3


def test_no_hook_or_tensor_survives_the_trace():
    model = nn.Sequential(nn.LSTM(3, 4))
    lstm = model[0]
    x = torch.randn(5, 2, 3)
    with gradwatch.trace(model) as tr:
        out, (h, c) = lstm(x)
        loss = out.sum() + h.sum()
        loss.backward(retain_graph=True)
    x_ref = weakref.ref(x)
    assert not lstm._forward_hooks and not lstm._forward_pre_hooks
    assert not model._forward_pre_hooks
    before = tr.report()["0"].total.clone()
    # a second backward through the same graph must not reach the trace any more
    loss.backward()
    assert torch.equal(tr.report()["0"].total, before)
    assert not tr._recorder.recorded  # every record released (hooks, tensors) and dropped
    del x, out, h, c, loss
    gc.collect()
    assert x_ref() is None  # the trace does not keep the input alive


def test_several_backward_passes_accumulate_like_one():
    torch.manual_seed(1)
    rnn = nn.GRU(3, 4, num_layers=2)
    x = torch.randn(6, 2, 3)
    r1, r2 = torch.randn(6, 2, 4), torch.randn(2, 2, 4)
    with gradwatch.trace(rnn) as tr1:
        out, h = rnn(x)
        (out * r1).sum().backward(retain_graph=True)
        (h * r2).sum().backward()
    with gradwatch.trace(rnn) as tr2:
        out, h = rnn(x)
        ((out * r1).sum() + (h * r2).sum()).backward()
    a, b = tr1.report()["GRU"], tr2.report()["GRU"]
    for field in ("total", "carried", "direct"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-7)


def _copy_weights(cell: nn.Module, fused: nn.RNNBase) -> None:
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(fused, n + "_l0"))


@pytest.mark.parametrize(
    ("fused_cls", "cell_cls"),
    [(nn.RNN, nn.RNNCell), (nn.LSTM, nn.LSTMCell), (nn.GRU, nn.GRUCell)],
)
def test_cell_loop_hooks_agree_with_fused_replay(fused_cls, cell_cls):
    """Two independent capture paths (hooks on a cell loop, replay of the fused kernel) on the
    same weights and loss must report the same values."""
    torch.manual_seed(2)
    fused, cell = fused_cls(3, 5), cell_cls(3, 5)
    _copy_weights(cell, fused)
    x, r = torch.randn(7, 2, 3), torch.randn(7, 2, 5)
    with gradwatch.trace(fused) as tf:
        out, _ = fused(x)
        (out * r).sum().backward()
    with gradwatch.trace(cell) as tc:
        state, outs = None, []
        for t in range(7):
            state = cell(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        (torch.stack(outs) * r).sum().backward()
    a, b = tf.report()[type(fused).__name__], tc.report()[type(cell).__name__]
    assert b.source == "hooks" and a.source == "replay"
    fields = ["total", "carried", "direct"] + (["cell_total"] if fused_cls is nn.LSTM else [])
    for f in fields:
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=1e-5, atol=1e-7)


def test_marked_custom_recurrence_agrees_with_fused_replay():
    torch.manual_seed(3)
    rnn = nn.RNN(3, 5)
    x, r, rh = torch.randn(6, 2, 3), torch.randn(6, 2, 5), torch.randn(2, 5)
    w_ih, w_hh = rnn.weight_ih_l0, rnn.weight_hh_l0
    b = rnn.bias_ih_l0 + rnn.bias_hh_l0
    with gradwatch.trace(rnn) as tf:
        out, h_n = rnn(x)
        ((out * r).sum() + (h_n[0] * rh).sum()).backward()
    holder = nn.Module()
    with gradwatch.trace(holder) as tc:
        h, outs = torch.zeros(2, 5), []
        for t in range(6):
            h = torch.tanh(x[t] @ w_ih.t() + h @ w_hh.t() + b)
            y, h = gradwatch.mark_state("mine", h)
            outs.append(y)
        ((torch.stack(outs) * r).sum() + (outs[-1] * rh).sum()).backward()
    a, m = tf.report()["RNN"], tc.report()["mine"]
    assert m.kind == "custom" and m.cell_total is None
    for f in ("total", "carried", "direct"):
        torch.testing.assert_close(getattr(m, f), getattr(a, f), rtol=1e-5, atol=1e-7)


def test_mark_state_outside_a_trace_is_the_identity():
    h = torch.randn(2, 3, requires_grad=True)
    y, s = gradwatch.mark_state("x", h)
    assert y is h and s is h
    with pytest.raises(ValueError, match="non-empty string"):
        gradwatch.mark_state("", h)
    with pytest.raises(TypeError, match="tensor or a tuple"):
        gradwatch.mark_state("x", [h])


def test_calls_are_named_in_order_and_unused_calls_report_zeros():
    torch.manual_seed(4)
    model = nn.ModuleDict({"rnn": nn.LSTM(3, 4)})
    x = torch.randn(5, 2, 3)
    with gradwatch.trace(model) as tr:
        model["rnn"](x)  # output discarded: no gradient reaches this call
        _, (h, _) = model["rnn"](x)
        h.sum().backward()
    rep = tr.report()
    assert list(rep) == ["rnn", "rnn#1"]
    assert rep["rnn"].received_gradient is False and float(rep["rnn"].total.abs().sum()) == 0.0
    used = rep["rnn#1"]
    assert used.received_gradient
    assert float(used.direct[0, 0, :-1].abs().sum()) == 0.0  # gradient enters through h_n only
    assert bool((used.total[0, 0] > 0).all())  # ... and is carried back to every step


def test_bf16_autocast_is_exact_up_to_bf16_rounding():
    """Under autocast the kernel computes from bf16 operands: the replay does too, and its
    report is exact up to bf16 rounding (deviation above float32's, within bf16's)."""
    torch.manual_seed(5)
    lstm = nn.LSTM(3, 8)
    x = torch.randn(10, 4, 3)
    with gradwatch.trace(lstm) as tr32:
        lstm(x)[0].sum().backward()
    with gradwatch.trace(lstm) as tr16, torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = lstm(x)
        out.float().sum().backward()
    a, b = tr32.report()["LSTM"], tr16.report()["LSTM"]
    assert a.exact and b.exact and b.approximate_reason is None
    assert TOLERANCE["float32"] < b.fidelity <= TOLERANCE["bfloat16"]
    assert b.total.dtype == torch.float32
    torch.testing.assert_close(b.total, a.total, rtol=5e-2, atol=1e-3)


def test_nonfinite_gradients_are_reported_not_dropped():
    rnn = nn.RNN(2, 3)
    x = torch.randn(4, 1, 2)
    with gradwatch.trace(rnn) as tr:
        out, _ = rnn(x)
        (out[2].sum() * torch.tensor(float("inf"))).backward()
    total = tr.report()["RNN"].total[0, 0]
    assert total[3] == 0 and torch.isinf(total[2]) and not torch.isfinite(total[:2]).any()


def test_huge_and_tiny_gradients_keep_their_magnitude():
    rnn = nn.RNN(2, 3)
    x = torch.randn(4, 1, 2)
    for scale in (1e30, 1e-30):
        with gradwatch.trace(rnn) as tr:
            out, _ = rnn(x)
            (out[-1] * scale).sum().backward()
        last = float(tr.report()["RNN"].total[0, 0, -1])
        assert last == pytest.approx(scale * 3**0.5, rel=1e-5)


# ------------------------------------------------------------------------------- errors
def test_model_without_recurrent_module():
    with gradwatch.trace(nn.Sequential(nn.Linear(2, 2))) as tr:
        pass
    with pytest.raises(NoRecurrentModuleError, match=r"Sequential.*no recurrent module"):
        tr.report()


def test_backward_never_ran_names_the_module():
    model = nn.Sequential(nn.GRU(2, 3))
    with gradwatch.trace(model) as tr:
        model(torch.randn(3, 1, 2))
    with pytest.raises(BackwardNotRunError, match=r"'0'.*loss\.backward\(\)"):
        tr.report()


def test_forward_without_gradients_is_explained():
    model = nn.Sequential(nn.GRU(2, 3))
    with gradwatch.trace(model) as tr, torch.no_grad():
        model(torch.randn(3, 1, 2))
    with pytest.raises(GradwatchError, match=r"'0'.*torch\.no_grad"):
        tr.report()


def test_unsupported_cell_subclass_is_refused_by_name():
    class MyCell(nn.RNNCellBase):
        def __init__(self):
            super().__init__(2, 2, bias=True, num_chunks=1)

    model = nn.Module()
    model.inner = MyCell()
    with pytest.raises(UnsupportedModuleError, match=r"'inner'.*MyCell"):
        gradwatch.trace(model)


def test_complex_weights_are_refused_by_name():
    model = nn.Module()
    model.rnn = nn.RNN(2, 2).to(torch.complex64)
    with pytest.raises(UnsupportedModuleError, match=r"'rnn'.*complex64"):
        gradwatch.trace(model)


def test_selectors_and_argument_checks():
    model = nn.ModuleDict({"a": nn.GRU(2, 2), "b": nn.LSTM(2, 2)})
    assert gradwatch.trace(model, include=["a"]).names == ["a"]
    assert gradwatch.trace(model, exclude=[nn.GRU]).names == ["b"]
    with pytest.raises(ValueError, match="include"):
        gradwatch.trace(model, include=[3])
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gradwatch.trace("model")
    tr = gradwatch.trace(model)
    with tr:
        pass
    with pytest.raises(GradwatchError, match="only once"), tr:
        pass


def test_replay_runs_in_float32_inside_a_bf16_autocast_region():
    """The replay is called at the end of backward, possibly under autocast: it must not
    compute in bf16. Same call, replayed inside and outside autocast: identical numbers."""
    from gradwatch._analysis import analyze
    from gradwatch._capture.families.fused import capture_call
    from gradwatch._capture.fused import record_fused_call

    def replay_fused_call(call):
        return analyze(capture_call(call))

    torch.manual_seed(7)
    lstm = nn.LSTM(4, 16, num_layers=2)
    x = torch.randn(12, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = lstm(x)
    call = record_fused_call("lstm", "lstm", lstm, (x,), {}, (out, (h_n, c_n)))
    grads = torch.autograd.grad(out.float().pow(2).sum(), [out, h_n, c_n], allow_unused=True)
    call.grads = {k: g for k, g in zip(("out", "h_n", "c_n"), grads, strict=True) if g is not None}
    plain = replay_fused_call(call)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = replay_fused_call(call)
    for field in ("total", "carried", "direct", "cell_total", "gain", "horizon"):
        assert torch.equal(getattr(plain, field), getattr(inside, field)), field
    assert plain.exact and call.mode.precision == "bfloat16"


def test_marked_states_keep_gradient_summation_order():
    """A state read by several consumers: identity views in between would change the order
    in which autograd sums their contributions (and the last bits of the gradients)."""
    torch.manual_seed(0)
    w = (torch.randn(32, 32) * 0.3).requires_grad_()
    a = torch.randn(32, 32).requires_grad_()
    x = torch.randn(20, 16, 32)

    def run(mark: bool):
        w.grad = a.grad = None
        s, loss = torch.zeros(16, 32), 0
        for t in range(20):
            s = torch.tanh(x[t] + s @ w)
            y = s
            if mark:
                y, s_marked = gradwatch.mark_state("m", s)
                assert y is s and s_marked is s  # handed back untouched
            loss = loss + (y @ a).sin().sum() + (y * y).sum() * 0.1 + (s * 0.5).cos().sum()
        loss.backward()
        return w.grad.clone(), a.grad.clone()

    plain = run(False)
    with gradwatch.trace(nn.Identity()) as tr:
        marked = run(True)
    assert all(torch.equal(p, q) for p, q in zip(plain, marked, strict=True))
    m = tr.report()["m"]
    assert bool((m.carried[0, 0, :-1] > 0).all()) and m.carried[0, 0, -1] == 0
    assert bool((m.direct[0, 0] > 0).all())
