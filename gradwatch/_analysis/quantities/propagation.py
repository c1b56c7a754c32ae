"""How a gradient propagates back through the recurrence, independent of where the loss is.

A unit cotangent is injected on the full recurrent state (``h``, and ``c`` for LSTM) at each
sequence's last step and carried back through the recurrence only, step by step, with the
recorded trajectory's own step Jacobians (`Walkable.step_back`). The vector is
renormalised at every step and the logarithms of the norms are accumulated, as the QR
(Benettin) method for Lyapunov exponents does with one direction: the attenuation stays
exact far below the float range (gain 0.3 over 500 steps is ~1e-261).

Definitions (per layer and direction; ``a(k)`` is the attenuation after ``k`` steps back):

* curve ``log a(k)``: mean over samples (and probe directions) of the log norm ratio;
* ``gain``: the geometric-mean per-step factor, ``exp(sum_b (log a_b(K_b) - log a_b(1)) /
  sum_b (K_b - 1))``; the first step is left out as a transient (the probe starts in an
  arbitrary direction and lands in the reachable subspace after one step: for an LSTM with
  ``W_hh = 0`` the ``h`` part of the probe is gone after one step and every later step
  multiplies by exactly the forget gate);
* ``horizon``: steps until ``a(k)`` falls below 1%, interpolated in log space between the two
  steps around the crossing; when the sequence ends first, extrapolated with the gain
  (``inf`` when the gain is >= 1);
* ``efold``: ``1 / |ln gain|``, steps for one factor ``e`` of decay or growth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch._capture.raw import Walkable

__all__ = ["Propagation", "actual_gain", "propagate", "summarise"]

HORIZON_LEVEL = 0.01  # "falls below 1% of its start"
_PROBE_SEED = 0x6A0D  # fixed: the probe directions must not consume the global RNG
_MIN_PROBES = 8  # at least this many probe vectors in all (samples x rounds)


@dataclass
class Propagation:
    """Device tensors of one layer/direction (natural logs)."""

    curve: Tensor  # [T] mean log a(k); NaN where no sample reaches k
    gain: Tensor  # []
    horizon: Tensor  # []
    efold: Tensor  # []
    log_attenuation: Tensor  # [] mean over samples of log a over the whole sequence


def _walk(rec: Walkable, valid: Tensor | None, last: Tensor, probe: list[Tensor]) -> Tensor:
    """log ||v|| at every state ``h_t`` (``[T, B]``), the probe injected where ``last``."""
    if valid is None:
        return _walk_full(rec, probe)
    steps = rec.steps
    valid3 = None if valid is None else valid.unsqueeze(-1)
    acc = probe[0].new_zeros(probe[0].shape[0], dtype=torch.float64)
    v = [torch.zeros_like(p) for p in probe]
    logs = acc.new_empty(steps, acc.shape[0])
    for t in reversed(rec.order(steps)):
        start = last[t]
        v = [torch.where(start.unsqueeze(-1), p, x) for p, x in zip(probe, v, strict=True)]
        acc = torch.where(start, torch.zeros_like(acc), acc)
        logs[t] = acc
        dc = v[1] if len(v) > 1 else None
        _, dh_prev, dc_prev, _ = rec.step_back(t, v[0], dc, valid3)
        new = [dh_prev] if dc_prev is None else [dh_prev, dc_prev]
        sq = sum(x.double().square().sum(-1) for x in new)
        norm = sq.sqrt()
        active = torch.ones_like(start) if valid is None else valid[t]
        acc = torch.where(active, acc + norm.log(), acc)
        scale = torch.where(norm > 0, norm, torch.ones_like(norm)).to(new[0].dtype).unsqueeze(-1)
        v = [
            torch.where(active.unsqueeze(-1), x / scale, old) for x, old in zip(new, v, strict=True)
        ]
    return logs


def _walk_full(rec: Walkable, probe: list[Tensor]) -> Tensor:
    """`_walk` when every sequence covers every step: all probes start at the first
    visited step, so no masking is needed; the per-step log norms are summed afterwards."""
    steps = rec.steps
    visit = list(reversed(rec.order(steps)))
    log_norms = probe[0].new_zeros(steps, probe[0].shape[0], dtype=torch.float64)
    v = list(probe)
    tiny = torch.finfo(v[0].dtype).tiny
    for n, t in enumerate(visit[:-1]):
        _, dh_prev, dc_prev, _ = rec.step_back(t, v[0], v[1] if len(v) > 1 else None, None)
        new = [dh_prev] if dc_prev is None else [dh_prev, dc_prev]
        norms = [torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64) for x in new]
        norm = norms[0] if len(norms) == 1 else torch.hypot(norms[0], norms[1])
        torch.log(norm, out=log_norms[n + 1])
        scale = norm.to(new[0].dtype).clamp_(min=tiny).unsqueeze(-1)
        v = [x / scale for x in new]
    cumulative = log_norms.cumsum(0)  # in visiting order: log a(k) at visit[k]
    logs = torch.empty_like(cumulative)
    logs[torch.tensor(visit, device=logs.device)] = cumulative
    return logs


def propagate(
    rec: Walkable, valid: Tensor | None, lengths: Tensor, state_sizes: tuple[int, ...]
) -> Propagation:
    """Propagation curve and summary numbers of one replayed layer/direction.

    ``valid`` is the ``[T, B]`` mask (``None``: all valid), ``lengths`` the ``[B]`` sequence
    lengths, ``state_sizes`` the widths of the state parts (``(P,)``, or ``(P, H)`` for LSTM).
    """
    steps = rec.steps
    device, dtype = rec.weight.device, rec.weight.dtype
    batch = lengths.numel()
    lengths = lengths.to(device)
    time = torch.arange(steps, device=device).unsqueeze(1)
    # the state each sequence ends on, in processing order, and the index of k steps back
    if rec.reverse:
        last = time == 0
        index = time.expand(steps, batch)
    else:
        last = time == (lengths - 1).unsqueeze(0)
        index = (lengths.unsqueeze(0) - 1 - time).clamp(min=0)
    reach = time < lengths.unsqueeze(0)  # [K, B]: sample b reaches k steps back
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    rounds = max(1, math.ceil(_MIN_PROBES / batch))
    per_sample = []
    for _ in range(rounds):
        parts = [torch.randn(batch, n, generator=gen, dtype=torch.float64) for n in state_sizes]
        norm = torch.cat(parts, dim=1).norm(dim=1, keepdim=True)
        probe = [(p / norm).to(device=device, dtype=dtype) for p in parts]
        logs = _walk(rec, valid, last, probe)
        per_sample.append(torch.gather(logs, 0, index))  # [K, B]: log a_b(k)
    log_a = torch.stack(per_sample).mean(0)
    return summarise(log_a, reach, lengths)


def summarise(log_a: Tensor, reach: Tensor, lengths: Tensor) -> Propagation:
    """Curve and summary numbers from per-sample curves ``log_a`` [K, B] (natural log)."""
    count = reach.sum(1)
    masked = torch.where(reach, log_a, torch.zeros_like(log_a))
    curve = masked.sum(1) / count
    curve = torch.where(count > 0, curve, torch.full_like(curve, math.nan))
    end = (lengths - 1).clamp(min=0).unsqueeze(0)
    final = torch.gather(log_a, 0, end).squeeze(0)  # log a_b over the whole sequence
    log_attenuation = final.mean()

    # gain: per-step slope after the first (transient) step, pooled over samples
    longest = int(log_a.shape[0])
    burn = 1 if longest >= 3 else 0
    first = log_a[burn].unsqueeze(0).squeeze(0)
    span = (lengths - 1 - burn).to(log_a.dtype)
    use = span > 0
    rise = torch.where(use, final - first, torch.zeros_like(final)).sum()
    run = torch.where(use, span, torch.zeros_like(span)).sum()
    log_gain = torch.where(run > 0, rise / run.clamp(min=1), torch.full_like(rise, math.nan))
    gain = log_gain.exp()
    efold = 1.0 / log_gain.abs()
    horizon = _horizon(curve, log_gain)
    return Propagation(curve, gain, horizon, efold, log_attenuation)


def _horizon(curve: Tensor, log_gain: Tensor) -> Tensor:
    """Steps until the curve crosses ``log(HORIZON_LEVEL)``; extrapolated past the end.

    Only tensor operations (indices stay on the device): no host synchronisation.
    """
    level = math.log(HORIZON_LEVEL)
    steps = curve.numel()
    known = torch.isfinite(curve) | (curve == -math.inf)
    below = (curve < level) & known
    k = torch.arange(steps, device=curve.device, dtype=curve.dtype)
    big = torch.full_like(k, math.inf)
    first_below = torch.where(below, k, big).min()

    def at(i: Tensor) -> Tensor:
        return curve.gather(0, i.long().clamp(0, steps - 1).view(1)).squeeze(0)

    # interpolate between the step before the crossing and the crossing
    i = first_below.clamp(min=1, max=max(steps - 1, 1))
    before, after = at(i - 1), at(i)
    frac = ((before - level) / (before - after)).nan_to_num(1.0).clamp(0, 1)
    crossed = i - 1 + frac
    # otherwise extrapolate from the last finite step with the gain
    last_k = torch.where(torch.isfinite(curve), k, -big).max().clamp(min=0)
    ahead = (level - at(last_k)) / log_gain
    extrapolated = torch.where(log_gain < 0, last_k + ahead, torch.full_like(ahead, math.inf))
    horizon = torch.where(first_below.isfinite(), crossed, extrapolated)
    undefined = (curve.isnan().any() | log_gain.isnan()) & ~below.any()
    return torch.where(undefined, torch.full_like(horizon, math.nan), horizon)


def actual_gain(carried: Tensor, state_total: Tensor, reverse: bool) -> Tensor:
    """Loss-weighted per-step factor: geometric mean of ``carried[t] / total[t+1]``.

    ``carried`` and ``state_total`` are per-step batch-mean norms ``[T]``; the neighbour is
    ``t+1`` (``t-1`` for the reverse direction). Steps where either is zero are left out.
    """
    if reverse:
        carried, state_total = carried.flip(0), state_total.flip(0)
    ratio_num, ratio_den = carried[:-1], state_total[1:]
    ok = (ratio_num > 0) & (ratio_den > 0)
    logs = torch.where(ok, ratio_num.double().log() - ratio_den.double().log(), 0.0)
    n = ok.sum()
    value = (logs.sum() / n.clamp(min=1)).exp()
    bad = ~(torch.isfinite(carried).all() & torch.isfinite(state_total).all())
    value = torch.where(bad, torch.full_like(value, math.nan), value)
    return torch.where(n > 0, value, torch.full_like(value, math.nan))
