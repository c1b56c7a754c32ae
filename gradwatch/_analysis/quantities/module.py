"""All diagnostic quantities of one module call, computed on device, moved to the host once.

Everything below is built from device tensors without reading any value back; the results
of all layers and directions are concatenated into one buffer and transferred in a single
copy (one host synchronisation per report on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch._analysis.quantities.causes import sampled_steps, trajectory_causes, weight_causes
from gradwatch._analysis.quantities.propagation import (
    HORIZON_LEVEL,
    actual_gain,
    from_walk,
    propagate,
)
from gradwatch._capture.raw import Walkable

__all__ = [
    "QuantityOptions",
    "estimated_from_actual",
    "fused_quantities",
    "stepwise_quantities",
    "to_host",
]


@dataclass(frozen=True)
class QuantityOptions:
    """What to compute. ``causes=False`` skips weight norms and trajectory statistics."""

    propagation: bool = True
    causes: bool = True


def to_host(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Move a dict of device tensors to the CPU as float32, in one copy."""
    if not values:
        return {}
    keys = list(values)
    # one concatenation (it promotes float32 to float64 exactly where both are present)
    flat = torch.cat([values[k].reshape(-1) for k in keys]).detach()
    if not flat.is_floating_point():  # integer counts: through float64, as before
        flat = flat.to(torch.float64)
    flat = flat.cpu()
    parts = flat.to(torch.float32).split([values[k].numel() for k in keys])
    return {k: p.view(values[k].shape) for k, p in zip(keys, parts, strict=True)}


def _grid(
    items: dict[tuple[int, int], dict[str, Tensor]], layers: int, dirs: int
) -> dict[str, Tensor]:
    """{(l, d): {name: scalar or [T]}} -> {name: [L, D] or [L, D, T]} (device tensors, in
    their own dtype: `to_host` promotes them all to one in its single concatenation)."""
    names = list(dict.fromkeys(k for v in items.values() for k in v))
    order = [(layer, d) for layer in range(layers) for d in range(dirs)]
    out = {}
    for name in names:
        cells = [items[key][name] for key in order]
        if len(cells) == 1:
            out[name] = cells[0].reshape(1, 1, *cells[0].shape)
            continue
        stacked = torch.stack(cells)  # promotes mixed dtypes exactly, as `to_host` does
        out[name] = stacked.view(layers, dirs, *stacked.shape[1:])
    return out


def fused_quantities(
    recurrences: dict[tuple[int, int], Walkable],
    valid: Tensor | None,
    lengths: Tensor,
    stats: dict[str, Tensor],
    keys: dict[tuple[int, int], Tensor],
    options: QuantityOptions = QuantityOptions(),
    walked: dict[tuple[int, int], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Propagation, summary numbers and causes of every layer/direction of a recorded call.

    ``stats`` are the per-step statistics (device ``[L, D, T]``) of the capture, ``keys`` the
    module's recurrent weight parameters (warm-start keys for the power iterations),
    ``walked`` the probes the capture already walked back (``[R, T, B]`` log norms per
    layer/direction; the others are walked here).
    Returns device tensors (see `to_host`): ``propagation`` ``[L, D, T]`` (log10),
    and ``[L, D]`` tensors ``gain``, ``horizon``, ``efold``, ``log10_attenuation``,
    ``actual_gain`` and the cause fields (``weight_norm``, ..., ``gate_mean/<gate>``, ...).
    """
    layers = 1 + max(k[0] for k in recurrences)
    dirs = 1 + max(k[1] for k in recurrences)
    steps = int(stats["total"].shape[-1])
    lengths = lengths.to(stats["total"].device)
    state_total = stats["total"]
    if "cell_total" in stats:
        state_total = torch.hypot(state_total, stats["cell_total"])
    sample = sampled_steps(steps, lengths.device) if steps else None
    per: dict[tuple[int, int], dict[str, Tensor]] = {}
    curves: dict[tuple[int, int], dict[str, Tensor]] = {}
    for (layer, d), rec in recurrences.items():
        carried = stats["carried"][layer, d]
        values = {"actual_gain": actual_gain(carried, state_total[layer, d], rec.reverse)}
        if options.propagation and steps:
            logs = None if walked is None else walked.get((layer, d))
            if logs is not None:
                prop = from_walk(logs, rec.reverse, lengths)
            else:
                prop = propagate(rec, valid, lengths, rec.state_sizes)
            values.update(
                gain=prop.gain,
                horizon=prop.horizon,
                efold=prop.efold,
                log10_attenuation=prop.log_attenuation / math.log(10),
            )
            curves[layer, d] = {"propagation": prop.curve / math.log(10)}
        if options.causes and sample is not None:
            values.update(weight_causes(rec, keys.get((layer, d))))
            values.update(trajectory_causes(rec, valid, sample))
        per[layer, d] = values
    out = _grid(per, layers, dirs)
    if curves:
        out.update(_grid(curves, layers, dirs))
    return out


def stepwise_quantities(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Quantities of a sequence measured by hooks where no step Jacobian is available
    (marked states): the loss-weighted per-step factor only (device tensors [1, 1])."""
    state_total = stats["total"][0, 0]
    if stats.get("cell_total") is not None:
        state_total = torch.hypot(state_total, stats["cell_total"][0, 0])
    value = actual_gain(stats["carried"][0, 0], state_total, reverse=False)
    return {"actual_gain": value.view(1, 1)}


def estimated_from_actual(q: dict[str, Tensor], seq_len: int) -> dict[str, Tensor]:
    """Without a step Jacobian (hooks on an unknown recurrence): gain and horizon estimated
    from the actual gradient's per-step factor (``carried[t] / total[t+1]``), host tensors."""
    g = q["actual_gain"].double()
    log_g = g.log()
    horizon = torch.where(log_g < 0, math.log(HORIZON_LEVEL) / log_g, math.inf)
    return {
        "gain": g.float(),
        "horizon": horizon.float(),
        "efold": (1 / log_g.abs()).float(),
        "log10_attenuation": (log_g * max(seq_len - 1, 0) / math.log(10)).float(),
    }
