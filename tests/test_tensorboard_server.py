"""A real TensorBoard process serves what PanelWriter wrote: scalars, images and the layout,
fetched over HTTP on localhost."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_outputs_scalars import make_module, make_report
from torch.utils.tensorboard import SummaryWriter

from gradwatch.outputs.panels import PanelWriter

GAIN_TAG = "gradwatch/enc.rnn/l0d0/gain"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_command() -> list[str]:
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tensorboard")
    if found is None:
        pytest.skip("the tensorboard command is not installed")
    return [found]


def get_json(base: str, path: str, **params: str):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


def wait_for(base: str, proc: subprocess.Popen, deadline: float):
    """Poll until the server answers and has loaded our scalar tag."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"tensorboard exited with {proc.returncode}:\n{out}")
        try:
            tags = get_json(base, "/data/plugin/scalars/tags")
            if GAIN_TAG in tags.get("run", {}):
                return tags
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.25)
    pytest.fail("tensorboard did not serve the run in time")


def test_tensorboard_serves_scalars_layout_and_images(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    panels = PanelWriter(writer, history=10)
    panels.write_layout(["enc.rnn"])
    for i, step in enumerate((0, 10, 20)):
        module = make_module("enc.rnn", layers=1, gain=0.6 + 0.1 * i, steps=20)
        panels.write(step, make_report(module), extra_scalars={"gradwatch/clip/pre_norm": 4.0})
    writer.close()

    port = free_port()
    base = f"http://localhost:{port}"
    command = [
        *tensorboard_command(),
        "--logdir", str(tmp_path),
        "--host", "localhost",
        "--port", str(port),
        "--load_fast", "false",
        "--reload_interval", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    try:
        tags = wait_for(base, proc, time.monotonic() + 60)
        assert "gradwatch/enc.rnn/l0d0/horizon_fraction" in tags["run"]

        points = get_json(base, "/data/plugin/scalars/scalars", run="run", tag=GAIN_TAG)
        assert [p[1] for p in points] == [0, 10, 20]  # [wall_time, step, value]
        assert [p[2] for p in points] == pytest.approx([0.6, 0.7, 0.8])
        clip = get_json(
            base, "/data/plugin/scalars/scalars", run="run", tag="gradwatch/clip/pre_norm"
        )
        assert [p[2] for p in clip] == [4.0, 4.0, 4.0]

        layout = get_json(base, "/data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert titles == ["gradwatch: enc.rnn", "gradwatch"]
        chart = next(c for c in layout["category"][0]["chart"] if "per-step gain" in c["title"])
        regex = chart["multiline"]["tag"][0]
        # the plugin resolves the dashboard's regex to our tag and returns its values
        served = get_json(base, "/data/plugin/custom_scalars/scalars", run="run", tag=regex)
        assert served["regex_valid"] is True
        assert [p[2] for p in served["tag_to_events"][GAIN_TAG]] == pytest.approx([0.6, 0.7, 0.8])

        images = get_json(base, "/data/plugin/images/tags")
        assert "gradwatch/enc.rnn/heatmap" in images["run"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
