"""What the recurrence received and which weights it used (issue 12, classes 2 and 3).

Values are what the recurrence actually received, after any user hooks; reading weights
never runs a parametrization (no side effects), so training stays bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from truth_support import Wrap, assert_matches, fixed_loss, reference_stats

import gradwatch

T, B, I, H = 6, 3, 4, 5


def _clamp(g):
    return g.clamp(-0.05, 0.05)


# ------------------------------------------------------------------------------ class 2
@pytest.mark.parametrize("where", ["trace", "monitor"])
def test_values_are_after_a_user_hook_registered_after_the_forward(where):
    torch.manual_seed(0)
    model = Wrap(nn.LSTM(I, H))
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(1, T, B, H, H)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step():
        out, (h_n, c_n) = model(x)
        out.register_hook(_clamp)  # Graves-style clipping of the output gradient
        h_n.register_hook(lambda g: g * 0.5)
        loss_fn(out, h_n, c_n).backward()

    if where == "trace":
        with gradwatch.trace(model) as tr:
            step()
        rep = tr.report()
    else:
        with gradwatch.Monitor(model, every_n_steps=1) as mon:
            step()
            rep = mon.step(opt)

    def same_hooks(out, h_n, c_n):
        out.register_hook(_clamp)
        h_n.register_hook(lambda g: g * 0.5)

    want = reference_stats(model.rnn, x, loss_fn, on_output=same_hooks)
    assert rep["rnn"].exact
    assert_matches(rep["rnn"], want, ("total", "direct", "carried", "cell_total"))


def test_values_are_after_a_user_hook_registered_before_gradwatch():
    torch.manual_seed(1)
    rnn = nn.GRU(I, H)

    # a forward hook the user registered before watching: it hooks the output gradient
    def user_forward_hook(module, args, out):
        out[0].register_hook(_clamp)

    rnn.register_forward_hook(user_forward_hook)
    model = Wrap(rnn)
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(2, T, B, H, H)
    with gradwatch.trace(model) as tr:
        out, h_n = model(x)
        loss_fn(out, h_n, None).backward()
    want = reference_stats(rnn, x, loss_fn, on_output=lambda o, h, c: o.register_hook(_clamp))
    assert_matches(tr.report()["rnn"], want)


def test_cell_values_are_after_a_user_hook_on_the_state():
    torch.manual_seed(2)
    cell = nn.GRUCell(I, H)
    xs = torch.randn(T, B, I)
    w = torch.randn(T, B, H)

    def run(c):
        h, loss = None, 0
        for t in range(T):
            h = c(xs[t], h)
            h.register_hook(lambda g: g.clamp(-0.01, 0.01))
            loss = loss + (h * w[t]).sum()
        return loss

    with gradwatch.trace(cell) as tr:
        run(cell).backward()
    got = tr.report()["GRUCell"].total

    # reference: a float64 twin; a second hook after the clamp reads what each state received
    twin = nn.GRUCell(I, H).double()
    twin.load_state_dict(cell.state_dict())
    received: list = [None] * T
    h, loss = None, 0
    for t in range(T):
        h = twin(xs[t].double(), h)
        h.register_hook(lambda g: g.clamp(-0.01, 0.01))
        h.register_hook(lambda g, t=t: received.__setitem__(t, g))
        loss = loss + (h * w[t].double()).sum()
    loss.backward()
    want = torch.stack([g.norm(dim=-1).mean() for g in received]).float().view(1, 1, T)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ class 3
class Counting(nn.Module):
    """A custom parametrization that counts its evaluations (and scales by 0.9)."""

    calls = 0

    def forward(self, w):
        Counting.calls += 1
        return w * 0.9


def _parametrize(module: nn.Module, name: str, kind: str) -> None:
    if kind == "spectral":
        parametrizations.spectral_norm(module, name)
    elif kind == "weight_norm":
        parametrizations.weight_norm(module, name)
    elif kind == "orthogonal":
        parametrizations.orthogonal(module, name)
    else:
        parametrize.register_parametrization(module, name, Counting())


class CellLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(I, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        state, outs = None, []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outs.append(state[0])
        return self.head(torch.stack(outs)).sum()


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(I, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).sum()


def _train(kind: str, structure: str, watch: str | None):
    torch.manual_seed(3)
    model = CellLoop() if structure == "cell" else Fused()
    target = model.cell if structure == "cell" else model.rnn
    _parametrize(target, "weight_hh" if structure == "cell" else "weight_hh_l0", kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = torch.randn(3, T, B, I)
    mon = gradwatch.Monitor(model, every_n_steps=1) if watch == "monitor" else None
    Counting.calls = 0
    for x in xs:
        if watch == "trace":
            with gradwatch.trace(model) as tr:
                model(x).backward()
            assert tr.report()
        else:
            model(x).backward()
        if mon is not None:
            assert mon.step(opt) is not None
        opt.step()
        opt.zero_grad()
    if mon is not None:
        mon.close()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # _u/_v buffers included
    return state, Counting.calls


@pytest.mark.parametrize("kind", ["spectral", "weight_norm", "orthogonal", "custom"])
@pytest.mark.parametrize("structure", ["fused", "cell"])
@pytest.mark.parametrize("watch", ["trace", "monitor"])
def test_parametrized_weights_train_bit_identically(kind, structure, watch):
    plain, plain_calls = _train(kind, structure, None)
    watched, watched_calls = _train(kind, structure, watch)
    assert plain.keys() == watched.keys()
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k
    assert watched_calls == plain_calls  # gradwatch never evaluates a parametrization


def test_parametrized_fused_values_use_the_weights_of_the_forward():
    torch.manual_seed(4)
    model = Wrap(nn.LSTM(I, H))
    parametrizations.spectral_norm(model.rnn, "weight_hh_l0")
    x = torch.randn(T, B, I)
    loss_fn = fixed_loss(5, T, B, H, H)
    with gradwatch.trace(model) as tr:
        out, (h_n, c_n) = model(x)
        loss_fn(out, h_n, c_n).backward()
    rep = tr.report()
    assert rep["rnn"].exact
    assert_matches(rep["rnn"], reference_stats(model.rnn, x, loss_fn))
