"""Attach the diagnostics of one module call to its report."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from gradwatch._analysis.quantities.propagation import HORIZON_LEVEL
from gradwatch._analysis.report import Causes, ModuleReport
from gradwatch._analysis.verdicts.classify import classify, first_nonfinite, worst
from gradwatch._analysis.verdicts.explain import explain
from gradwatch._analysis.verdicts.thresholds import Thresholds

__all__ = ["diagnose"]

_CAUSE_FIELDS = ("weight_norm", "weight_radius", "pascanu_bound", "act_derivative", "saturation")


def _causes(q: dict[str, Tensor]) -> Causes | None:
    if "weight_norm" not in q:
        return None
    gates = {k.split("/", 1)[1]: v for k, v in q.items() if k.startswith("gate_mean/")}
    sat = {k.split("/", 1)[1]: v for k, v in q.items() if k.startswith("gate_saturation/")}
    from gradwatch._analysis.quantities.causes import MAX_SAMPLED_STEPS

    return Causes(
        **{f: q[f] for f in _CAUSE_FIELDS},
        gate_mean=gates,
        gate_saturation=sat,
        forget_bias=q.get("forget_bias"),
        sampled_steps=MAX_SAMPLED_STEPS,
    )


def _estimated_from_actual(q: dict[str, Tensor], seq_len: int) -> dict[str, Tensor]:
    """Hooks see no step Jacobian: estimate gain and horizon from the actual gradient's
    per-step factor (``carried[t] / total[t+1]``)."""
    g = q["actual_gain"].double()
    log_g = g.log()
    horizon = torch.where(log_g < 0, math.log(HORIZON_LEVEL) / log_g, math.inf)
    return {
        "gain": g.float(),
        "horizon": horizon.float(),
        "efold": (1 / log_g.abs()).float(),
        "log10_attenuation": (log_g * max(seq_len - 1, 0) / math.log(10)).float(),
    }


def diagnose(
    report: ModuleReport,
    quantities: dict[str, Tensor],
    thresholds: Thresholds,
    reverse_of: list[bool],
) -> ModuleReport:
    """A copy of ``report`` with gain, horizon, causes, verdicts and explanation filled in.

    ``quantities`` are host tensors from `gradwatch._analysis.quantities`; ``reverse_of[d]`` tells
    whether direction ``d`` runs backwards in time.
    """
    q = dict(quantities)
    covered = (report.valid_samples > 0).nonzero()
    seq_len = int(covered.max()) + 1 if covered.numel() else 0
    if "gain" not in q and "actual_gain" in q:
        q.update(_estimated_from_actual(q, seq_len))
    per_step = [report.total, report.carried, report.direct]
    if report.cell_total is not None:
        per_step.append(report.cell_total)
    location, bad = first_nonfinite(report.name, per_step, reverse_of)
    curve = q.get("propagation")
    if curve is not None:  # NaN or +inf along the propagation (e.g. non-finite weights)
        bad = bad | (curve.isnan() | (curve == math.inf)).any(-1)
    verdicts = []
    for layer in range(report.num_layers):
        row = []
        for d in range(report.num_directions):
            horizon = float(q["horizon"][layer, d]) if "horizon" in q else math.inf
            growth = float(q["log10_attenuation"][layer, d]) if "log10_attenuation" in q else 0.0
            nonfinite = bool(bad[layer, d])
            row.append(classify(horizon, growth, seq_len, nonfinite, thresholds))
        verdicts.append(tuple(row))
    verdict = worst([v for row in verdicts for v in row])
    where = next(
        (
            (layer, d)
            for layer, row in enumerate(verdicts)
            for d, v in enumerate(row)
            if v == verdict
        ),
        None,
    )
    updated = dataclasses.replace(
        report,
        seq_len=seq_len,
        propagation=curve,
        gain=q.get("gain"),
        horizon=q.get("horizon"),
        efold=q.get("efold"),
        log10_attenuation=q.get("log10_attenuation"),
        actual_gain=q.get("actual_gain"),
        causes=_causes(q),
        verdicts=tuple(verdicts),
        verdict=verdict,
        nonfinite_at=location,
    )
    return dataclasses.replace(updated, explanation=explain(updated, verdict, where, location))
