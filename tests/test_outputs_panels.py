"""PanelWriter end to end: real event files read back with TensorBoard's own reader.

Covers a raw SummaryWriter, Lightning's TensorBoardLogger in both namespaces (with and
without a prefix), CSVLogger (scalars, no crash, no noise), W&B-style ``log_image`` loggers,
missing matplotlib, failing loggers, bounded history and a real ``gradwatch.trace`` report.
"""

from __future__ import annotations

import csv
import logging
import math
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from test_outputs_scalars import make_module, make_report
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch._clipping import ClipEvent
from gradwatch._outputs.panels import PanelWriter, ProfileHistory
from gradwatch._outputs.scalars import scalars_for

LAYOUT_TAG = "custom_scalars__config__"


def load(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_layout(acc: EventAccumulator) -> layout_pb2.Layout:
    event = acc.Tensors(LAYOUT_TAG)[-1]
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def small_reports(steps=(0, 10, 20)):
    """A vanishing LSTM and a healthy GRU call, one layer each, per training step."""
    for i, step in enumerate(steps):
        yield (
            step,
            make_report(
                make_module("enc.rnn", layers=1, gain=0.6 + 0.01 * i),
                make_module("dec", kind="GRU", layers=1, gain=0.99),
            ),
        )


def test_raw_summary_writer_scalars_images_and_layout(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    panels = PanelWriter(writer, history=200)
    panels.write_layout(["enc.rnn", "dec"])
    for step, report in small_reports():
        panels.write(step, report, extra_scalars={"gradwatch/clip/coefficient": 0.5})
    writer.close()

    acc = load(tmp_path)
    scalars = acc.Tags()["scalars"]
    assert "gradwatch/enc.rnn/l0d0/gain" in scalars
    assert "gradwatch/dec/l0d0/update_gate_mean" in scalars
    events = acc.Scalars("gradwatch/enc.rnn/l0d0/gain")
    assert [e.step for e in events] == [0, 10, 20]
    assert [e.value for e in events] == pytest.approx([0.6, 0.61, 0.62])
    assert [e.value for e in acc.Scalars("gradwatch/clip/coefficient")] == [0.5] * 3

    images = set(acc.Tags()["images"])
    kinds = ("heatmap", "profile", "propagation")
    assert images == {f"gradwatch/{m}/{k}" for m in ("enc.rnn", "dec") for k in kinds}
    heat = acc.Images("gradwatch/enc.rnn/heatmap")
    assert [e.step for e in heat] == [0, 10, 20]
    assert heat[-1].width > 100 and heat[-1].height > 100
    assert heat[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"

    layout = read_layout(acc)
    titles = [c.title for c in layout.category]
    assert titles == ["gradwatch: enc.rnn", "gradwatch: dec", "gradwatch"]
    enc = layout.category[0]
    gain_chart = next(c for c in enc.chart if c.title.startswith("per-step gain"))
    assert list(gain_chart.multiline.tag) == [r"gradwatch/enc\.rnn(?::\d+)?/l\d+d\d+/gain$"]
    # written once: the later writes did not repeat it
    assert len(acc.Tensors(LAYOUT_TAG)) == 1


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
@pytest.mark.parametrize("prefix", ["", "exp"])
def test_lightning_tensorboard_logger(tmp_path, namespace, prefix):
    loggers = pytest.importorskip(f"{namespace}.loggers")
    logger = loggers.TensorBoardLogger(str(tmp_path), name="run", prefix=prefix)
    panels = PanelWriter(logger, history=10)
    panels.write_layout(["enc.rnn", "dec"])
    for step, report in list(small_reports())[:2]:
        panels.write(step, report)
    panels.write_scalars(11, {"gradwatch/enc.rnn/param_grad_norm": 2.5})
    logger.finalize("success")

    acc = load(logger.log_dir)
    head = f"{prefix}-gradwatch" if prefix else "gradwatch"
    assert [e.value for e in acc.Scalars(f"{head}/enc.rnn/l0d0/gain")] == pytest.approx([0.6, 0.61])
    assert acc.Scalars(f"{head}/enc.rnn/param_grad_norm")[0].step == 11
    assert f"{head}/dec/profile" in acc.Tags()["images"]
    layout = read_layout(acc)
    regex = layout.category[0].chart[1].multiline.tag[0]
    assert regex.startswith(f"{prefix}\\-gradwatch/" if prefix else "gradwatch/")


def test_csv_logger_gets_scalars_quietly(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    panels = PanelWriter(logger)
    caplog.set_level(logging.DEBUG, logger="gradwatch")
    panels.write_layout(["enc.rnn"])
    for step, report in small_reports():
        panels.write(step, report)
    logger.save()

    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 10, 20]
    assert float(rows[0]["gradwatch/enc.rnn/l0d0/gain"]) == pytest.approx(0.6)
    assert float(rows[0]["gradwatch/dec/l0d0/horizon"]) == math.inf
    records = [r for r in caplog.records if r.name == "gradwatch"]
    assert all(r.levelno == logging.DEBUG for r in records)
    assert len(records) == 1 and "figures are skipped" in records[0].getMessage()
    assert len(panels.history) == 0  # nothing kept when nothing can be shown


class ImageLogger:
    """W&B-like: log_metrics and log_image(key, images, step)."""

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []
        self.images: list[tuple[str, np.ndarray, int]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, images, step=None):
        self.images.extend((key, img, step) for img in images)


def test_wandb_style_loggers_get_figures_and_history_is_bounded():
    logger = ImageLogger()
    panels = PanelWriter(logger, history=3, figure_every=100)
    for step, report in small_reports(range(0, 60, 10)):
        panels.write(step, report)
    assert len(logger.metrics) == 6
    keys = {k for k, _, _ in logger.images}
    assert keys == {f"gradwatch/{m}/{k}" for m in ("enc.rnn", "dec") for k in ("heatmap",
        "profile", "propagation")}  # fmt: skip
    assert all(s == 0 for _, _, s in logger.images)  # figure_every=100: first write only
    _, image, _ = logger.images[0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    steps, profiles = panels.history.get("enc.rnn")
    assert steps == [30, 40, 50] and len(profiles) == 3


def test_profile_history_is_bounded_in_steps_and_calls():
    history = ProfileHistory(maxlen=4, max_calls=2)
    for step in range(10):
        history.add(step, make_report(*(make_module(f"m{i}", layers=1) for i in range(3))))
    assert len(history) == 8 and "m2" not in history
    assert history.get("m0")[0] == [6, 7, 8, 9]
    with pytest.raises(ValueError):
        ProfileHistory(0)


def test_missing_matplotlib_skips_figures_with_one_info(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradwatch._outputs.figures", None)  # import -> ImportError
    writer = SummaryWriter(str(tmp_path))
    panels = PanelWriter(writer)
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        for step, report in small_reports():
            panels.write(step, report)
    writer.close()
    infos = [r for r in caplog.records if r.name == "gradwatch" and r.levelno >= logging.INFO]
    assert len(infos) == 1 and "matplotlib" in infos[0].getMessage()
    acc = load(tmp_path)
    assert acc.Tags()["images"] == []
    assert len(acc.Scalars("gradwatch/enc.rnn/l0d0/gain")) == 3


def test_nonfinite_values_are_written_as_they_are(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    panels = PanelWriter(writer, figures=False)
    bad = make_module("rnn", layers=1, verdict="nonfinite", nonfinite_t=3, cause="nonfinite")
    panels.write(5, make_report(bad), extra_scalars={"x/inf": float("inf"), "x/t": torch.tensor(2)})
    writer.close()
    acc = load(tmp_path)
    assert math.isnan(acc.Scalars("gradwatch/rnn/l0d0/hgrad_mean")[0].value)
    assert acc.Scalars("x/inf")[0].value == math.inf
    assert acc.Scalars("x/t")[0].value == 2.0
    assert acc.Scalars("gradwatch/rnn/nonfinite_timestep")[0].value == 3.0


def test_failing_logger_warns_once_and_never_raises(caplog):
    class Broken:
        def log_metrics(self, metrics, step=None):
            raise RuntimeError("disk full")

    panels = PanelWriter([Broken(), None])
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        for step, report in small_reports():
            panels.write(step, report)
            panels.write_scalars(step, {"a": 1.0})
    warnings = [r for r in caplog.records if r.name == "gradwatch"]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()


def test_targets_none_list_and_invalid():
    PanelWriter(None).write(0, make_report(make_module(layers=1)))  # nothing to do, no error
    assert not PanelWriter(None).supports_figures
    with pytest.raises(TypeError, match="Lightning logger"):
        PanelWriter(object())
    with pytest.raises(ValueError, match="figure_every"):
        PanelWriter(None, figure_every=0)


def test_auto_layout_covers_modules_seen_later(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    panels = PanelWriter(writer, figures=False)
    panels.write(0, make_report(make_module("a", layers=1)))
    panels.write(1, make_report(make_module("a", layers=1)))  # no new module: no rewrite
    panels.write(2, make_report(make_module("a", layers=1), make_module("b#1", layers=1)))
    writer.close()
    acc = load(tmp_path)
    layouts = acc.Tensors(LAYOUT_TAG)
    assert len(layouts) == 2
    titles = [c.title for c in read_layout(acc).category]
    assert titles == ["gradwatch: a", "gradwatch: b", "gradwatch"]


def test_real_trace_report(tmp_path):
    """A report from gradwatch.trace (diagnostics may still be None) goes through end to end."""
    torch.manual_seed(0)
    model = nn.LSTM(3, 5, num_layers=2)
    with gradwatch.trace(model) as tr:
        out, _ = model(torch.randn(12, 2, 3))
        out.pow(2).mean().backward()
    report = tr.report()
    event = ClipEvent(0, "norm", 1.0, 2.0, 1.0, "always", False)
    scalars = scalars_for(report, param_grad_norms={"LSTM": 1.0}, clip=event)
    name = next(iter(report))
    assert f"gradwatch/{name}/l1d0/hgrad_end" in scalars
    assert scalars[f"gradwatch/{name}/l0d0/hgrad_mean"] > 0
    writer = SummaryWriter(str(tmp_path))
    panels = PanelWriter(writer)
    panels.write(0, report, extra_scalars=scalars)
    writer.close()
    acc = load(tmp_path)
    assert f"gradwatch/{name}/profile" in acc.Tags()["images"]
    assert f"gradwatch/{name}/heatmap" in acc.Tags()["images"]
    if report[name].gain is not None:  # once the diagnostics land
        assert f"gradwatch/{name}/l0d0/gain" in acc.Tags()["scalars"]
        assert f"gradwatch/{name}/propagation" in acc.Tags()["images"]
