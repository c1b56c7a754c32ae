"""Shared helpers of the ``test_truth_*`` files: small models and the float64 reference.

The reference (tests/reference.py) is evaluated on a plain float64 module built from the
weights the watched module's forward actually used (``_flat_weights``), never on a copy of
the watched module (a copy would carry its hooks and, with parametrizations, re-run them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from reference import reference_unroll
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def plain_twin(rnn: nn.RNNBase, dtype: torch.dtype = torch.float64) -> nn.RNNBase:
    """A plain module of the same configuration holding the weights ``rnn``'s last forward
    read (parametrized or not), in ``dtype``."""
    kw = dict(
        num_layers=rnn.num_layers,
        bias=rnn.bias,
        batch_first=rnn.batch_first,
        bidirectional=rnn.bidirectional,
    )
    if rnn.mode == "LSTM":
        twin: nn.RNNBase = nn.LSTM(rnn.input_size, rnn.hidden_size, proj_size=rnn.proj_size, **kw)
    elif rnn.mode == "GRU":
        twin = nn.GRU(rnn.input_size, rnn.hidden_size, **kw)
    else:
        nl = "relu" if rnn.mode == "RNN_RELU" else "tanh"
        twin = nn.RNN(rnn.input_size, rnn.hidden_size, nonlinearity=nl, **kw)
    with torch.no_grad():
        for name, w in zip(rnn._flat_weights_names, rnn._flat_weights, strict=True):
            getattr(twin, name).copy_(w.detach())
    return twin.to(dtype)


def reference_stats(rnn: nn.RNNBase, x: Tensor, loss_fn: LossFn, hx=None, on_output=None):
    """Exact float64 ``total``/``direct``/``carried``/``cell_total`` of one call of ``rnn``
    on ``x`` under ``loss_fn(output, h_n, c_n)``; ``on_output(output, h_n, c_n)`` may
    register the same gradient hooks the test registers on the real outputs."""
    twin = plain_twin(rnn)
    x64 = x.detach().double()
    hx64 = None
    if hx is not None:
        hx64 = tuple(h.detach().double() for h in hx) if isinstance(hx, tuple) else hx.double()
    ref = reference_unroll(twin, x64, hx=hx64)
    if on_output is not None:
        on_output(ref.output, ref.h_n, ref.c_n)
    loss_fn(ref.output, ref.h_n, ref.c_n).backward()
    return ref.stats()


def assert_matches(module_report, want: dict, fields=("total", "direct", "carried")) -> None:
    """Every statistic within 1e-4 relative of the reference (exact up to float32)."""
    for f in fields:
        got, exp = getattr(module_report, f), want[f].float()
        scale = max(float(exp.abs().max()), 1e-30)
        err = float((got - exp).abs().max()) / scale
        assert err <= 1e-4, f"{module_report.name}.{f}: relative error {err:.2e}"


def fixed_loss(seed: int, steps: int, batch: int, width: int, state_width: int) -> LossFn:
    """A loss that weighs every output step and the final state differently (so that every
    timestep has its own gradient), identical in float32 and float64."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(steps, batch, width, generator=g)
    w_h = torch.randn(1, batch, state_width, generator=g)

    def loss(out: Tensor, h_n: Tensor, c_n: Tensor | None) -> Tensor:
        value = (out * w_out.to(out.dtype)).sum() + (h_n[-1:] * w_h.to(h_n.dtype)).sum()
        return value

    return loss


class Wrap(nn.Module):
    """A model whose only recurrent module is ``rnn`` (the root then gets a forward pre-hook,
    as every real model does)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx=None):
        return self.rnn(x, hx)


def gradwatch_hooks(model: nn.Module) -> int:
    """How many module hooks are registered on ``model`` and its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
