"""Unit probes walked back through a recorded recurrence (the raw data of the propagation).

A unit cotangent is injected on the full recurrent state (``h``, and ``c`` for an LSTM) at
each sequence's last step and carried back through the recurrence only, with the recorded
trajectory's own step Jacobians. What this module returns is raw walk data: ``log`` of the
probe's norm at every state, ``[R, T, B]`` (``R`` probe rounds), relative to its unit start;
`gradwatch._analysis.quantities.propagation` summarises it (curve, gain, horizon).

Two ways to walk, with the same result up to float rounding:

* `walk`: step by step through `Walkable.step_back`, the vector renormalised at every step
  and the log norms accumulated (the QR/Benettin method for Lyapunov exponents with one
  direction), so the attenuation stays exact far below the float range;
* alongside the replay's own backward walk (`gradwatch._capture.recurrences`): the probes
  are extra batch slices of that walk, so they cost no extra operation per step; they are
  renormalised every `BLOCK` steps only, and `fused_logs` turns the stored states into the
  same log norms. Where a block's range is not safe for the dtype (`SAFE_RANGE`) the
  replay walks that layer again step by step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradwatch._capture.raw import Walkable

__all__ = [
    "BLOCK",
    "MIN_PROBES",
    "PROBE_SEED",
    "SAFE_RANGE",
    "SUBSET_FROM",
    "fused_logs",
    "last_steps",
    "probe_rounds",
    "probed_samples",
    "sample_slice",
    "unit_probes",
    "walk",
]

PROBE_SEED = 0x6A0D  # fixed: the probe directions must not consume the global RNG
MIN_PROBES = 8  # at least this many probe vectors in all (samples x rounds)
# A probe walked alongside the replay is renormalised every BLOCK steps. Between two
# renormalisations its norm must stay where the dtype keeps full precision: otherwise the
# layer is walked again step by step (`fused_logs` says so).
BLOCK = 16
# From this state size on, probes are walked on `MIN_PROBES` samples only (`probed_samples`).
SUBSET_FROM = 128
SAFE_RANGE = {torch.float32: 1e25, torch.float64: 1e250}


def probed_samples(batch: int, hidden: int) -> slice:
    """The samples of a batch whose probes are walked: all of them where the walk is
    bound by its number of operations (small states: the probes ride along the replay's
    own walk at no extra operation), else `MIN_PROBES` samples evenly spread over the batch
    (a separate walk: at ``hidden >= SUBSET_FROM`` its matrix products are what costs, and
    probes on every sample would double those of the replay's walk).

    ``from_walk`` finds the same samples from the walked logs' width alone."""
    if hidden < SUBSET_FROM or batch <= MIN_PROBES:
        return slice(None)
    return sample_slice(batch, MIN_PROBES)


def sample_slice(batch: int, count: int) -> slice:
    """``count`` samples evenly spread over ``batch`` (a view: a strided slice)."""
    if count >= batch:
        return slice(None)
    stride = batch // count
    return slice(0, (count - 1) * stride + 1, stride)


def probe_rounds(batch: int) -> int:
    """How many probe vectors per sample: at least `MIN_PROBES` in all."""
    return max(1, math.ceil(MIN_PROBES / max(batch, 1)))


def unit_probes(
    batch: int, sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    """One unit vector per sample and round over the full state, split into its parts:
    ``[R, B, n]`` per part of width ``n``. Drawn from a fixed seed on the host, so the
    global random number generator is untouched and every capture uses the same probes
    (the last few sets are kept: they are the same at every capture of a module)."""
    key = (batch, tuple(sizes), torch.device(device), dtype)
    found = _recent.get(key)
    if found is None:
        found = _draw(batch, sizes, device, dtype)
        if len(_recent) >= 8:
            _recent.pop(next(iter(_recent)))
        _recent[key] = found
    return found


_recent: dict[tuple, list[Tensor]] = {}


def _draw(
    batch: int, sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    gen = torch.Generator().manual_seed(PROBE_SEED)
    rounds: list[list[Tensor]] = []
    for _ in range(probe_rounds(batch)):
        parts = [torch.randn(batch, n, generator=gen, dtype=torch.float64) for n in sizes]
        norm = torch.cat(parts, dim=1).norm(dim=1, keepdim=True)
        rounds.append([p / norm for p in parts])
    return [
        torch.stack([r[i] for r in rounds]).to(device=device, dtype=dtype)
        for i in range(len(sizes))
    ]


def last_steps(reverse: bool, lengths: Tensor, steps: int) -> Tensor:
    """``[T, B]`` bool: each sequence's last state in processing order, where probes start."""
    time = torch.arange(steps, device=lengths.device).unsqueeze(1)
    if reverse:
        return (time == 0).expand(steps, lengths.numel())
    return time == (lengths.to(time.device) - 1).unsqueeze(0)


def walk(rec: Walkable, valid: Tensor | None, last: Tensor, probes: list[Tensor]) -> Tensor:
    """``log`` of the probe norm at every state, ``[R, T, B]``, walking step by step.

    ``valid`` is the ``[T, B]`` mask (``None``: all valid), ``last`` the ``[T, B]`` starts
    (`last_steps`), ``probes`` what `unit_probes` returns.
    """
    rounds = probes[0].shape[0]
    return torch.stack([_walk(rec, valid, last, [p[r] for p in probes]) for r in range(rounds)])


def _walk(rec: Walkable, valid: Tensor | None, last: Tensor, probe: list[Tensor]) -> Tensor:
    if valid is None:
        return _walk_full(rec, probe)
    steps = rec.steps
    valid3 = valid.unsqueeze(-1)
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
        active = valid[t]
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


def renormalise(parts: list[Tensor], log_scale: Tensor) -> None:
    """Divide the probe slices ``parts`` (``[R, B, n]`` each, in place) by their joint norm,
    writing its log into ``log_scale`` ``[R, B]`` (float64). A zero state (a probe that has
    not started yet, or one that died) is left as it is, with a log scale of zero."""
    norms = [torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64) for x in parts]
    norm = norms[0] if len(norms) == 1 else torch.hypot(norms[0], norms[1])
    norm = torch.where(norm > 0, norm, 1.0)
    torch.log(norm, out=log_scale)
    scale = norm.to(parts[0].dtype).unsqueeze(-1)
    for x in parts:
        x.div_(scale)


def fused_logs(
    parts: list[Tensor], log_scale: Tensor, reverse: bool, valid: Tensor | None, last: Tensor
) -> tuple[Tensor, Tensor]:
    """Log norms ``[R, T, B]`` of probes walked alongside the replay, and whether they are
    trustworthy (a device bool).

    ``parts`` are the stored probe states ``[T, R, B, n]`` in time order (block-relative:
    divided by the renormalisations made so far), ``log_scale`` ``[T, R, B]`` the log of
    the renormalisation made just before each state, in visiting order (zero elsewhere),
    ``last`` the ``[T, B]`` starts (`last_steps`): logs are relative to the stored start, so
    they are exactly zero there.
    """
    norms = [torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64) for x in parts]
    norm = norms[0] if len(norms) == 1 else torch.hypot(norms[0], norms[1])
    cumulative = log_scale.cumsum(0)
    if not reverse:  # visiting order is T-1 .. 0
        cumulative = cumulative.flip(0)
    log_norm = norm.log()
    start = last.unsqueeze(1)
    logs = log_norm - torch.where(start, log_norm, 0.0).sum(0) + cumulative
    bound = SAFE_RANGE.get(parts[0].dtype, SAFE_RANGE[torch.float32])
    inside = (norm >= 1 / bound) & (norm <= bound)
    if valid is not None:
        inside = inside | ~valid.unsqueeze(1)
    return logs.transpose(0, 1), inside.all()
