"""Attach the verdicts of one module call to its report (no quantity is computed here)."""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor

from gradwatch._analysis.report import ModuleReport, covered_length
from gradwatch._analysis.verdicts.classify import classify, first_nonfinite
from gradwatch._analysis.verdicts.explain import explain
from gradwatch._analysis.verdicts.thresholds import Thresholds
from gradwatch._base.vocabulary import worst

__all__ = ["diagnose"]


def diagnose(
    report: ModuleReport,
    quantities: dict[str, Tensor],
    thresholds: Thresholds,
    reverse_of: list[bool],
) -> ModuleReport:
    """A copy of ``report`` with gain, horizon, verdicts and explanation filled in.

    ``quantities`` are host tensors from `gradwatch._analysis.quantities` (``gain``,
    ``horizon``, ``log10_attenuation``, ...); ``reverse_of[d]`` tells whether direction ``d``
    runs backwards in time. The causes are the report's own.
    """
    q = dict(quantities)
    seq_len = covered_length(report.valid_samples)
    per_step = [report.total, report.carried, report.direct]
    if report.cell_total is not None:
        per_step.append(report.cell_total)
    location, bad = first_nonfinite(report.name, per_step, reverse_of)
    curve = q.get("propagation")
    if curve is not None:  # NaN or +inf along the propagation (e.g. non-finite weights)
        reached = curve[..., :seq_len]  # past the longest covered sequence it is NaN by design
        bad = bad | (reached.isnan() | (reached == math.inf)).any(-1)
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
        verdicts=tuple(verdicts),
        verdict=verdict,
        nonfinite_at=location,
    )
    return dataclasses.replace(updated, explanation=explain(updated, verdict, where, location))
