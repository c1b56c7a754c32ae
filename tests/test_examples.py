"""The examples run end to end in their ``--quick`` configuration and show what they claim.

Each example is imported from ``examples/`` and its ``main(argv)`` run in this process (no
second interpreter start, no second Lightning import); ``main`` returns the numbers it prints.
The examples configure logging and warning filters for their output; a fixture restores them.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

from gradwatch._analysis.report import VERDICTS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gradwatch_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_example(tmp_path: Path):
    """``run_example(name, *args)``: the example's ``main`` with ``--quick``, one thread and a
    temporary log directory; logging, warning filters and torch's thread count restored."""
    names = ("gradwatch", "lightning.pytorch", "pytorch_lightning")
    saved = {
        n: (
            logging.getLogger(n).level,
            list(logging.getLogger(n).handlers),
            logging.getLogger(n).propagate,
        )
        for n in names
    }
    threads = torch.get_num_threads()

    def run(name: str, *args: str) -> dict[str, Any]:
        argv = ["--quick", "--threads", "1", "--logdir", str(tmp_path / "runs"), *args]
        with warnings.catch_warnings():
            return _load(name).main(argv)

    yield run
    for n, (level, handlers, propagate) in saved.items():
        log = logging.getLogger(n)
        log.setLevel(level)
        log.handlers[:] = handlers
        log.propagate = propagate
    torch.set_num_threads(threads)


def _scalars(logdir: str | Path) -> dict[str, list[float]]:
    """Every scalar series in every event file under ``logdir``, by tag."""
    out: dict[str, list[float]] = {}
    dirs = {p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}
    assert dirs, f"no TensorBoard event file under {logdir}"
    for d in sorted(dirs):
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_adding_problem(run_example):
    r = run_example("adding_problem")
    shortest, longest = r["rnn"][0], r["rnn"][-1]
    assert shortest["T"] < longest["T"]
    assert shortest["verdict"] != "vanishing"
    assert shortest["horizon"] >= 0.5 * shortest["T"]
    assert longest["verdict"] == "vanishing"
    assert 1 < longest["horizon"] < 0.5 * longest["T"]
    assert longest["reports"] >= 2  # the verdict needs two reports in a row (patience)

    lstm = r["lstm"]
    assert lstm["report"].kind == "LSTM"
    assert lstm["mse"] < 0.7 * lstm["baseline"], lstm  # learns (quick: T = 10, 300 steps)
    assert lstm["mse"] < lstm["initial_mse"]
    assert lstm["verdict"] in VERDICTS

    tags = _scalars(Path(r["logdir"]) / "lstm_T10")
    assert "gradwatch/rnn/l0d0/horizon" in tags
    assert "val_mse" in tags


def test_exploding_relu(run_example):
    r = run_example("exploding_relu")
    a, b = r["unclipped"], r["clipped"]
    assert a["diverged_at"] is not None
    assert not all(math.isfinite(v) for v in a["losses"])
    assert a["verdict"] in ("exploding", "nonfinite")
    assert any(v in ("exploding", "nonfinite") for _, v in a["report_verdicts"])
    assert a["report_verdicts"][0][1] == "exploding"  # the first report, before any NaN
    assert float(a["first_report"].gain[0, 0]) > 1.1  # W_hh = 1.2 I
    assert a["nonfinite_at"] is not None and a["nonfinite_at"].module == "net.rnn"

    assert all(math.isfinite(v) for v in b["losses"])
    assert math.isfinite(b["val_mse"])
    assert b["losses"][-1] < 0.1 * b["losses"][0]
    assert b["clipped_steps"] > 0

    tags = _scalars(Path(r["logdir"]) / "clipped")
    assert "gradwatch/clip/pre_norm" in tags and "gradwatch/net.rnn/l0d0/gain" in tags


def test_char_lstm_tbptt(run_example):
    r = run_example("char_lstm_tbptt")
    rows = r["rows"]
    # quick: every_n_steps=1, one optimizer step (and one report) per chunk
    assert r["every_n_steps"] == 1
    assert r["optimizer_steps"] > r["chunks_per_batch"]
    assert [row["step"] for row in rows] == list(range(r["optimizer_steps"]))
    assert [row["chunk"] for row in rows] == [
        s % r["chunks_per_batch"] for s in range(r["optimizer_steps"])
    ]
    for row in rows:
        assert row["seq_len"] == r["tbptt"]  # truncation: each report covers one chunk
        assert row["horizon"] > 1 and not math.isnan(row["horizon"])
        assert 0 < row["gain"] < 1.5
        assert row["verdict"] in VERDICTS
    assert r["bpc_after"] < r["bpc_before"]
    assert "gradwatch/lstm/l0d0/horizon" in _scalars(r["logdir"])


def test_plain_pytorch(run_example):
    r = run_example("plain_pytorch")
    for run in (r["direct"], r["curriculum"]):
        assert run["reports"] > 0
        assert run["verdicts"].get("gru") in VERDICTS
        assert run["history"] and all(h["verdict"] in VERDICTS for h in run["history"])
        tags = _scalars(run["logdir"])
        assert "train/loss" in tags
        assert "gradwatch/gru/l0d0/horizon" in tags
        assert len(tags["gradwatch/gru/l0d0/horizon"]) == run["reports"]


def test_selective_copy_verdicts_follow_the_transition(run_example):
    out = run_example("selective_copy")
    good, bad = out["good"], out["bad"]
    assert good["verdict"] == "healthy" and bad["verdict"] == "vanishing"
    assert good["transition_mean"] > 0.95 > 0.5 > bad["transition_mean"]
    # the horizon follows from the transition: about ln(0.01) / ln(mean |a|)
    assert good["horizon"] > 64 > 10 > bad["horizon"]
    assert "transition |a_t| averages" in bad["explanation"]
