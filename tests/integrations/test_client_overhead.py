"""Smoke test of ``benchmarks/client_overhead.py --quick`` (timings are not checked: figures
are ratios for docs/benchmarks.md, never assertions)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("darts")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import client_overhead

pytestmark = pytest.mark.integrations


def test_quick_mode_measures_windows_switched_on_and_off(capsys):
    results = client_overhead.main(
        ["--quick", "--rows", "darts-rnn", "--columns", "defaults", "--window-s", "0.05"]
    )
    ((label, cells),) = results
    assert label.startswith("darts RNNModel")
    cell = cells["defaults"]
    assert cell.windows == 2  # --quick: two on windows, each between two off windows
    assert math.isfinite(cell.ratio) and cell.ratio > 0
    assert cell.low <= cell.ratio <= cell.high
    assert cell.gw.names == ["rnn"]  # GradWatch watched darts' LSTM during the on windows
    out = capsys.readouterr().out
    assert "| darts RNNModel" in out and "| defaults |" in out
