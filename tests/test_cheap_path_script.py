"""Smoke test of ``benchmarks/cheap_path.py --quick`` (timings are not checked: the figures
are microseconds for docs/benchmarks.md, never assertions)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cheap_path


def test_quick_mode_measures_on_windows_against_their_neighbours(capsys):
    (result,) = cheap_path.main(["--quick", "--models", "darts"])
    assert result.label.startswith("darts-shaped LSTM")
    assert result.windows == 2  # --quick: two on windows, each between two off windows
    assert result.names == ["rnn"]  # gradwatch watched the LSTM during the on windows
    assert set(result.cost_us) == {"forward", "backward", "step", "optimizer", "total"}
    assert all(math.isfinite(v) for v in result.cost_us.values())
    assert result.step_us > 0 and result.low_us <= result.high_us
    # the instrumented pass timed the hooks and the parts of Monitor.step
    for part in ("forward hooks", "gradient hooks", "signals (host)", "finish_step (all)"):
        assert result.parts_us.get(part, 0.0) > 0.0, part
    out = capsys.readouterr().out
    assert "| darts-shaped LSTM" in out and "Monitor.step parts" in out


def test_budget_mode_watches_with_the_default_budget(monkeypatch):
    seen = []
    real = cheap_path.gradwatch.Monitor

    def monitor(model, **kwargs):
        seen.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(cheap_path.gradwatch, "Monitor", monitor)
    monkeypatch.setattr(cheap_path, "MONITOR", cheap_path.MONITOR)  # restored after the test
    cheap_path.main(["--quick", "--models", "darts", "--budget", "--no-breakdown"])
    assert seen and all("overhead_budget" not in kw for kw in seen)
    assert all(kw["every_n_steps"] == 10**9 for kw in seen)
    cheap_path.main(["--quick", "--models", "darts", "--no-breakdown"])
    assert seen[-1]["overhead_budget"] is None  # signals at every step without --budget
