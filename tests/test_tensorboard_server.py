"""A real TensorBoard process serves what PanelWriter wrote: scalars, images and the layout,
fetched over HTTP on localhost."""

from __future__ import annotations

import pytest
from tb_server import get_json, serve
from test_outputs_scalars import make_module, make_report
from torch.utils.tensorboard import SummaryWriter

from gradwatch._outputs.panels import PanelWriter

GAIN_TAG = "gradwatch/enc.rnn/l0d0/gain"


def test_tensorboard_serves_scalars_layout_and_images(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    panels = PanelWriter(writer, history=10)
    panels.write_layout(["enc.rnn"])
    for i, step in enumerate((0, 10, 20)):
        module = make_module("enc.rnn", layers=1, gain=0.6 + 0.1 * i, steps=20)
        panels.write(step, make_report(module), extra_scalars={"gradwatch/clip/pre_norm": 4.0})
    writer.close()

    def loaded(base: str) -> bool:  # the server answers and has read our scalar tag
        return GAIN_TAG in get_json(base, "/data/plugin/scalars/tags").get("run", {})

    with serve(tmp_path, loaded, "--load_fast", "false") as base:
        tags = get_json(base, "/data/plugin/scalars/tags")
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
