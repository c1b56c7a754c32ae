"""The per-step statistic: per-sample L2 norm over hidden units, then the mean over the batch;
and the evenly spaced steps the fidelity probes and trajectory statistics look at."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAX_SAMPLED_STEPS", "relative_deviation", "sample_norms", "sampled_steps", "step_mean"]

MAX_SAMPLED_STEPS = 32  # trajectory statistics and fidelity probes look at this many steps
_FLAT_UP_TO = 2**16  # `relative_deviation` compares up to this many values in one flat pass


def sample_norms(x: Tensor) -> Tensor:
    """Per-sample L2 norms of ``[..., B, H]`` gradients, shape ``[..., B]``.

    Accumulated in float64: float32 squares overflow at 1e20 and underflow at 1e-23, both
    well inside the range of exploding and vanishing gradients. NaN and Inf propagate.
    """
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64)


def step_mean(norms: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``[..., T, B]`` norms over the batch, counting only valid samples.

    ``valid`` is ``[T, B]`` (``None``: all valid). Invalid entries are excluded with
    ``where``, not multiplied by zero, so a non-finite value there cannot leak in, while a
    non-finite value in a valid entry is reported as such. Returns float32 ``[..., T]``.
    """
    if norms.shape[-1] == 0:  # an empty batch: no sample, nothing measured
        return norms.new_zeros(norms.shape[:-1], dtype=torch.float32)
    if valid is None:
        return norms.mean(dim=-1).float()
    count = valid.sum(dim=-1).clamp_min(1)
    total = torch.where(valid, norms, torch.zeros((), dtype=norms.dtype)).sum(dim=-1)
    return (total / count).float()


def relative_deviation(replayed: list[Tensor], real: list[Tensor]) -> Tensor:
    """Largest deviation of replayed from real values, relative to the largest real value
    over all the compared tensors (one scale, so a state that happens to be near zero does
    not inflate the figure). Matching non-finite values count as equal. A device scalar:
    it reaches the host with the rest of the report, in one copy."""
    pairs = [(a, b) for a, b in zip(replayed, real, strict=True) if b.numel()]
    if len(pairs) > 1 and sum(b.numel() for _, b in pairs) <= _FLAT_UP_TO and _one_kind(pairs):
        # one flat comparison instead of one per tensor (the largest deviation and the
        # largest value over all are the same): at small sizes each operation costs more
        # than its arithmetic (at large sizes, the copies would cost more than they save)
        pairs = [
            (
                torch.cat([a.reshape(-1) for a, _ in pairs]),
                torch.cat([b.reshape(-1) for _, b in pairs]),
            )
        ]
    worst, scale = [], []
    for a, b in pairs:
        same = (a == b) | (a.isnan() & b.isnan())
        diff = torch.where(same, torch.zeros((), dtype=b.dtype, device=b.device), (a - b).abs())
        worst.append(diff.max())
        scale.append(b.abs().nan_to_num(0.0, 0.0, 0.0).max())
    if not worst:
        return torch.zeros(())
    tiny = torch.finfo(torch.float32).tiny
    if len(worst) == 1:
        return worst[0] / scale[0].clamp(min=tiny)
    return torch.stack(worst).max() / torch.stack(scale).max().clamp(min=tiny)


def _one_kind(pairs: list[tuple[Tensor, Tensor]]) -> bool:
    """Whether the compared tensors share dtype, device and (pairwise) shape."""
    a0 = pairs[0][0]
    return all(
        a.shape == b.shape and a.dtype == b.dtype == a0.dtype and a.device == b.device == a0.device
        for a, b in pairs
    )


def sampled_steps(lengths_max: int, device: torch.device) -> Tensor:
    """Evenly spaced timesteps (at most ``MAX_SAMPLED_STEPS``) for trajectory statistics.

    Built on the host from the known length (``unique`` on a device would synchronise)."""
    count = min(lengths_max, MAX_SAMPLED_STEPS)
    steps = sorted({round(i * (lengths_max - 1) / max(count - 1, 1)) for i in range(count)})
    return torch.tensor(steps, dtype=torch.long).to(device)
