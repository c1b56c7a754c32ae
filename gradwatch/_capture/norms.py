"""L2 norms of many gradients at once, for the cheap per-step signals.

One ``torch._foreach_norm`` call for all the tensors of a step instead of one reduction
each: on a small model the per-call overhead of a reduction is most of its cost.

- On the host (CPU tensors, where reading a value costs nothing) the norms are accumulated
  in float32: a float64 norm on the CPU first converts the whole tensor and costs about 3x
  as much. A norm outside [1e-10, 1e18], where float32 squares may have overflowed or
  underflowed, is redone in float64; relative error about 1e-7 * sqrt(numel) otherwise.
- On an accelerator they are accumulated in float64 (``dtype=torch.float64``: the
  multi-tensor kernel accumulates in the output's precision) and stay there: nothing is
  read on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["device_norms", "host_norms"]

_F32_RANGE = (1e-10, 1e18)  # where a float32 sum of squares is safe


def host_norms(tensors: list[Tensor]) -> list[float]:
    """The L2 norm of each CPU tensor, as Python floats."""
    if not tensors:
        return []
    f64 = [t.dtype == torch.float64 for t in tensors]
    if any(f64):
        return _host_norms_mixed(tensors, f64)
    low = any(t.dtype != torch.float32 for t in tensors)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32 if low else None)
    values = [n.item() for n in norms]  # cheaper than stacking them to read them at once
    lo, hi = _F32_RANGE
    for k, v in enumerate(values):
        if not lo <= v <= hi:  # may have overflowed or underflowed: redo in float64
            values[k] = float(torch.linalg.vector_norm(tensors[k], dtype=torch.float64))
    return values


def _host_norms_mixed(tensors: list[Tensor], f64: list[bool]) -> list[float]:
    """`host_norms` of a list holding float64 tensors (computed in float64) and others."""
    narrow = host_norms([t for t, wide in zip(tensors, f64, strict=True) if not wide])
    wide = torch._foreach_norm([t for t, w in zip(tensors, f64, strict=True) if w])
    wide_values = [n.item() for n in wide]
    out = []
    for w in f64:
        out.append(wide_values.pop(0) if w else narrow.pop(0))
    return out


def device_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """The L2 norm of each tensor, a float64 ``[len(tensors)]`` tensor on ``device``; no
    host synchronisation."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    if any(n.device != device for n in norms):  # a model spread over devices
        norms = [n.to(device) for n in norms]
    return torch.stack(norms)
