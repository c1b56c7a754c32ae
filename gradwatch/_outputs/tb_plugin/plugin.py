"""The gradwatch tab: serves the per-timestep profiles written by ``PanelWriter``.

Routes (under ``/data/plugin/gradwatch``):

- ``/runs``: ``{run: [{"tag", "module", "kind", "num_layers", "num_directions", "seq_len",
  "rows", "max_step"}, ...]}``, runs and tags sorted;
- ``/profiles?run=R&tag=G`` (optional ``&step=S``): the tag's header fields plus
  ``"steps": [{"step", "wall_time", "seq_len", "values": {row: nested lists}}]`` in step order;
  per-step rows are ``[L][D][T]``, ``horizon``/``gain`` ``[L][D]`` and ``verdict`` ``[L][D]``
  names. Non-finite numbers are the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
  (``Number()`` in JavaScript and ``float()`` in Python read them back);
- ``/index.js``: the frontend (a plain ES module, no build step).

Data is read through TensorBoard's data provider, so it works with ``--load_fast`` true or
false; `read_profiles` is the reading function.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

import numpy as np
import werkzeug
from tensorboard import context as tb_context
from tensorboard import plugin_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from gradwatch._outputs.tb_plugin.metadata import (
    PER_LAYER_ROWS,
    PLUGIN_NAME,
    VERDICT_NAMES,
    Header,
    parse_header,
    unpack,
)

__all__ = ["GradwatchPlugin", "list_profiles", "read_profiles"]

# Ask the provider for everything it kept (it keeps what --samples_per_plugin allows).
_ALL = 1_000_000


def _as_provider(source: Any, logdir: str = "") -> Any:
    """A data provider from a provider or an ``EventMultiplexer``."""
    if isinstance(source, provider.DataProvider):
        return source
    from tensorboard.backend.event_processing import data_provider

    return data_provider.MultiplexerDataProvider(source, logdir)


def list_profiles(
    source: Any, *, ctx: Any = None, experiment_id: str = ""
) -> dict[str, dict[str, tuple[Header, int]]]:
    """``{run: {tag: (header, max_step)}}`` of every gradwatch tensor series.

    ``source`` is a TensorBoard data provider or an ``EventMultiplexer``.
    """
    data = _as_provider(source).list_tensors(
        ctx or tb_context.RequestContext(), experiment_id=experiment_id, plugin_name=PLUGIN_NAME
    )
    out: dict[str, dict[str, tuple[Header, int]]] = {}
    for run, tags in data.items():
        for tag, series in tags.items():
            header = parse_header(series.plugin_content)
            if header is not None:
                out.setdefault(run, {})[tag] = (header, int(series.max_step))
    return out


def read_profiles(
    source: Any, run: str, tag: str, *, ctx: Any = None, experiment_id: str = ""
) -> tuple[Header | None, list[dict[str, Any]]]:
    """Header and every kept step of one tag, in step order.

    Each step is ``{"step", "wall_time", "values": {row: np.ndarray}}`` with per-step rows
    ``[L, D, T]`` and per-layer rows (``horizon``, ``gain``, ``verdict`` codes) ``[L, D]``,
    float32 exactly as written. ``source`` is a data provider or an ``EventMultiplexer``.
    """
    ctx = ctx or tb_context.RequestContext()
    dp = _as_provider(source)
    flt = provider.RunTagFilter(runs=[run], tags=[tag])
    listing = dp.list_tensors(
        ctx, experiment_id=experiment_id, plugin_name=PLUGIN_NAME, run_tag_filter=flt
    )
    series = listing.get(run, {}).get(tag)
    header = parse_header(series.plugin_content) if series is not None else None
    if header is None:
        return None, []
    data = dp.read_tensors(
        ctx,
        experiment_id=experiment_id,
        plugin_name=PLUGIN_NAME,
        downsample=_ALL,
        run_tag_filter=flt,
    )
    steps = []
    for datum in sorted(data.get(run, {}).get(tag, []), key=lambda d: d.step):
        values = unpack(header, np.asarray(datum.numpy))
        steps.append({"step": int(datum.step), "wall_time": datum.wall_time, "values": values})
    return header, steps


def _number(value: float) -> float | str:
    if math.isfinite(value):
        return float(f"{value:.7g}")
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _nested(array: np.ndarray) -> Any:
    if array.ndim == 0:
        return _number(float(array))
    return [_nested(a) for a in array] if array.ndim > 1 else [_number(v) for v in array.tolist()]


def _verdicts(codes: np.ndarray) -> list[list[str | None]]:
    return [
        [VERDICT_NAMES[int(c)] if np.isfinite(c) and 0 <= c < len(VERDICT_NAMES) else None
         for c in row]
        for row in codes
    ]  # fmt: skip


def _header_json(header: Header) -> dict[str, Any]:
    out = header.to_json()
    del out["version"]
    return out


def profiles_json(header: Header, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``/profiles`` answer for `read_profiles`' result."""
    out_steps = []
    for item in steps:
        values: dict[str, Any] = {}
        seq_len = 0
        for row, array in item["values"].items():
            if row == "verdict":
                values[row] = _verdicts(array)
            else:
                values[row] = _nested(array)
                if row not in PER_LAYER_ROWS:
                    seq_len = int(array.shape[-1])
        out_steps.append(
            {"step": item["step"], "wall_time": item["wall_time"], "seq_len": seq_len,
             "values": values}
        )  # fmt: skip
    return {**_header_json(header), "steps": out_steps}


