"""`gradwatch report` on the event files of real short runs (tests/report_runs.py): every
number and finding is checked against the reports the monitors produced in memory."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
from report_runs import SEQ_LEN, shared_runs

from gradwatch._outputs.tags import safe_name
from gradwatch._report.cli import EXIT_GATE, EXIT_NO_DATA, EXIT_OK, EXIT_USAGE, main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def root(runs):
    return runs["vanishing"].logdir.parents[2]  # tmp/report_runs*/ holds every run


def run_cli(capsys, *args):
    code = main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def by_dir(body, logdir):
    return next(r for r in body["runs"] if r["directory"] == str(logdir))


def f32(x):
    """The float32 value a scalar summary stores."""
    import numpy as np

    return float(np.float32(x))


@pytest.mark.parametrize("which", ["vanishing", "healthy", "monitor"])
def test_json_matches_the_in_memory_reports(runs, root, capsys, which):
    code, out, _ = run_cli(capsys, root, "--json")
    assert code == EXIT_OK
    run = by_dir(json.loads(out), runs[which].logdir)
    reports = runs[which].reports
    steps = sorted(reports)
    (name,) = {n for r in reports.values() for n in r}
    (m,) = [x for x in run["modules"] if x["module"] == safe_name(name)]
    first, last = reports[steps[0]][name], reports[steps[-1]][name]

    assert m["captures"] == steps
    assert m["verdict"] == last.verdict and m["kind"] == last.kind
    expected_timeline = []
    for s in steps:
        v = reports[s][name].verdict
        if not expected_timeline or expected_timeline[-1]["verdict"] != v:
            expected_timeline.append({"step": s, "verdict": v})
    assert m["timeline"] == expected_timeline
    assert m["seq_len"] == {"first": SEQ_LEN, "last": SEQ_LEN}
    (lane,) = m["lanes"]
    assert lane["gain"]["first"] == f32(first.gain[0, 0])
    assert lane["gain"]["last"] == f32(last.gain[0, 0])
    h = float(last.horizon[0, 0])
    assert lane["horizon"]["last"] == ("Infinity" if math.isinf(h) else f32(h))
    causes = [
        (s, reports[s][name].explanation.cause)
        for s in steps
        if reports[s][name].explanation.cause != "none"
    ]
    assert (m["cause_step"], m["cause"]) == (causes[-1] if causes else (None, None))
    nonfinite = [(s, reports[s][name].nonfinite_at) for s in steps if reports[s][name].nonfinite_at]
    if nonfinite:
        s, where = nonfinite[0]
        assert m["first_nonfinite"] == {
            "step": s, "module": where.module, "layer": where.layer,
            "direction": where.direction, "timestep": where.timestep,
        }  # fmt: skip
    else:
        assert m["first_nonfinite"] is None
    assert run["clipped_steps"] == runs[which].clipped_steps


def test_findings_of_the_three_runs(runs, root, capsys):
    """The point of each run: vanishing from the start with a small recurrent weight as the
    cause, a healthy clipped LSTM, a GRU that went non-finite at step 2 and recovered."""
    _, out, _ = run_cli(capsys, root, "--json")
    body = json.loads(out)
    van = by_dir(body, runs["vanishing"].logdir)["modules"][0]
    assert (van["verdict"], van["first_problem"], van["cause"]) == (
        "vanishing", {"vanishing": 0}, "small_recurrent_weight",
    )  # fmt: skip
    healthy = by_dir(body, runs["healthy"].logdir)
    assert healthy["run"].endswith("[lstm]")  # the logger's prefix names the run
    assert healthy["clipped_steps"] == list(range(8))  # max_norm=1e-6 clips every step
    mon = by_dir(body, runs["monitor"].logdir)["modules"][0]
    # the non-finite step was a scheduled capture: no extra capture after it
    assert mon["first_problem"] == {"nonfinite": 2} and mon["recovered"] == [4]
    assert (
        mon["first_nonfinite"]["timestep"]
        == runs["monitor"].reports[2]["GRU"].nonfinite_at.timestep
    )


def test_table_is_aligned_and_names_the_findings(runs, root, capsys):
    code, out, _ = run_cli(capsys, root)
    assert code == EXIT_OK and "\033[" not in out  # not a terminal: no colour
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "RNN_TANH" in line) - 2
    col = lines[header].index("verdict")
    assert lines[header + 2][col:].startswith("vanishing")  # value under its heading
    assert set(lines[header + 1].strip()) == {"-", " "}
    assert "small_recurrent_weight" in lines[header + 2]
    assert "first non-finite gradient of GRU: GRU layer 0 direction 0 timestep 59, at step 2" in out
    assert "clipped: 8 steps" in out


def test_colour_only_on_a_terminal_and_not_with_no_color(runs, capsys, monkeypatch):
    logdir = runs["vanishing"].logdir
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    _, out, _ = run_cli(capsys, logdir)
    assert "\033[33mvanishing\033[0m" in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("NO_COLOR", "1")
    _, out, _ = run_cli(capsys, logdir)
    assert "\033[" not in out
    _, out, _ = run_cli(capsys, logdir, "--color", "always")
    assert "\033[33mvanishing" in out


def test_fail_on_names_run_module_verdict_and_step(runs, root, capsys):
    code, _, err = run_cli(capsys, root, "--fail-on", "vanishing,exploding,nonfinite")
    assert code == EXIT_GATE
    (line,) = [x for x in err.splitlines() if " is " in x]  # only the vanishing RNN fails
    assert line == (
        f"gradwatch report: {runs['vanishing'].logdir}: rnn is vanishing since step 0 "
        "(last capture at step 6)"
    )
    # the GRU's non-finite step is not its last verdict: the gate looks at the last one
    code, _, err = run_cli(capsys, runs["monitor"].logdir, "--fail-on", "nonfinite,exploding")
    assert code == EXIT_OK and err == ""
    code, out, _ = run_cli(capsys, root, "--fail-on", "vanishing", "--json")
    gate = json.loads(out)["gate"]
    assert code == EXIT_GATE and gate["failed"] and len(gate["reasons"]) == 1


def test_bad_fail_on_and_missing_directory_are_usage_errors(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", str(root), "--fail-on", "vanishing,sad"])
    assert info.value.code == EXIT_USAGE
    assert "unknown verdict 'sad'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path / "nope")])
    assert info.value.code == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_no_gradwatch_data_names_what_was_searched(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "other"))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, tmp_path / "other", tmp_path / "empty")
    assert code == EXIT_NO_DATA and out == ""
    assert (
        f"searched {tmp_path / 'other'} (1 event file), {tmp_path / 'empty'} (0 event files)" in err
    )


def test_compare_marks_the_best_gain_and_horizon(runs, capsys):
    van, healthy = runs["vanishing"].logdir, runs["healthy"].logdir
    code, out, _ = run_cli(capsys, van, healthy, "--compare")
    assert code == EXIT_OK
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("/")}
    assert "*" not in rows[str(van)]
    assert re.search(r"healthy\s+\S+\*\s+\S+\*", rows[str(healthy)])  # gain and horizon
    _, out, _ = run_cli(capsys, van, healthy, "--compare", "--json")
    (entry,) = json.loads(out)["compare"]
    best = {e["run"]: (e["best_gain"], e["best_horizon"]) for e in entry["runs"]}
    assert best == {str(van): (False, False), f"{healthy} [lstm]": (True, True)}
