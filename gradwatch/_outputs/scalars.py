"""Flatten a report into scalar tags that any logger can take (TensorBoard, CSV, W&B, MLflow).

Tag scheme (stable; documented in docs/panels.md):

```text
gradwatch/<module>/l<layer>d<direction>/<metric>   per layer and direction
gradwatch/<module>/<metric>                        per module call
gradwatch/clip/<metric>                            clipping events (global)
gradwatch/step/<metric>                            per-step signals (global)
gradwatch/overhead                                 gradwatch's own time / training time
```

``<module>`` is the report's call name made safe for every logger: characters outside
``[A-Za-z0-9_.:-]`` become ``_`` and the call suffix ``#k`` becomes ``:k``
(``"encoder.rnn#1"`` -> ``"encoder.rnn:1"``), so every tag has the same depth and the
dashboard's regular expressions stay simple. Values are plain floats; non-finite values are
kept as they are (a NaN gain is a finding, not an error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from gradwatch._analysis.report import ModuleReport, Report
from gradwatch._base.vocabulary import GATED_KINDS
from gradwatch._clipping.clipper import ClipEvent
from gradwatch._engine.budget import Overhead
from gradwatch._engine.signals import StepSignals

# The tag scheme lives in a torch-free module so that `gradwatch report` can read it.
from gradwatch._outputs.tags import (
    OVERHEAD_METRIC,
    PREFIX,
    VERDICT_CODES,
    layer_tag,
    module_tag,
    safe_name,
)

__all__ = [
    "PREFIX",
    "VERDICT_CODES",
    "clip_scalars",
    "layer_tag",
    "module_scalars",
    "module_tag",
    "overhead_scalars",
    "param_grad_scalars",
    "profile_stats",
    "safe_name",
    "scalars_for",
    "signal_scalars",
]


def clip_scalars(event: ClipEvent | Mapping[str, float], prefix: str = PREFIX) -> dict[str, float]:
    """``gradwatch/clip/*`` tags for one clipping event (a `ClipEvent` or a mapping).

    A mapping is taken key by key, so a caller may report extra fields (``"z_score"``...).
    """
    if isinstance(event, ClipEvent):
        fields: dict[str, float] = {
            "pre_norm": event.total_norm,
            "threshold": math.nan if event.threshold is None else event.threshold,
            "coefficient": event.coefficient,
            "clipped": float(event.clipped),
            "skipped": float(event.skip_step),
        }
    else:
        fields = dict(event)
        if "clipped" not in fields and "coefficient" in fields:
            fields["clipped"] = float(_num(fields["coefficient"]) < 1.0)
    return {f"{prefix}/clip/{safe_name(k)}": _num(v) for k, v in fields.items()}


def signal_scalars(s: StepSignals, prefix: str = PREFIX) -> dict[str, float]:
    """The cheap signals of one step: ``gradwatch/<module>/param_grad_norm`` and
    ``.../injected_grad_norm`` per module, ``gradwatch/step/skipped`` and ``.../spike``."""
    out = {module_tag(n, "param_grad_norm", prefix): v for n, v in s.grad_norm.items()}
    out.update({module_tag(n, "injected_grad_norm", prefix): v for n, v in s.injected.items()})
    out[f"{prefix}/step/skipped"] = float(s.skipped)
    out[f"{prefix}/step/spike"] = float(s.spike)
    return out


def overhead_scalars(overhead: Overhead, prefix: str = PREFIX) -> dict[str, float]:
    """``gradwatch/overhead``: gradwatch's own time so far over the training time."""
    return {f"{prefix}/{OVERHEAD_METRIC}": float(overhead.fraction)}


def param_grad_scalars(
    norms: Mapping[str, float | Tensor], prefix: str = PREFIX
) -> dict[str, float]:
    """``gradwatch/<module>/param_grad_norm`` from module name -> its parameters' gradient norm."""
    return {module_tag(name, "param_grad_norm", prefix): _num(v) for name, v in norms.items()}


def scalars_for(
    report: Report | Mapping[str, ModuleReport],
    *,
    param_grad_norms: Mapping[str, float | Tensor] | None = None,
    clip: ClipEvent | Mapping[str, float] | None = None,
    prefix: str = PREFIX,
) -> dict[str, float]:
    """Every scalar of a report, plus the caller's parameter gradient norms and clipping event.

    ``param_grad_norms`` is keyed by module name (the parameters belong to the module, not to
    one call). Diagnostics that are ``None`` (not computed) are left out, not zero-filled.
    """
    out: dict[str, float] = {}
    for m in report.values():
        out.update(module_scalars(m, prefix=prefix))
    if param_grad_norms:
        out.update(param_grad_scalars(param_grad_norms, prefix))
    if clip is not None:
        out.update(clip_scalars(clip, prefix))
    return out


def module_scalars(m: ModuleReport, *, prefix: str = PREFIX) -> dict[str, float]:
    """The scalars of one module call, see the module docstring for the scheme."""
    out: dict[str, float] = {
        module_tag(m.name, "verdict", prefix): VERDICT_CODES.get(m.verdict, math.nan),
        module_tag(m.name, "fidelity", prefix): float(m.fidelity),
    }
    seq_len = m.seq_len or _last_valid(m) + 1
    if m.seq_len:
        out[module_tag(m.name, "seq_len", prefix)] = float(m.seq_len)
    if m.nonfinite_at is not None:
        out[module_tag(m.name, "nonfinite_timestep", prefix)] = float(m.nonfinite_at.timestep)

    per_ld: dict[str, Tensor] = {}
    for key in ("gain", "actual_gain", "horizon", "efold", "log10_attenuation"):
        value = getattr(m, key)
        if value is not None:
            per_ld[key] = value
    if m.horizon is not None and seq_len > 0:
        per_ld["horizon_fraction"] = torch.clamp(m.horizon.double() / seq_len, max=1.0)
    per_ld.update(profile_stats(m))
    c = m.causes
    if c is not None and c.transition:  # a diagonal scan: its factor is the transition
        for key, value in c.transition.items():
            per_ld[f"transition_{safe_name(key)}"] = value
    elif c is not None:
        per_ld["weight_norm"] = c.weight_norm
        per_ld["weight_radius"] = c.weight_radius
        if m.kind not in GATED_KINDS:  # the bound is NaN by definition for gated cells
            per_ld["pascanu_bound"] = c.pascanu_bound
        per_ld["act_derivative"] = c.act_derivative
        per_ld["saturation"] = c.saturation
        for gate, value in c.gate_mean.items():
            per_ld[f"{safe_name(gate)}_gate_mean"] = value
        for gate, value in c.gate_saturation.items():
            per_ld[f"{safe_name(gate)}_gate_saturation"] = value
        if c.forget_bias is not None:
            per_ld["forget_bias"] = c.forget_bias

    for layer in range(m.num_layers):
        for direction in range(m.num_directions):
            for key, value in per_ld.items():
                tag = layer_tag(m.name, layer, direction, key, prefix)
                out[tag] = _at(value, layer, direction)
            if m.verdicts:
                verdict = m.verdicts[layer][direction]
                tag = layer_tag(m.name, layer, direction, "verdict", prefix)
                out[tag] = VERDICT_CODES.get(verdict, math.nan)
    return out


def profile_stats(m: ModuleReport) -> dict[str, Tensor]:
    """Carried/direct balance and ||dL/dh_t|| summaries over the valid steps, per [L, D]."""
    last = _last_valid(m)
    if last < 0:
        return {}
    total = m.total[..., : last + 1].double()
    carried = m.carried[..., : last + 1].double()
    direct = m.direct[..., : last + 1].double()
    both = torch.isfinite(carried) & torch.isfinite(direct)
    c_sum = torch.where(both, carried, 0.0).sum(-1)
    d_sum = torch.where(both, direct, 0.0).sum(-1)
    denom = c_sum + d_sum
    fraction = torch.where(denom > 0, c_sum / denom.clamp_min(1e-300), math.nan)
    return {
        # share of the gradient mass arriving through the recurrence (1: all carried from later
        # steps, 0: all injected locally); over finite steps only
        "carried_fraction": fraction,
        "hgrad_mean": total.mean(-1),  # non-finite values propagate on purpose
        "hgrad_start": total[..., 0],
        "hgrad_end": total[..., last],
    }


def _last_valid(m: ModuleReport) -> int:
    """Index of the last timestep that some sample covers (-1 when none)."""
    valid = torch.nonzero(m.valid_samples.reshape(-1) > 0)
    if valid.numel() == 0:
        return m.steps - 1 if m.valid_samples.numel() == 0 else -1
    return int(valid[-1])


def _at(value: Tensor, layer: int, direction: int) -> float:
    if value.dim() == 0:
        return float(value)
    return float(value[layer, direction])


def _num(value: float | Tensor) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().float().cpu().reshape(-1)[0]) if value.numel() else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
