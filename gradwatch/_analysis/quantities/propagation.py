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

from gradwatch._capture.probes import (
    MIN_PROBES,
    PROBE_SEED,
    last_steps,
    sample_slice,
    unit_probes,
    walk,
)
from gradwatch._capture.raw import Walkable

__all__ = ["Propagation", "actual_gain", "from_walk", "propagate", "summarise"]

HORIZON_LEVEL = 0.01  # "falls below 1% of its start"
_PROBE_SEED = PROBE_SEED  # the probes are drawn by capture (`gradwatch._capture.probes`)
_MIN_PROBES = MIN_PROBES


@dataclass
class Propagation:
    """Device tensors of one layer/direction (natural logs)."""

    curve: Tensor  # [T] mean log a(k); NaN where no sample reaches k
    gain: Tensor  # []
    horizon: Tensor  # []
    efold: Tensor  # []
    log_attenuation: Tensor  # [] mean over samples of log a over the whole sequence


def propagate(
    rec: Walkable, valid: Tensor | None, lengths: Tensor, state_sizes: tuple[int, ...]
) -> Propagation:
    """Propagation curve and summary numbers of one recorded layer/direction, walking it.

    ``valid`` is the ``[T, B]`` mask (``None``: all valid), ``lengths`` the ``[B]`` sequence
    lengths, ``state_sizes`` the widths of the state parts (``(P,)``, or ``(P, H)`` for LSTM).
    """
    device, dtype = rec.weight.device, rec.weight.dtype
    lengths = lengths.to(device)
    probes = unit_probes(lengths.numel(), state_sizes, device, dtype)
    logs = walk(rec, valid, last_steps(rec.reverse, lengths, rec.steps), probes)
    return from_walk(logs, rec.reverse, lengths)


def from_walk(logs: Tensor, reverse: bool, lengths: Tensor) -> Propagation:
    """Propagation from walked probes: ``logs`` ``[R, T, B]``, the log norm at every state
    (`gradwatch._capture.probes`), ``lengths`` the ``[B]`` sequence lengths."""
    steps, batch = logs.shape[1], logs.shape[2]
    if batch != lengths.numel():  # probes walked on a few samples (`probed_samples`)
        lengths = lengths[sample_slice(lengths.numel(), batch)]
    lengths = lengths.to(logs.device)
    time = torch.arange(steps, device=logs.device).unsqueeze(1)
    # the index of the state k steps back from each sequence's end, in processing order
    back = (lengths.unsqueeze(0) - 1 - time).clamp(min=0)
    index = time.expand(steps, batch) if reverse else back
    reach = time < lengths.unsqueeze(0)  # [K, B]: sample b reaches k steps back
    per_sample = torch.gather(logs, 1, index.unsqueeze(0).expand(logs.shape[0], -1, -1))
    return summarise(per_sample.mean(0), reach, lengths)


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
