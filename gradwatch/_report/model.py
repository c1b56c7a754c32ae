"""The run model: what the report says about each run and module, from the raw event data.

Everything here is derived from `events.RunData` only: the verdict scalars at capture steps
give the timeline, the per layer/direction scalars give gain and horizon, the diagnosis
strings give the dominant cause and the first non-finite location, the ``clip`` and
``step`` scalars give clipping events and skipped steps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from gradwatch._base.vocabulary import PROBLEM_VERDICTS, VERDICTS
from gradwatch._outputs.tags import PREFIX
from gradwatch._report.events import RunData

__all__ = ["LaneSummary", "ModuleSummary", "RunSummary", "gate_failures", "summarise"]

_GLOBAL = ("clip", "step")  # tag groups that are not modules
_LANE = re.compile(r"^l(\d+)d(\d+)$")


@dataclass
class LaneSummary:
    """One layer and direction of a module: gain and horizon at the first and last capture."""

    layer: int
    direction: int
    verdict: str | None
    gain_first: float = math.nan
    gain_last: float = math.nan
    horizon_first: float = math.nan
    horizon_last: float = math.nan

    @property
    def label(self) -> str:
        return f"l{self.layer}d{self.direction}"


@dataclass
class ModuleSummary:
    """One recurrent module call over a run (``name`` as in the tags: ``encoder.rnn:1``)."""

    name: str
    kind: str
    captures: list[int]
    verdict: str
    since: int
    timeline: list[tuple[int, str]]
    first_problem: dict[str, int]
    recoveries: list[int]
    seq_len_first: int | None
    seq_len_last: int | None
    lanes: list[LaneSummary]
    cause: str | None = None
    cause_step: int | None = None
    explanation: str | None = None
    first_nonfinite: dict[str, Any] | None = None
    approximate: list[str] = field(default_factory=list)

    @property
    def first_step(self) -> int:
        return self.captures[0]

    @property
    def last_step(self) -> int:
        return self.captures[-1]


@dataclass
class RunSummary:
    """One run: its modules and the run-wide clipping and skipping events."""

    name: str
    data: RunData
    modules: dict[str, ModuleSummary]
    clipped_steps: list[int]
    clip_skipped_steps: list[int]
    scaler_skipped_steps: list[int]
    spike_steps: list[int]
    first_step: int | None
    last_step: int | None

    @property
    def warnings(self) -> list[str]:
        return self.data.warnings


def _verdict(code: float) -> str:
    if math.isfinite(code) and 0 <= int(code) < len(VERDICTS) and code == int(code):
        return VERDICTS[int(code)]
    return "unknown"


def _flagged(series: dict[int, float] | None) -> list[int]:
    """Steps where a 0/1 flag scalar is set."""
    return sorted(s for s, v in (series or {}).items() if v >= 0.5)


def summarise(data: RunData) -> RunSummary:
    """The `RunSummary` of one run's data."""
    names: list[str] = []
    for tag in data.scalars:
        module = tag[len(PREFIX) + 1 :].split("/")[0]
        if module not in _GLOBAL and module not in names and tag == f"{PREFIX}/{module}/verdict":
            names.append(module)
    modules = {n: _module(data, n) for n in sorted(names)}
    steps = [s for series in data.scalars.values() for s in series]
    s = data.scalars
    return RunSummary(
        name=data.name,
        data=data,
        modules=modules,
        clipped_steps=_flagged(s.get(f"{PREFIX}/clip/clipped")),
        clip_skipped_steps=_flagged(s.get(f"{PREFIX}/clip/skipped")),
        scaler_skipped_steps=_flagged(s.get(f"{PREFIX}/step/skipped")),
        spike_steps=_flagged(s.get(f"{PREFIX}/step/spike")),
        first_step=min(steps, default=None),
        last_step=max(steps, default=None),
    )


