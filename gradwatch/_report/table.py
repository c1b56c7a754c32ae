"""The terminal report: one aligned table per run, and the side-by-side comparison."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gradwatch._report.model import LaneSummary, ModuleSummary, RunSummary

__all__ = [
    "HEADER",
    "best_marks",
    "compare_rows",
    "compare_text",
    "fmt_gain",
    "fmt_horizon",
    "module_rows",
    "report_text",
    "run_notes",
    "steps_text",
]

_ANSI = {
    "healthy": "\033[32m",
    "vanishing": "\033[33m",
    "exploding": "\033[31m",
    "nonfinite": "\033[35m",
    "unknown": "\033[2m",
}
_RESET = "\033[0m"
_BOLD = "\033[1m"

HEADER = (
    "module", "kind", "layer", "verdict", "since", "first problem", "recovered",
    "gain first → last", "horizon first → last", "seq", "cause",
)  # fmt: skip


def fmt_gain(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def fmt_horizon(value: float) -> str:
    """Steps until a unit gradient falls below 1%; ``never`` when it does not within the
    sequence (written as +inf)."""
    if math.isnan(value):
        return "-"
    return "never" if math.isinf(value) else f"{value:.0f}"


def steps_text(steps: Sequence[int], limit: int = 5) -> str:
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[:limit])
    more = f", … ({len(steps)} in all)" if len(steps) > limit else ""
    return f"at step{'s' if len(steps) > 1 else ''} {shown}{more}"


def _first_problem(m: ModuleSummary) -> str:
    return ", ".join(f"{v} @{s}" for v, s in m.first_problem.items()) or "-"


def _seq(m: ModuleSummary) -> str:
    first, last = m.seq_len_first, m.seq_len_last
    if first is None and last is None:
        return "-"
    return str(last) if first == last or first is None else f"{first} → {last}"


def _cause(m: ModuleSummary) -> str:
    if m.cause is None:
        return "-"
    return m.cause if m.cause_step == m.last_step else f"{m.cause} (step {m.cause_step})"


def module_rows(m: ModuleSummary) -> list[tuple[str, ...]]:
    lanes = m.lanes or [LaneSummary(0, 0, m.verdict)]
    rows = []
    for i, lane in enumerate(lanes):
        gain = f"{fmt_gain(lane.gain_first)} → {fmt_gain(lane.gain_last)}"
        horizon = f"{fmt_horizon(lane.horizon_first)} → {fmt_horizon(lane.horizon_last)}"
        module_cells = (
            (str(m.since), _first_problem(m), str(m.recoveries[-1]) if m.recoveries else "-")
            if i == 0
            else ("", "", "")
        )
        rows.append(
            (
                m.name if i == 0 else "",
                m.kind if i == 0 else "",
                lane.label,
                lane.verdict or m.verdict,
                *module_cells,
                gain,
                horizon,
                _seq(m) if i == 0 else "",
                _cause(m) if i == 0 else "",
            )
        )
    return rows


def _align(
    header: Sequence[str], rows: Sequence[Sequence[str]], color: bool, verdict_col: int | None
) -> list[str]:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    if color:
        lines[0] = _BOLD + lines[0] + _RESET
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = []
        for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
            padded = cell.ljust(width)
            word = cell.split("*")[0].strip()
            if color and i == verdict_col and word in _ANSI:
                padded = _ANSI[word] + cell + _RESET + " " * (width - len(cell))
            cells.append(padded)
        lines.append("  ".join(cells).rstrip())
    return lines


def run_notes(run: RunSummary) -> list[str]:
    notes = []
    if run.first_step is not None:
        notes.append(f"gradwatch data from step {run.first_step} to {run.last_step}")
    captures = sorted({s for m in run.modules.values() for s in m.captures})
    if captures:
        notes.append(f"captures: {len(captures)}, {steps_text(captures, 8)}")
    notes.append(f"clipped: {len(run.clipped_steps)} steps, {steps_text(run.clipped_steps)}")
    skipped = sorted(set(run.clip_skipped_steps) | set(run.scaler_skipped_steps))
    notes.append(f"skipped: {len(skipped)} steps, {steps_text(skipped)}")
    for m in run.modules.values():
        nf = m.first_nonfinite
        if nf is not None:
            where = nf.get("module", m.name)
            if "layer" in nf:
                where += f" layer {nf['layer']} direction {nf['direction']}"
            where += f" timestep {nf.get('timestep')}"
            notes.append(f"first non-finite gradient of {m.name}: {where}, at step {nf['step']}")
        for text in m.approximate:
            notes.append(f"{m.name}: approximate values at {text}")
    return notes


def report_text(runs: Sequence[RunSummary], *, color: bool = False) -> str:
    """The report of every run, one table each."""
    out: list[str] = []
    for run in runs:
        title = f"run {run.name}"
        out.append(_BOLD + title + _RESET if color else title)
        if not run.modules:
            out.append("  no capture yet (the run has gradwatch signals but no diagnosis)")
        else:
            rows = [r for m in run.modules.values() for r in module_rows(m)]
            out.extend("  " + line for line in _align(HEADER, rows, color, verdict_col=3))
        out.extend("  " + note for note in run_notes(run))
        out.append("")
    out.append(
        "gain: per-step factor of a gradient carried back (<1 shrinks, >1 grows); horizon: "
        "steps until it falls below 1% ('never': not within the sequence); since: the step "
        "the last verdict began"
    )
    return "\n".join(out)


def best_marks(values: Sequence[float], *, kind: str) -> list[bool]:
    """Which values are best: the longest horizon (``inf`` included), the gain closest to 1
    on a log scale. NaN is never best; ties are all marked."""
    if kind == "horizon":
        scores = [v if not math.isnan(v) else -math.inf for v in values]
        best = max(scores, default=-math.inf)
        return [s == best and s != -math.inf for s in scores]
    scores = [abs(math.log(v)) if v > 0 and math.isfinite(v) else math.inf for v in values]
    best = min(scores, default=math.inf)
    return [s == best and s != math.inf for s in scores]


def compare_rows(runs: Sequence[RunSummary]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``(module, lane, entries)`` per module lane present in any run; an entry per run that
    has it, at its last capture: run, verdict, gain, horizon, seq_len, step, and whether the
    gain and the horizon are the best of the runs (only marked with two runs or more)."""
    keys: list[tuple[str, str]] = []
    for run in runs:
        for m in run.modules.values():
            for lane in m.lanes or [LaneSummary(0, 0, m.verdict)]:
                if (m.name, lane.label) not in keys:
                    keys.append((m.name, lane.label))
    out = []
    for name, label in keys:
        found = []
        for run in runs:
            m = run.modules.get(name)
            lane = next((la for la in (m.lanes if m else []) if la.label == label), None)
            if m is not None and lane is not None:
                found.append((run, m, lane))
        several = len(found) > 1
        gains = best_marks([f[2].gain_last for f in found], kind="gain")
        horizons = best_marks([f[2].horizon_last for f in found], kind="horizon")
        entries = [
            {
                "run": run.name,
                "verdict": lane.verdict or m.verdict,
                "gain": lane.gain_last,
                "horizon": lane.horizon_last,
                "seq_len": m.seq_len_last,
                "step": m.last_step,
                "best_gain": g_best and several,
                "best_horizon": h_best and several,
            }
            for (run, m, lane), g_best, h_best in zip(found, gains, horizons, strict=True)
        ]
        out.append((name, label, entries))
    return out


COMPARE_HEADER = ("run", "verdict", "gain", "horizon", "seq", "at step")


def compare_text(runs: Sequence[RunSummary], *, color: bool = False) -> str:
    """Runs side by side per module and layer/direction, at each run's last capture."""
    out = []
    for name, label, entries in compare_rows(runs):
        rows = [
            (
                e["run"],
                e["verdict"],
                fmt_gain(e["gain"]) + ("*" if e["best_gain"] else ""),
                fmt_horizon(e["horizon"]) + ("*" if e["best_horizon"] else ""),
                "-" if e["seq_len"] is None else str(e["seq_len"]),
                str(e["step"]),
            )
            for e in entries
        ]
        title = f"module {name} {label}"
        out.append(_BOLD + title + _RESET if color else title)
        out.extend("  " + line for line in _align(COMPARE_HEADER, rows, color, verdict_col=1))
        out.append("")
    out.append("* best over the runs: gain closest to 1, longest horizon (at the last capture)")
    return "\n".join(out)
