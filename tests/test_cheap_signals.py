"""The cheap path: what a step that is not captured measures, hooks and keeps.

Values are checked against float64 norms computed here from the same gradients (an
independent reduction); the hooks and held gradients are checked by looking at the model
and the recorder.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._capture import injected as injected_module
from gradwatch._capture.injected import InjectedGrads
from gradwatch._capture.norms import device_norms, host_norms
from gradwatch._engine.signals import CheapSignals


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 16)
        self.head = nn.Linear(16, 20)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out)


def _norm64(tensors) -> float:
    return math.sqrt(sum(float(t.double().norm()) ** 2 for t in tensors))


def _injected_reference(model, x, weights):
    """The loss ``sum(out * w)``: the gradient injected into the LSTM's output is ``w``."""
    out, _ = model.rnn(model.emb(x))
    return (out * weights).sum()


def test_injected_norm_over_micro_batches_is_folded_and_exact():
    """Three backward passes in one step: the injected signal is the norm of all three
    output gradients together; the held gradients of a pass are reduced at the next call."""
    torch.manual_seed(0)
    model = LM()
    xs = [torch.randint(0, 20, (6, 3)) for _ in range(3)]
    ws = [torch.randn(6, 3, 16) for _ in range(3)]
    with gradwatch.Monitor(model, every_n_steps=1000, log_every_n_steps=1) as mon:
        mon.step()  # step 0 is a scheduled capture: the cheap path starts at step 1
        session = mon._core.session
        for k, (x, w) in enumerate(zip(xs, ws, strict=True)):
            loss = _injected_reference(model, x, w)
            # the gradients of the earlier passes were reduced at this call
            assert session.injected._grads == []
            assert (session.injected._folded[0] is None) == (k == 0)
            loss.backward()
            assert len(session.injected._grads) == 1  # held by reference until reduced
        mon.step()
    s = mon.signals[-1]
    assert s.step == 1 and s.captured is None
    assert s.injected["rnn"] == pytest.approx(_norm64(ws), rel=1e-6)
    assert s.grad_norm["rnn"] == pytest.approx(_norm64(p.grad for p in model.rnn.parameters()))


def test_cheap_steps_hook_the_root_only_while_capturing_and_keep_nothing():
    torch.manual_seed(0)
    model = LM()
    x = torch.randint(0, 20, (5, 2))
    with gradwatch.Monitor(model, every_n_steps=3) as mon:
        assert len(model._forward_pre_hooks) == 1  # step 0 is captured: forward passes counted
        model(x).sum().backward()
        mon.step()
        assert len(model._forward_pre_hooks) == 0  # a cheap step: no root hook
        out = model(x)
        session = mon._core.session
        assert session.recorded == []  # nothing recorded for a replay
        out.sum().backward()
        assert len(session.injected._grads) == 1
        mon.step()
        assert session.injected._grads == []  # released at the end of the step
        model(x).sum().backward()
        mon.step()  # step 2: the next one is captured
        assert len(model._forward_pre_hooks) == 1
    assert len(model._forward_pre_hooks) == 0 and len(model.rnn._forward_hooks) == 0


def test_passes_that_do_not_train_or_abort_are_not_counted_on_cheap_steps():
    torch.manual_seed(0)
    model = LM()
    x = torch.randint(0, 20, (6, 3))
    w = torch.randn(6, 3, 16)

    def explode(grad):
        raise FloatingPointError("non-finite gradient")

    with gradwatch.Monitor(model, every_n_steps=1000, log_every_n_steps=1) as mon:
        mon.step()
        emb = model.emb(x)
        out, _ = model.rnn(emb)
        loss = (out * w).sum()
        torch.autograd.grad(loss, emb, retain_graph=True)  # a saliency map: trains nothing
        aborted = (out * 5.0).sum()
        emb.register_hook(explode)  # runs after the gradient reached the LSTM's output
        with pytest.raises(FloatingPointError):
            aborted.backward(retain_graph=True)
        model.zero_grad()
        session = mon._core.session
        assert len(session.injected._pending) == 1  # the aborted pass never completed
        out2, _ = model.rnn(model.emb(x))
        (out2 * w).sum().backward()
        mon.step()
        assert session.injected._pending == {}  # dropped at the end of the step: no leak
    assert mon.signals[-1].injected["rnn"] == pytest.approx(float(w.double().norm()), rel=1e-6)


