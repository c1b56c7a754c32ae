"""The gradwatch TensorBoard tab: the profiles PanelWriter writes, read back by the plugin
from the event files and served by a real TensorBoard process over HTTP on localhost."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from tb_server import get, get_json, serve
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_outputs_scalars import make_module, make_report
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch._outputs.panels import PanelWriter
from gradwatch._outputs.tb_plugin import metadata
from gradwatch._outputs.tb_plugin.loader import DEFAULT_SAMPLES, GradwatchLoader
from gradwatch._outputs.tb_plugin.plugin import list_profiles, profiles_json, read_profiles

STEPS = (0, 5, 10)
ROWS = ("total", "carried", "direct", "propagation", "cell_total")


def train_and_log(logdir, steps=STEPS):
    """A small bidirectional 2-layer LSTM trained for len(steps) steps; the reports of every
    step go through PanelWriter into ``logdir / "run"``. Returns the reports by step."""
    torch.manual_seed(0)
    model = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(9, 2, 3)
    writer = SummaryWriter(str(logdir / "run"))
    panels = PanelWriter(writer, figures=False)
    reports = {}
    for step in steps:
        opt.zero_grad()
        with gradwatch.trace(model) as tr:
            out, _ = model(x)
            out.pow(2).mean().backward()
        opt.step()
        reports[step] = tr.report()
        panels.write(step, reports[step])
    writer.close()
    return reports


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tb")
    reports = train_and_log(logdir)
    name = next(iter(reports[STEPS[0]]))
    return logdir, reports, name, f"gradwatch/{name}/profiles"


def expected(m, row):
    if row in ("horizon", "gain"):
        return getattr(m, row).numpy()
    if row == "verdict":
        return np.array([[metadata.VERDICT_NAMES.index(v) for v in r] for r in m.verdicts])
    return getattr(m, row).numpy()


def test_reading_function_returns_the_report_tensors(logged):
    logdir, reports, name, tag = logged
    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"gradwatch": 0})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()

    listing = list_profiles(mux)
    assert list(listing) == ["run"]
    header, max_step = listing["run"][tag]
    assert (header.module, header.kind, header.num_layers, header.num_directions) == (
        name, "LSTM", 2, 2,
    )  # fmt: skip
    assert header.seq_len == 9 and max_step == STEPS[-1]
    assert header.rows == (*ROWS, "horizon", "gain", "verdict")

    header, steps = read_profiles(mux, "run", tag)
    assert [s["step"] for s in steps] == list(STEPS)
    for item in steps:
        m = reports[item["step"]][name]
        for row in (*ROWS, "horizon", "gain", "verdict"):
            np.testing.assert_array_equal(item["values"][row], expected(m, row), err_msg=row)
    # training changed the weights: the slider has something to show
    assert not np.array_equal(steps[0]["values"]["total"], steps[-1]["values"]["total"])
    assert read_profiles(mux, "run", "gradwatch/nope/profiles") == (None, [])


def test_nonfinite_and_missing_diagnostics_survive_as_json_strings(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    panels = PanelWriter(writer, figures=False)
    bad = make_module("enc", kind="GRU", layers=1, steps=6, nonfinite_t=2, verdict="nonfinite")
    bare = make_module("dec", kind="RNN_TANH", layers=1, steps=4, diagnostics=False)
    panels.write(3, make_report(bad, bare))
    writer.close()
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()

    header, steps = read_profiles(mux, "run", "gradwatch/enc/profiles")
    assert "cell_total" not in header.rows
    body = profiles_json(header, steps)
    values = body["steps"][0]["values"]
    assert values["total"][0][0][:3] == ["NaN"] * 3
    assert values["carried"][0][0][:3] == ["Infinity"] * 3
    assert values["verdict"] == [["nonfinite"]]
    assert body["steps"][0]["seq_len"] == 6

    header, steps = read_profiles(mux, "run", "gradwatch/dec/profiles")
    values = profiles_json(header, steps)["steps"][0]["values"]
    assert values["propagation"] == [[["NaN"] * 4]]  # no diagnostics: NaN, not zeros
    assert values["horizon"] == [["NaN"]] and values["verdict"] == [[None]]
    assert values["direct"] == [[[0.1] * 4]]


def test_profiles_can_be_switched_off_and_other_loggers_get_none(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    PanelWriter(writer, figures=False, profiles=False).write(0, make_report(make_module()))
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert not [t for t in acc.Tags()["tensors"] if t.endswith("/profiles")]

    class Metrics:  # a Lightning logger without TensorBoard (CSV-like)
        def __init__(self):
            self.rows = []

        def log_metrics(self, metrics, step):
            self.rows.append(step)

    metrics = Metrics()
    PanelWriter(metrics, figures=False).write(0, make_report(make_module()))
    assert metrics.rows == [0]


def test_lightning_logger_prefix_is_applied_like_for_images(tmp_path):
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    logger = loggers.TensorBoardLogger(str(tmp_path), name="run", prefix="exp")
    PanelWriter(logger, figures=False).write(2, make_report(make_module("dec", kind="GRU")))
    logger.finalize("success")
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    listing = list_profiles(mux)
    (run,) = listing
    assert list(listing[run]) == ["exp-gradwatch/dec/profiles"]
    assert listing[run]["exp-gradwatch/dec/profiles"][0].kind == "GRU"


def test_tensorboardx_writers_get_the_profiles_too(tmp_path):
    tensorboardx = pytest.importorskip("tensorboardX")
    writer = tensorboardx.SummaryWriter(str(tmp_path / "run"))
    PanelWriter(writer, figures=False).write(7, make_report(make_module(gain=0.5)))
    writer.close()
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    header, steps = read_profiles(mux, "run", "gradwatch/enc.rnn/profiles")
    assert header.kind == "LSTM" and [s["step"] for s in steps] == [7]
    np.testing.assert_array_equal(steps[0]["values"]["gain"], np.full((2, 1), 0.5))


def test_loader_raises_the_sample_count_unless_the_user_set_it():
    flags = argparse.Namespace(samples_per_plugin={})
    GradwatchLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {"gradwatch": DEFAULT_SAMPLES}
    flags = argparse.Namespace(samples_per_plugin={"gradwatch": 0, "images": 5})
    GradwatchLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {"gradwatch": 0, "images": 5}


@pytest.mark.parametrize("load_fast", ["false", "true"])
def test_tensorboard_serves_the_gradwatch_tab(logged, load_fast):
    logdir, reports, name, tag = logged

    def ready(base: str) -> bool:
        return tag in {
            e["tag"] for e in get_json(base, "/data/plugin/gradwatch/runs").get("run", [])
        }

    with serve(logdir, ready, "--load_fast", load_fast) as base:
        listing = get_json(base, "/data/plugins_listing")
        assert listing["gradwatch"]["enabled"] is True
        assert listing["gradwatch"]["loading_mechanism"] == {
            "type": "IFRAME",
            "module_path": "/data/plugin/gradwatch/index.js",
        }
        assert listing["gradwatch"]["tab_name"] == "gradwatch"

        runs = get_json(base, "/data/plugin/gradwatch/runs")
        (entry,) = runs["run"]
        assert entry["module"] == name and entry["max_step"] == STEPS[-1]
        assert (entry["num_layers"], entry["num_directions"]) == (2, 2)

        body = get_json(base, "/data/plugin/gradwatch/profiles", run="run", tag=tag)
        assert [s["step"] for s in body["steps"]] == list(STEPS)
        for item in body["steps"]:
            m = reports[item["step"]][name]
            assert item["seq_len"] == m.steps
            for row in (*ROWS, "horizon", "gain"):
                got = np.array(item["values"][row], dtype=np.float64)  # "Infinity" parses too
                np.testing.assert_allclose(got, expected(m, row), rtol=1e-6, err_msg=row)
            assert item["values"]["verdict"] == [list(r) for r in m.verdicts]
        one = get_json(base, "/data/plugin/gradwatch/profiles", run="run", tag=tag, step=5)
        assert [s["step"] for s in one["steps"]] == [5]

        content_type, js = get(base, "/data/plugin/gradwatch/index.js")
        assert content_type.startswith("text/javascript")
        assert "export async function render" in js
        _, entry_html = get(base, "/data/plugin_entry.html", name="gradwatch")
        assert 'import("./index.js")' in entry_html
