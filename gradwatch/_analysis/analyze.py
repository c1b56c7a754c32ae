"""The one entry point from capture to analysis: a `RawCapture` becomes a `ModuleReport`.

This is the only place where quantities and verdicts meet: the quantities of the capture
are computed on its device (propagation and causes from the recorded recurrence, or the
actual gradient's per-step factor where the step equations are unknown), everything is moved
to the host in one copy, and the report is diagnosed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradwatch._analysis.quantities import (
    QuantityOptions,
    estimated_from_actual,
    fused_quantities,
    stepwise_quantities,
    to_host,
)
from gradwatch._analysis.quantities.causes import MAX_SAMPLED_STEPS
from gradwatch._analysis.quantities.diagonal import transition_quantities
from gradwatch._analysis.report import Causes, ModuleReport, covered_length
from gradwatch._analysis.verdicts import Thresholds, diagnose
from gradwatch._capture.raw import RawCapture

__all__ = ["analyze"]

_STATS = ("total", "carried", "direct", "cell_total")
_CAUSE_FIELDS = ("weight_norm", "weight_radius", "pascanu_bound", "act_derivative", "saturation")


def _device_quantities(raw: RawCapture, options: QuantityOptions) -> dict[str, Tensor]:
    """Every quantity of the capture, as device tensors (nothing read back yet)."""
    if raw.transition is not None:
        return transition_quantities(raw.transition, raw.stats, options)
    rec = raw.recurrences
    if rec is None:
        return stepwise_quantities(raw.stats)
    if not (options.propagation or options.causes):
        return {}
    q = fused_quantities(
        rec.layers, rec.valid, rec.lengths, raw.stats, rec.keys, options, rec.walked
    )
    if rec.deviation is not None:
        q["deviation"] = rec.deviation.reshape(())
    return q


def _causes(q: dict[str, Tensor]) -> Causes | None:
    transition = {k.split("/", 1)[1]: v for k, v in q.items() if k.startswith("transition/")}
    if transition:  # a diagonal scan: no weight matrix, no nonlinearity
        nan = torch.full_like(next(iter(transition.values())), math.nan)
        return Causes(**dict.fromkeys(_CAUSE_FIELDS, nan), transition=transition)
    if "weight_norm" not in q:
        return None
    gates = {k.split("/", 1)[1]: v for k, v in q.items() if k.startswith("gate_mean/")}
    sat = {k.split("/", 1)[1]: v for k, v in q.items() if k.startswith("gate_saturation/")}
    return Causes(
        **{f: q[f] for f in _CAUSE_FIELDS},
        gate_mean=gates,
        gate_saturation=sat,
        forget_bias=q.get("forget_bias"),
        sampled_steps=MAX_SAMPLED_STEPS,
    )


def _exactness(raw: RawCapture, fidelity: float) -> list[str]:
    reasons = list(raw.reasons)
    tolerance = raw.fidelity_tolerance
    if tolerance is not None and not fidelity <= tolerance:
        reasons.append(
            raw.fidelity_reason.format(fidelity=fidelity, tolerance=tolerance)
            if raw.fidelity_reason
            else f"the replay deviates from the module's real outputs by {fidelity:.1e} "
            "(relative); does a subclass change the forward computation?"
        )
    return reasons


def analyze(
    raw: RawCapture,
    thresholds: Thresholds | None = None,
    options: QuantityOptions | None = None,
) -> ModuleReport:
    """The diagnosed report of one raw capture.

    ``options`` chooses what is computed (propagation, causes; both by default). Runs in the
    recorded precision whatever autocast region it is called from, and records no graph.
    """
    options = options or QuantityOptions()
    with torch.no_grad(), torch.autocast(raw.device.type, enabled=False):
        device_values = dict(raw.stats)
        if isinstance(raw.fidelity, Tensor):
            device_values["fidelity"] = raw.fidelity
        device_values.update(_device_quantities(raw, options))
        host = to_host(device_values)  # the only device-to-host copy of the report
    stats = {k: host.pop(k) for k in _STATS if k in raw.stats}
    fidelity = float(host.pop("fidelity", raw.fidelity))
    deviation = host.pop("deviation", None)
    rec = raw.recurrences
    if deviation is not None and rec is not None and not float(deviation) <= rec.tolerance:
        # the recorded steps do not follow the recomputed equations (a subclass?): fall back
        # to the estimate from the actual gradient rather than report a wrong propagation
        host = {k: v for k, v in host.items() if k == "actual_gain"}
    seq_len = covered_length(raw.valid_samples)
    if "gain" not in host and "actual_gain" in host:
        host.update(estimated_from_actual(host, seq_len))
    reasons = _exactness(raw, fidelity)
    report = ModuleReport(
        name=raw.name,
        module_name=raw.module_name,
        kind=raw.kind,
        num_layers=raw.num_layers,
        num_directions=raw.num_directions,
        total=stats["total"],
        carried=stats["carried"],
        direct=stats["direct"],
        cell_total=stats.get("cell_total"),
        valid_samples=raw.valid_samples,
        exact=not reasons,
        fidelity=fidelity,
        approximate_reason="; ".join(reasons) or None,
        source=raw.source,
        received_gradient=raw.received_gradient,
        causes=_causes(host),
    )
    return diagnose(report, host, thresholds or Thresholds(), list(raw.reverse))