def _module(data: RunData, name: str) -> ModuleSummary:
    head = f"{PREFIX}/{name}/"
    verdicts = sorted((s, _verdict(v)) for s, v in data.scalars[head + "verdict"].items())
    captures = [s for s, _ in verdicts]
    timeline: list[tuple[int, str]] = []
    first_problem: dict[str, int] = {}
    recoveries: list[int] = []
    for step, verdict in verdicts:
        if verdict in PROBLEM_VERDICTS:
            first_problem.setdefault(verdict, step)
        if not timeline or timeline[-1][1] != verdict:
            if verdict == "healthy" and timeline and timeline[-1][1] in PROBLEM_VERDICTS:
                recoveries.append(step)
            timeline.append((step, verdict))
    seq = data.scalars.get(head + "seq_len", {})
    diagnoses = data.diagnoses.get(name, {})
    summary = ModuleSummary(
        name=name,
        kind=_kind(data, name),
        captures=captures,
        verdict=timeline[-1][1],
        since=timeline[-1][0],
        timeline=timeline,
        first_problem=first_problem,
        recoveries=recoveries,
        seq_len_first=_int(seq.get(captures[0])),
        seq_len_last=_int(seq.get(captures[-1])),
        lanes=_lanes(data, name, captures),
    )
    _add_diagnoses(summary, diagnoses)
    if summary.first_nonfinite is None:
        nf = data.scalars.get(head + "nonfinite_timestep", {})
        if nf:  # written without a diagnosis (e.g. a logger that is not TensorBoard's)
            step = min(nf)
            summary.first_nonfinite = {"step": step, "module": name, "timestep": _int(nf[step])}
    return summary


def _add_diagnoses(summary: ModuleSummary, diagnoses: dict[int, dict[str, Any]]) -> None:
    """Dominant cause (of the last capture, or of the last problem if it since recovered),
    the first non-finite location, and approximate captures."""
    steps = sorted(diagnoses)
    with_cause = [s for s in steps if diagnoses[s].get("cause") not in (None, "none")]
    chosen = with_cause[-1] if with_cause else None
    if chosen is not None:
        d = diagnoses[chosen]
        summary.cause, summary.cause_step = str(d["cause"]), chosen
        summary.explanation = d.get("explanation")
    for step in steps:
        d = diagnoses[step]
        where = d.get("nonfinite_at")
        if summary.first_nonfinite is None and isinstance(where, dict):
            summary.first_nonfinite = {"step": step, **where}
        if d.get("exact") is False:
            summary.approximate.append(f"step {step}: {d.get('approximate_reason') or 'see docs'}")


def _kind(data: RunData, name: str) -> str:
    for step_data in data.diagnoses.get(name, {}).values():
        if step_data.get("kind"):
            return str(step_data["kind"])
    for header, _ in data.profiles.get(name, {}).values():
        return header.kind
    return "?"


def _lanes(data: RunData, name: str, captures: list[int]) -> list[LaneSummary]:
    head = f"{PREFIX}/{name}/"
    found: set[tuple[int, int]] = set()
    for tag in data.scalars:
        if tag.startswith(head):
            match = _LANE.match(tag[len(head) :].split("/")[0])
            if match:
                found.add((int(match[1]), int(match[2])))
    lanes = []
    for layer, direction in sorted(found):
        base = f"{head}l{layer}d{direction}/"
        verdict = data.scalars.get(base + "verdict", {})
        gain = data.scalars.get(base + "gain", {})
        horizon = data.scalars.get(base + "horizon", {})
        last = max(verdict) if verdict else None
        lanes.append(
            LaneSummary(
                layer,
                direction,
                verdict=_verdict(verdict[last]) if last is not None else None,
                gain_first=_at(gain, captures, first=True),
                gain_last=_at(gain, captures, first=False),
                horizon_first=_at(horizon, captures, first=True),
                horizon_last=_at(horizon, captures, first=False),
            )
        )
    return lanes


def _at(series: dict[int, float], captures: list[int], *, first: bool) -> float:
    """The value at the first (last) capture that has one."""
    for step in captures if first else reversed(captures):
        if step in series:
            return series[step]
    return math.nan


def _int(value: float | None) -> int | None:
    return int(value) if value is not None and math.isfinite(value) else None


def gate_failures(runs: list[RunSummary], fail_on: tuple[str, ...]) -> list[str]:
    """One line per module whose last verdict is in ``fail_on``: run, module, verdict, step."""
    lines = []
    for run in runs:
        for m in run.modules.values():
            if m.verdict in fail_on:
                lines.append(
                    f"gradwatch report: {run.name}: {m.name} is {m.verdict} since step "
                    f"{m.since} (last capture at step {m.last_step})"
                )
    return lines
