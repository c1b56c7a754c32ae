"""Verdicts over training, with hysteresis so a single noisy report does not flip them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradwatch._analysis.report import ModuleReport, Report
from gradwatch._analysis.verdicts.classify import classify
from gradwatch._analysis.verdicts.thresholds import Thresholds
from gradwatch._base.vocabulary import worst

__all__ = ["VerdictChange", "VerdictTracker"]


@dataclass(frozen=True)
class VerdictChange:
    """A module call's verdict changed. ``layer``/``direction`` locate the worst part."""

    name: str
    old: str
    new: str
    report: ModuleReport
    layer: int | None = None
    direction: int | None = None


def _raw(m: ModuleReport, layer: int, d: int, thresholds: Thresholds, previous: str) -> str:
    instant = m.verdicts[layer][d] if m.verdicts else "healthy"
    if instant == "nonfinite" or m.horizon is None or m.log10_attenuation is None:
        return instant
    return classify(
        float(m.horizon[layer, d]),
        float(m.log10_attenuation[layer, d]),
        m.seq_len,
        nonfinite=False,
        thresholds=thresholds,
        previous=previous,
    )


class VerdictTracker:
    """Latest verdict of every module call (by report name) and of its layers/directions.

    A new verdict must be measured ``patience`` reports in a row before it replaces the
    current one, and leaving a verdict requires clearing its threshold by ``margin``
    (see `Thresholds`). Non-finite gradients are flagged at the first report.
    """

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self._parts: dict[str, dict[str, Any]] = {}  # "name|layer|direction" -> state
        self.verdicts: dict[str, str] = {}

    def update(self, report: Report) -> list[VerdictChange]:
        """Fold in one report; returns the module calls whose verdict changed."""
        changes = []
        for name, m in report.items():
            if not m.received_gradient:
                continue
            parts: dict[tuple[int, int], str] = {}
            for layer in range(m.num_layers):
                for d in range(m.num_directions):
                    parts[layer, d] = self._step(f"{name}|{layer}|{d}", m, layer, d)
            new = worst(list(parts.values()))
            old = self.verdicts.get(name, "healthy")
            self.verdicts[name] = new
            if new != old:
                where = next((k for k, v in parts.items() if v == new), (None, None))
                changes.append(VerdictChange(name, old, new, m, *where))
        return changes

    def _step(self, key: str, m: ModuleReport, layer: int, d: int) -> str:
        s = self._parts.setdefault(key, {"verdict": "healthy", "candidate": "healthy", "count": 0})
        raw = _raw(m, layer, d, self.thresholds, s["verdict"])
        if raw == s["verdict"]:
            s["candidate"], s["count"] = raw, 0
        elif raw == "nonfinite":
            s["verdict"], s["candidate"], s["count"] = raw, raw, 0
        else:
            s["count"] = s["count"] + 1 if s["candidate"] == raw else 1
            s["candidate"] = raw
            if s["count"] >= self.thresholds.patience:
                s["verdict"], s["count"] = raw, 0
        return s["verdict"]

    # -- checkpointing: plain types only ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "parts": {k: dict(v) for k, v in self._parts.items()},
            "verdicts": dict(self.verdicts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("parts", {})
        for key, s in parts.items():
            if set(s) != {"verdict", "candidate", "count"}:
                raise ValueError(f"VerdictTracker state for {key!r} is malformed: {s!r}")
        self._parts = {k: dict(v) for k, v in parts.items()}
        self.verdicts = dict(state.get("verdicts", {}))
