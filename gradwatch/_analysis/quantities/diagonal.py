"""Propagation and causes of a diagonal linear recurrence ``h_t = a_t ⊙ h_{t-1} + u_t``.

The one-step Jacobian is ``diag(a_t)``, so walking a unit cotangent back ``k`` steps from the
last state multiplies it elementwise by ``a_{T-1} ⊙ ... ⊙ a_{T-k}``. The curve, gain and
horizon are the ones `gradwatch._analysis.quantities.propagation` defines for every
recurrence (same probes, same renormalised log accumulation, same summary), computed here in
closed form: a reversed cumulative sum of ``log|a_t|`` per state coordinate, then the log norm
of the probe scaled by it, with no loop over time and no replay.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradwatch._analysis.quantities.module import QuantityOptions
from gradwatch._analysis.quantities.propagation import (
    _MIN_PROBES,
    _PROBE_SEED,
    Propagation,
    actual_gain,
    summarise,
)
from gradwatch._capture.raw import Transition

__all__ = [
    "NEAR_ONE",
    "NEAR_ZERO",
    "diagonal_log_curve",
    "diagonal_propagation",
    "transition_causes",
    "transition_quantities",
]

NEAR_ZERO = 0.1  # |a_t| below this forgets the state within one step
NEAR_ONE = 0.99  # |a_t| above this keeps 1% of a gradient for more than ~460 steps
_CHUNK_ELEMENTS = 1 << 22  # float64 elements per block of the cumulative sum (32 MiB)


def diagonal_log_curve(log_abs_a: Tensor, probe: Tensor) -> Tensor:
    """``log ||(a_{T-1} ⊙ ... ⊙ a_{T-k}) ⊙ v||`` for ``k = 0 .. T-1``, shape ``[T, B]``.

    ``log_abs_a`` is ``[B, T, S]`` (natural log of ``|a_t|``, ``-inf`` where ``a_t = 0``),
    ``probe`` the unit vectors ``v`` ``[B, S]``. Accumulated in float64, in blocks of time so
    that a wide state (Mamba's ``D * N``) never needs a ``[B, T, S]`` float64 buffer at once.
    """
    batch, steps, size = log_abs_a.shape
    log_v = probe.double().abs().log()  # -inf for zero entries: they contribute nothing
    out = log_abs_a.new_empty(steps, batch, dtype=torch.float64)
    out[0] = torch.logsumexp(2 * log_v, dim=-1) / 2
    block = max(1, _CHUNK_ELEMENTS // max(1, batch * size))
    carry = torch.zeros(batch, size, dtype=torch.float64, device=log_abs_a.device)
    k = 1  # out[k] uses a_{T-1} .. a_{T-k}
    while k < steps:
        stop = min(steps, k + block)
        # out[j] for j in [k, stop) adds a_{T-j}: a_{T-k} .. a_{T-stop+1}, in walking order
        part = log_abs_a[:, steps - stop + 1 : steps - k + 1].double().flip(1)
        cum = part.cumsum(1) + carry.unsqueeze(1)
        # an a_t = 0 gives -inf; (-inf) + (+inf) cannot occur since |a| is finite here
        out[k:stop] = (torch.logsumexp(2 * (cum + log_v.unsqueeze(1)), dim=-1) / 2).t()
        carry = cum[:, -1]
        k = stop
    return out


def _right_aligned(log_abs_a: Tensor, lengths: Tensor) -> Tensor:
    """Each sample's covered steps moved to the end (``[B, T, S]``, zeros in front), so that
    walking back from step ``T - 1`` walks back from the sample's own last step."""
    steps = log_abs_a.shape[1]
    time = torch.arange(steps, device=log_abs_a.device).unsqueeze(0)
    source = time - (steps - lengths.unsqueeze(1))  # [B, T]: original step, < 0 in front
    picked = log_abs_a.gather(1, source.clamp(min=0).unsqueeze(-1).expand_as(log_abs_a))
    return torch.where((source >= 0).unsqueeze(-1), picked, torch.zeros_like(picked))


def diagonal_propagation(log_abs_a: Tensor, lengths: Tensor | None = None) -> Propagation:
    """Curve, gain, horizon and e-fold time of one diagonal scan (``[B, T, S]`` log|a|).

    ``lengths`` (``[B]``; ``None``: every sample covers every step) starts each sample's walk
    at its own last step, as `propagate` does for packed sequences. The probes are those of
    `propagate`: per round, one standard normal vector per sample from the fixed seed,
    normalised; the per-sample curves are averaged over rounds (at least eight in all).
    """
    batch, steps, size = log_abs_a.shape
    device = log_abs_a.device
    if lengths is not None:
        log_abs_a = _right_aligned(log_abs_a, lengths)
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    rounds = max(1, math.ceil(_MIN_PROBES / batch))
    curves = []
    for _ in range(rounds):
        v = torch.randn(batch, size, generator=gen, dtype=torch.float64)
        v = (v / v.norm(dim=1, keepdim=True)).to(device)
        curves.append(diagonal_log_curve(log_abs_a, v))
    log_a = torch.stack(curves).mean(0)
    if lengths is None:
        lengths = torch.full((batch,), steps, device=device)
    reach = torch.arange(steps, device=device).unsqueeze(1) < lengths.unsqueeze(0)  # [K, B]
    return summarise(log_a, reach, lengths)


def _mean(x: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean of ``x``, or its mean weighted by ``weight`` (``[B, T]`` 0/1: the covered steps,
    broadcast over the rest); NaN when nothing is counted."""
    x = x.double()
    if weight is None:
        return x.mean() if x.numel() else torch.full((), math.nan, dtype=torch.float64)
    w = weight.double().view(*weight.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return (x * w).sum() / w.sum()  # 0/0 = NaN when no step is covered


def transition_causes(
    abs_a: Tensor,
    step: Tensor | None = None,
    input_gate: Tensor | None = None,
    covered: Tensor | None = None,
) -> dict[str, Tensor]:
    """The repeated factor of a diagonal scan, summarised over batch, time and state.

    ``transition/mean`` and ``transition/spread`` (standard deviation) of ``|a_t|``, the
    fractions ``transition/near_zero`` (``< 0.1``), ``transition/near_one`` (``> 0.99``) and
    ``transition/above_one`` (``> 1``: growth), and, where the model has them, the mean step
    size ``transition/step_size`` (Mamba's Δ) and the mean input gate ``transition/input_gate``.
    ``covered`` (``[B, T]`` bool) leaves out the steps past each sample's end; ``step`` and
    ``input_gate`` are then ``[B, T, *]`` too. Scalar float64 device tensors.
    """
    a = abs_a.double()
    mean = _mean(a, covered)
    if covered is None:
        spread = a.std(unbiased=False) if a.numel() else mean
    else:
        spread = _mean((a - mean).square(), covered).sqrt()
    out = {
        "transition/mean": mean,
        "transition/spread": spread,
        "transition/near_zero": _mean(a < NEAR_ZERO, covered),
        "transition/near_one": _mean(a > NEAR_ONE, covered),
        "transition/above_one": _mean(a > 1, covered),
    }
    if step is not None:
        out["transition/step_size"] = _mean(step, covered)
    if input_gate is not None:
        out["transition/input_gate"] = _mean(input_gate, covered)
    return out


def _on(lengths: Tensor | None, like: Tensor) -> Tensor | None:
    return None if lengths is None else lengths.to(like.device)


def _propagation(log_abs: Tensor, lengths: Tensor | None) -> Propagation:
    """`diagonal_propagation` over the steps some sample covers (``lengths`` on the CPU: the
    longest is known without a device synchronisation); the curve is NaN past them (no
    sample reaches that far back), like the per-step statistics are zero there."""
    if lengths is None:
        return diagonal_propagation(log_abs)
    steps = log_abs.shape[1]
    longest = min(int(lengths.max()), steps) if lengths.numel() else 0
    if longest == 0:
        nan = torch.full((), math.nan, dtype=torch.float64, device=log_abs.device)
        return Propagation(nan.expand(steps).clone(), nan, nan, nan, nan)
    prop = diagonal_propagation(log_abs[:, :longest], _on(lengths, log_abs))
    tail = prop.curve.new_full((steps - longest,), math.nan)
    prop.curve = torch.cat([prop.curve, tail])
    return prop


def transition_quantities(
    transition: Transition, stats: dict[str, Tensor], options: QuantityOptions
) -> dict[str, Tensor]:
    """Every quantity of one diagonal scan (device tensors, ``[1, 1]`` or ``[1, 1, T]``):
    the actual gain from the hooked statistics, the propagation from ``a`` in closed form
    (``propagation`` in log10, ``gain``, ``horizon``, ``efold``, ``log10_attenuation``) and
    the ``transition/*`` causes."""
    out = {
        "actual_gain": actual_gain(stats["carried"][0, 0], stats["total"][0, 0], False).view(1, 1)
    }
    log_abs, lengths = transition.log_abs_a, _on(transition.lengths, transition.log_abs_a)
    if options.propagation and log_abs.shape[1]:
        prop = _propagation(log_abs, transition.lengths)
        out.update(
            propagation=(prop.curve / math.log(10)).view(1, 1, -1),
            gain=prop.gain.view(1, 1),
            horizon=prop.horizon.view(1, 1),
            efold=prop.efold.view(1, 1),
            log10_attenuation=(prop.log_attenuation / math.log(10)).view(1, 1),
        )
    if options.causes:
        covered = None
        if lengths is not None:
            time = torch.arange(log_abs.shape[1], device=log_abs.device)
            covered = time.unsqueeze(0) < lengths.unsqueeze(1)
        gate = transition.input_gate
        causes = transition_causes(log_abs.exp(), transition.step, gate, covered)
        out.update({k: v.view(1, 1) for k, v in causes.items()})
    return out
