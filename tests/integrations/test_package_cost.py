"""Smoke test of ``benchmarks/package_cost.py --quick`` (timings are not checked: figures are
ratios for docs/benchmarks.md, never assertions)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("xlstm")
pytest.importorskip("ncps")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import package_cost

pytestmark = pytest.mark.integrations


def test_quick_mode_measures_each_package(capsys):
    rows = package_cost.main(["--quick"])
    assert [r["module"] for r in rows] == ["sLSTM x2 (vanilla)", "CfC"]
    for row in rows:
        assert row["shape"] == (2, 8, 8)
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("plain_ms", "watched", "capture"))
    out = capsys.readouterr().out
    assert "| sLSTM x2 (vanilla) | 2 | 8 | 8 |" in out and "| CfC | 2 | 8 | 8 |" in out
