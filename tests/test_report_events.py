"""Reading event files: truncated and corrupted files, a run still being written, the
diagnosis tag, and a command that imports neither torch nor Lightning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from report_runs import shared_runs, truncate_copy
from tensorboard.backend.event_processing import plugin_event_multiplexer
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch._outputs.panels import PanelWriter
from gradwatch._outputs.tb_plugin.plugin import list_profiles
from gradwatch._report.cli import EXIT_OK, main
from gradwatch._report.events import read_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def captures(logdir: Path) -> list[int]:
    (run,) = read_runs(logdir, str(logdir))[0]
    return sorted(run.scalars["gradwatch/rnn/verdict"])


def test_truncated_file_warns_naming_it_and_reports_the_rest(runs, tmp_path, capsys):
    source = runs["vanishing"].logdir
    cut = truncate_copy(source, tmp_path / "cut", keep=0.6)
    code = main(["report", str(tmp_path / "cut"), "--json"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK
    assert f"warning: {cut}: ends in a partial record at byte" in err
    kept = captures(tmp_path / "cut")
    full = sorted(runs["vanishing"].reports)
    assert kept and kept == full[: len(kept)] and len(kept) < len(full)
    (run,) = json.loads(out)["runs"]
    assert run["modules"][0]["captures"] == kept and run["warnings"]


def test_corrupted_gradwatch_record_is_detected_by_its_checksum(runs, tmp_path, capsys):
    (source,) = [p for p in runs["monitor"].logdir.iterdir() if "tfevents" in p.name]
    data = bytearray(source.read_bytes())
    at = data.rindex(b"gradwatch/GRU/verdict")
    data[at + len("gradwatch/GRU/")] ^= 0x20  # "verdict" -> "Verdict": still parses
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / source.name).write_bytes(bytes(data))
    code = main(["report", str(tmp_path / "bad")])
    out, err = capsys.readouterr()
    assert code == EXIT_OK and "run " in out
    assert "data checksum mismatch" in err and source.name in err


def test_a_run_still_being_written_is_reported_as_is(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.RNN(2, 4)})
    writer = SummaryWriter(str(tmp_path / "live"))
    panels = PanelWriter(writer, figures=False)

    def step(s):
        with gradwatch.trace(model) as tr:
            model["rnn"](torch.randn(12, 3, 2))[0].sum().backward()
        panels.write(s, tr.report())
        writer.flush()

    step(0)
    step(5)
    assert captures(tmp_path / "live") == [0, 5]
    # a writer in the middle of a record: the complete ones are reported, a warning names it
    (event_file,) = (tmp_path / "live").iterdir()
    with open(event_file, "ab") as fh:
        fh.write(b"\x10\x00\x00")
    (run,) = read_runs(tmp_path / "live", "live")[0]
    assert sorted(run.scalars["gradwatch/rnn/verdict"]) == [0, 5]
    assert "still being written" in run.warnings[0]
    writer.close()


def test_the_tab_ignores_the_diagnosis_tags(runs):
    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"gradwatch": 0})
    mux.AddRunsFromDirectory(str(runs["monitor"].logdir))
    mux.Reload()
    listing = list_profiles(mux)
    assert [list(tags) for tags in listing.values()] == [["gradwatch/GRU/profiles"]]
    content = mux.PluginRunToTagToContent("gradwatch")
    assert "gradwatch/GRU/diagnosis" in next(iter(content.values()))


_PROBE = """
import json, runpy, sys
sys.argv = ["gradwatch", *sys.argv[1:]]
try:
    runpy.run_module("gradwatch", run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in
               ("torch", "lightning", "pytorch_lightning", "matplotlib"))
print("PROBE", json.dumps({"code": code, "heavy": heavy}))
"""

# The same probe with `gradwatch/__init__.py` not run: the report package on its own.
_ISOLATED = """
import sys, types
pkg = types.ModuleType("gradwatch"); pkg.__path__ = [sys.argv.pop(1)]
sys.modules["gradwatch"] = pkg
""" + _PROBE.replace('runpy.run_module("gradwatch"', 'runpy.run_module("gradwatch.__main__"')


def probe(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=False
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("PROBE"))
    return json.loads(line[len("PROBE ") :])


def test_the_report_package_imports_neither_torch_nor_lightning(runs, tmp_path):
    logdir = str(runs["vanishing"].logdir.parents[1])
    html = str(tmp_path / "r.html")
    for args in (["report", "--help"], ["report", logdir, "--html", html, "--json"]):
        result = probe(_ISOLATED, str(ROOT / "gradwatch"), *args)
        assert result == {"code": 0, "heavy": []}, args
    assert Path(html).stat().st_size > 0


def test_python_m_gradwatch_starts_without_torch(runs):
    plain = (
        "import gradwatch, json, sys; print('PROBE', json.dumps({'torch': 'torch' in sys.modules}))"
    )
    if probe(plain)["torch"]:
        pytest.skip("`import gradwatch` still imports torch (the lazy package is not merged)")
    logdir = str(runs["vanishing"].logdir.parents[1])
    for args in (["report", "--help"], ["report", logdir]):
        assert probe(_PROBE, *args) == {"code": 0, "heavy": []}, args