def test_outputs_of_one_node_share_one_hook(monkeypatch):
    """Outputs that one autograd node produced together (as cuDNN returns an RNN's output
    and states) get one pre-hook, which reads each of their gradients."""
    made = []
    real = injected_module._prehook
    monkeypatch.setattr(injected_module, "_prehook", lambda *a: made.append(a[2]) or real(*a))
    torch.manual_seed(0)
    model = LM()
    with gradwatch.Monitor(model, every_n_steps=1000) as mon:
        mon.step()
        injected = mon._core.session.injected
        a, b = (model.head.weight * 2.0).split(10)  # a pass that trains the model
        assert a.grad_fn is b.grad_fn
        injected.watch(0, (a, b, None))
        assert made == [[0, 1]]  # one hook for both outputs, reading both slots
        ga, gb = torch.randn(10, 16), torch.randn(10, 16)
        torch.autograd.backward([a, b], [ga, gb])
        grads = injected.take()
    assert len(grads.grads) == 2
    assert torch.equal(grads.grads[0], ga) and torch.equal(grads.grads[1], gb)


def _case(nonfinite: bool):
    torch.manual_seed(1)
    params = [
        [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))],
        [nn.Parameter(torch.randn(5))],
        [nn.Parameter(torch.randn(2, 2))],  # not trained by the optimizer below
    ]
    for ps in params:
        for p in ps:
            p.grad = torch.randn_like(p) * 1e3
    params[0][1].grad = None  # a parameter without a gradient this step
    if nonfinite:
        params[1][0].grad[2] = math.inf
        params[0][0].grad[0, 0] = math.nan
    opt = torch.optim.SGD([*params[0], *params[1]], lr=0.1)
    grads = [torch.randn(3, 4) * 1e-3, torch.randn(7), torch.randn(2, 2)]
    injected = InjectedGrads(grads, [0, 0, 2], [None, 2.5, None])
    return params, opt, injected


@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_host_and_device_paths_agree_with_a_float64_reference(nonfinite, scaled):
    """The same signals from the host path (floats) and the device path (tensor ops, run
    on the CPU here), and both equal to float64 norms computed per module."""
    params, opt, injected = _case(nonfinite)
    cheap = CheapSignals(params, torch.device("cpu"))
    scale = torch.tensor(4.0) if scaled else None
    host = cheap.host_signals(injected, opt, scale, grads_scaled=True)
    dev = cheap.device_signals(injected, opt, scale, grads_scaled=True).tolist()
    s = 4.0 if scaled else 1.0
    g0 = _norm64([params[0][0].grad])
    want = [
        [_norm64(injected.grads[:2]) / s, 2.5 / s, _norm64(injected.grads[2:]) / s],
        [g0 / s, _norm64([params[1][0].grad]) / s, 0.0],  # module 2 is not trained
        [1.0, 1.0, 1.0],
        [1.0, 1.0, 0.0],
    ]
    for got in (host, dev):
        for row, ref in zip(got, want, strict=True):
            for v, r in zip(row, ref, strict=True):
                if math.isnan(r):
                    assert math.isnan(v)
                else:
                    assert v == pytest.approx(r, rel=1e-6)
    if nonfinite:  # NaN wins over inf within a module, inf stays inf
        assert math.isnan(host[1][0]) and math.isnan(dev[1][0])
        assert host[1][1] == dev[1][1] == math.inf


def test_norm_helpers_keep_float64_and_read_nothing_on_the_device():
    a = torch.randn(100, dtype=torch.float64)
    b = torch.randn(10, dtype=torch.float16)
    c = torch.randn(50)
    got = host_norms([a, b, c])
    assert got[0] == float(a.norm())  # float64 stays float64, exactly
    assert got[1] == pytest.approx(float(b.double().norm()), rel=1e-3)
    assert got[2] == pytest.approx(float(c.double().norm()), rel=1e-6)
    norms = device_norms([a, b, c], torch.device("cpu"))
    assert isinstance(norms, torch.Tensor) and norms.dtype == torch.float64
    assert norms.tolist() == pytest.approx([float(t.double().norm()) for t in (a, b, c)], 1e-6)
    # a huge finite gradient: float32 squares overflow, the norm does not
    assert host_norms([torch.full((10,), 1e30)])[0] == pytest.approx(1e30 * math.sqrt(10))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_calls_count_once_on_cheap_steps(reentrant):
    """Under activation checkpointing the forward runs again in backward: the injected
    gradient is counted once, equal to the loss's gradient at the output."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    rnn = nn.LSTM(4, 8)
    x = torch.randn(5, 3, 4, requires_grad=True)
    w = torch.randn(5, 3, 8)
    with gradwatch.Monitor(rnn, every_n_steps=1000, log_every_n_steps=1) as mon:
        mon.step()
        out = checkpoint(lambda t: rnn(t)[0], x, use_reentrant=reentrant)
        (out * w).sum().backward()
        mon.step()
    s = mon.signals[-1]
    assert s.injected["LSTM"] == pytest.approx(float(w.double().norm()), rel=1e-6)
    assert s.grad_norm["LSTM"] == pytest.approx(_norm64(p.grad for p in rnn.parameters()))
