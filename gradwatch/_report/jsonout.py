"""``--json``: the report's content for machines.

Non-finite numbers are the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (as in the
gradwatch tab's API; ``float()`` in Python and ``Number()`` in JavaScript read them back), so
the output is strict JSON. A horizon of ``"Infinity"`` means the gradient never fell below 1%
within the sequence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from gradwatch._report.model import RunSummary
from gradwatch._report.table import compare_rows

__all__ = ["report_json"]

SCHEMA_VERSION = 1


def _num(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _run(run: RunSummary) -> dict[str, Any]:
    modules = []
    for m in run.modules.values():
        modules.append(
            {
                "module": m.name,
                "kind": m.kind,
                "verdict": m.verdict,
                "since": m.since,
                "captures": m.captures,
                "timeline": [{"step": s, "verdict": v} for s, v in m.timeline],
                "first_problem": m.first_problem,
                "recovered": m.recoveries,
                "seq_len": {"first": m.seq_len_first, "last": m.seq_len_last},
                "cause": m.cause,
                "cause_step": m.cause_step,
                "explanation": m.explanation,
                "first_nonfinite": m.first_nonfinite,
                "approximate": m.approximate,
                "lanes": [
                    {
                        "layer": lane.layer,
                        "direction": lane.direction,
                        "verdict": lane.verdict,
                        "gain": {"first": _num(lane.gain_first), "last": _num(lane.gain_last)},
                        "horizon": {
                            "first": _num(lane.horizon_first),
                            "last": _num(lane.horizon_last),
                        },
                    }
                    for lane in m.lanes
                ],
            }
        )
    return {
        "run": run.name,
        "directory": str(run.data.directory),
        "files": [str(f) for f in run.data.files],
        "first_step": run.first_step,
        "last_step": run.last_step,
        "last_wall_time": run.data.last_wall_time,
        "clipped_steps": run.clipped_steps,
        "clip_skipped_steps": run.clip_skipped_steps,
        "scaler_skipped_steps": run.scaler_skipped_steps,
        "spike_steps": run.spike_steps,
        "warnings": run.warnings,
        "modules": modules,
    }


def report_json(
    runs: Sequence[RunSummary],
    *,
    warnings: Sequence[str] = (),
    fail_on: Sequence[str] = (),
    failures: Sequence[str] = (),
    compare: bool = False,
) -> str:
    body: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "runs": [_run(r) for r in runs],
        "warnings": list(warnings),
        "gate": {"fail_on": list(fail_on), "failed": bool(failures), "reasons": list(failures)},
    }
    if compare:
        body["compare"] = [
            {
                "module": name,
                "lane": label,
                "runs": [
                    {**e, "gain": _num(e["gain"]), "horizon": _num(e["horizon"])} for e in entries
                ],
            }
            for name, label, entries in compare_rows(runs)
        ]
    return json.dumps(body, indent=2, allow_nan=False)
