"""Pure functions on lists of gradients: norms, in-place scaling, clamping, unit-wise clipping.

Norms are accumulated in float64: an exploding RNN easily has gradient entries of 1e20, whose
squares overflow float32, and a float32 norm of ``inf`` would be mistaken for a non-finite
gradient that can only be skipped, when it can still be clipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "agc_",
    "clamp_",
    "norm_clip_coefficient",
    "percentile",
    "scale_",
    "total_norm",
    "unitwise_norm",
    "zero_",
]


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _by_device_and_dtype(tensors: Iterable[Tensor]) -> dict[tuple, list[Tensor]]:
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _norms(tensors: list[Tensor], norm_type: float, dtype: torch.dtype) -> list[Tensor]:
    try:
        return list(torch._foreach_norm(tensors, norm_type, dtype=dtype))
    except TypeError:  # torch without the dtype argument
        return [torch.linalg.vector_norm(t, norm_type, dtype=dtype) for t in tensors]


@torch.no_grad()
def total_norm(grads: Sequence[Tensor], norm_type: float = 2.0) -> float:
    """The ``norm_type``-norm of all ``grads`` seen as one vector (0.0 for none).

    One host synchronisation: the caller needs a Python number anyway to decide whether to
    skip the step, and a Python float gives every DDP rank bit-identical decisions.
    """
    if not grads:
        return 0.0
    norm_type = float(norm_type)
    first = grads[0].device
    per_tensor: list[Tensor] = []
    for (device, _), group in _by_device_and_dtype(grads).items():
        per_tensor.extend(_norms(group, norm_type, _accumulation_dtype(device)))
    dtype = _accumulation_dtype(first)
    stacked = torch.stack([n.to(device=first, dtype=dtype) for n in per_tensor])
    return float(torch.linalg.vector_norm(stacked, norm_type))


def norm_clip_coefficient(norm: float, max_norm: float) -> float:
    """Pascanu et al. (2013), Alg. 1: scale by ``max_norm / norm`` when ``norm > max_norm``.

    No ``+1e-6`` in the denominator (``clip_grad_norm_`` adds one): ``norm > max_norm >= 0``
    already rules out a division by zero, and the exact ratio is what the paper defines.
    """
    return max_norm / norm if norm > max_norm else 1.0


@torch.no_grad()
def scale_(grads: Sequence[Tensor], coefficient: float) -> None:
    """Multiply every gradient by ``coefficient`` in place."""
    for group in _by_device_and_dtype(grads).values():
        torch._foreach_mul_(group, coefficient)


@torch.no_grad()
def clamp_(grads: Sequence[Tensor], clip_value: float) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` in place."""
    for group in _by_device_and_dtype(grads).values():
        torch._foreach_clamp_min_(group, -clip_value)
        torch._foreach_clamp_max_(group, clip_value)


@torch.no_grad()
def zero_(grads: Sequence[Tensor]) -> None:
    """Set every gradient to zero in place."""
    for group in _by_device_and_dtype(grads).values():
        torch._foreach_zero_(group)


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm per output unit, broadcastable to ``x``, in float64.

    A unit is a slice along dim 0: a row of a Linear or recurrent weight (one gate unit of an
    LSTM's stacked ``weight_hh``), an output channel of a convolution. Vectors and scalars
    (biases, gains) are one unit, as in Brock et al. (2021) and its reference implementations.
    """
    dtype = _accumulation_dtype(x.device)
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, 2, dtype=dtype)
    return torch.linalg.vector_norm(x, 2, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=dtype)


@torch.no_grad()
def agc_(parameters: Sequence[Tensor], clipping: float, eps: float) -> bool:
    """Adaptive gradient clipping (Brock et al. 2021, §4), unit-wise, in place.

    For every unit i: if ``‖G_i‖ > clipping · max(‖W_i‖, eps)``, scale ``G_i`` down to exactly
    that norm. Returns whether any unit was clipped (one host synchronisation).
    """
    smallest: list[Tensor] = []  # per parameter, kept on device until one final sync
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        max_norm = clipping * unitwise_norm(p.detach()).clamp_min(eps)
        coef = (max_norm / unitwise_norm(g)).clamp_max(1.0)  # ‖G_i‖ = 0 gives inf, then 1
        g.mul_(coef.to(g.dtype))
        smallest.append(coef.min())
    if not smallest:
        return False
    first = smallest[0].device
    return float(torch.stack([c.to(first) for c in smallest]).min()) < 1.0


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics.

    The same definition as ``numpy.percentile``'s default, which AutoClip's reference code uses.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty history")
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * fraction
