"""The per-step statistic: per-sample L2 norm over hidden units, then the mean over the batch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_norms", "step_mean"]


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
    if valid is None:
        return norms.mean(dim=-1).float()
    count = valid.sum(dim=-1).clamp_min(1)
    total = torch.where(valid, norms, torch.zeros((), dtype=norms.dtype)).sum(dim=-1)
    return (total / count).float()