class GradwatchPlugin(base_plugin.TBPlugin):
    """The "gradwatch" tab: per-timestep profiles and propagation with a step slider."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._multiplexer = context.multiplexer
        self._provider = context.data_provider
        if self._provider is None and self._multiplexer is not None:
            self._provider = _as_provider(self._multiplexer, context.logdir or "")

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/index.js": self._serve_js,
            "/runs": self._serve_runs,
            "/profiles": self._serve_profiles,
        }

    def is_active(self) -> bool:
        # The listing also enables us through data_plugin_names(); this covers old setups.
        if self._multiplexer is not None:
            return bool(self._multiplexer.PluginRunToTagToContent(PLUGIN_NAME))
        if self._provider is None:
            return False
        try:
            return bool(list_profiles(self._provider))
        except Exception:
            return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="gradwatch")

    # -- routes ------------------------------------------------------------------------------

    @wrappers.Request.application
    def _serve_js(self, request: werkzeug.Request) -> werkzeug.Response:
        del request
        text = resources.files(__package__).joinpath("static", "index.js").read_text("utf-8")
        return werkzeug.Response(text, content_type="text/javascript; charset=utf-8")

    @wrappers.Request.application
    def _serve_runs(self, request: werkzeug.Request) -> werkzeug.Response:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        listing = list_profiles(self._provider, ctx=ctx, experiment_id=eid)
        body = {
            run: [
                {"tag": tag, **_header_json(header), "max_step": max_step}
                for tag, (header, max_step) in sorted(tags.items())
            ]
            for run, tags in sorted(listing.items())
        }
        return _json(body)

    @wrappers.Request.application
    def _serve_profiles(self, request: werkzeug.Request) -> werkzeug.Response:
        run = request.args.get("run")
        tag = request.args.get("tag")
        if run is None or tag is None:
            return _json({"error": "run and tag are required"}, 400)
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        header, steps = read_profiles(self._provider, run, tag, ctx=ctx, experiment_id=eid)
        if header is None:
            return _json({"error": f"no gradwatch profiles for run {run!r}, tag {tag!r}"}, 404)
        step = request.args.get("step")
        if step is not None:
            try:
                wanted = int(step)
            except ValueError:
                return _json({"error": f"step must be an integer, got {step!r}"}, 400)
            steps = [s for s in steps if s["step"] == wanted]
        return _json({"run": run, "tag": tag, **profiles_json(header, steps)})


def _json(body: Any, code: int = 200) -> werkzeug.Response:
    return werkzeug.Response(
        json.dumps(body, allow_nan=False, separators=(",", ":")),
        status=code,
        content_type="application/json",
    )
