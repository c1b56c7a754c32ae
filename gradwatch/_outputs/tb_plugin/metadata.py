"""The gradwatch tab's data: one tensor summary per module call and replayed step.

Tag ``gradwatch/<module>/profiles`` (with the logger's prefix, like the images), plugin name
``gradwatch``, data class ``TENSOR``. The summary metadata's ``plugin_data.content`` is a
UTF-8 JSON header:

```json
{"version": 1, "module": "encoder.rnn#1", "kind": "LSTM", "num_layers": 2,
 "num_directions": 1, "seq_len": 120,
 "rows": ["total", "carried", "direct", "propagation", "cell_total",
          "horizon", "gain", "verdict"]}
```

The tensor is float32 ``[len(rows), L, D, T]``: row ``i`` is ``rows[i]``. ``total``,
``carried``, ``direct`` and ``cell_total`` (LSTM kinds only) are ``||dL/dh_t||`` at timestep
``t``; ``propagation`` is log10 a(k) at ``k = t`` steps back; ``horizon``, ``gain`` and
``verdict`` (the codes of `gradwatch._outputs.scalars.VERDICT_CODES`) are per layer and
direction, repeated along ``T``. Diagnostics that were not computed are NaN. ``T`` is the
step's own sequence length and may differ between steps; TensorBoard keeps the header of the
first step only (``seq_len`` there is informative), so readers take ``T`` from the tensor.

Next to it, tag ``gradwatch/<module>/diagnosis`` (same plugin, header
``{"version": 1, "type": "diagnosis"}``) holds, per step, a scalar string tensor: the UTF-8
JSON of `diagnosis_json` (verdict, dominant cause, where the first non-finite value
appeared). ``gradwatch report`` reads it; the tab ignores it (its header is not a profile's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch._base.vocabulary import CELL_STATE_KINDS, VERDICTS

__all__ = [
    "DIAGNOSIS_METRIC",
    "PLUGIN_NAME",
    "PROFILE_METRIC",
    "VERSION",
    "Header",
    "diagnosis_json",
    "diagnosis_summary",
    "is_diagnosis",
    "parse_header",
    "profile_rows",
    "profile_summary",
    "profile_tensor",
    "unpack",
]

PLUGIN_NAME = "gradwatch"
VERSION = 1
PROFILE_METRIC = "profiles"
DIAGNOSIS_METRIC = "diagnosis"
_DIAGNOSIS_HEADER = {"version": VERSION, "type": DIAGNOSIS_METRIC}

PER_STEP_ROWS = ("total", "carried", "direct", "propagation")
PER_LAYER_ROWS = ("horizon", "gain", "verdict")
VERDICT_NAMES = VERDICTS  # the verdicts by code: 0 healthy ... 3 nonfinite


@dataclass(frozen=True)
class Header:
    """The JSON header of a ``gradwatch/<module>/profiles`` tag."""

    module: str
    kind: str
    num_layers: int
    num_directions: int
    seq_len: int
    rows: tuple[str, ...]
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "module": self.module,
            "kind": self.kind,
            "num_layers": self.num_layers,
            "num_directions": self.num_directions,
            "seq_len": self.seq_len,
            "rows": list(self.rows),
        }


def profile_rows(kind: str) -> tuple[str, ...]:
    """Row names for a module kind: ``cell_total`` for kinds with a cell state, fixed per
    call."""
    cell = ("cell_total",) if kind in CELL_STATE_KINDS else ()
    return PER_STEP_ROWS + cell + PER_LAYER_ROWS


def _array(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    if value is None:
        return np.full(shape, np.nan, dtype=np.float32)
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    out = np.full(shape, np.nan, dtype=np.float32)
    arr = np.asarray(value, dtype=np.float32)
    index = tuple(slice(0, min(a, b)) for a, b in zip(arr.shape, shape, strict=False))
    out[index] = arr[index]
    return out


def profile_tensor(m: Any) -> tuple[Header, np.ndarray]:
    """Header and float32 ``[R, L, D, T]`` tensor of one `ModuleReport`."""
    layers, directions = int(m.num_layers), int(m.num_directions)
    steps = int(m.total.shape[-1])
    rows = profile_rows(m.kind)
    shape = (layers, directions, steps)
    out = np.empty((len(rows), *shape), dtype=np.float32)
    codes = None
    if m.verdicts:
        codes = [
            [float(VERDICT_NAMES.index(v)) if v in VERDICT_NAMES else np.nan for v in row]
            for row in m.verdicts
        ]
    per_layer = {"horizon": m.horizon, "gain": m.gain, "verdict": codes}
    for i, row in enumerate(rows):
        if row in per_layer:
            values = _array(per_layer[row], (layers, directions))
            out[i] = values[..., None]
        else:
            out[i] = _array(getattr(m, row), shape)
    header = Header(
        module=str(m.name),
        kind=str(m.kind),
        num_layers=layers,
        num_directions=directions,
        seq_len=int(getattr(m, "seq_len", 0) or steps),
        rows=rows,
    )
    return header, out


def profile_summary(tag: str, m: Any, summary_class: Any = None) -> Any:
    """A ``Summary`` proto holding the profiles of one module call: TensorBoard's, or
    ``summary_class`` (e.g. tensorboardX's own, wire-compatible ``Summary``)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.util import tensor_util

    header, tensor = profile_tensor(m)
    metadata = summary_pb2.SummaryMetadata(
        summary_description="gradwatch per-timestep profiles (see docs/panels.md)",
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    metadata.plugin_data.plugin_name = PLUGIN_NAME
    metadata.plugin_data.content = json.dumps(header.to_json()).encode("utf-8")
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata, tensor=tensor_util.make_tensor_proto(tensor))
    if summary_class is not None and summary_class is not type(summary):
        return summary_class.FromString(summary.SerializeToString())
    return summary


def diagnosis_json(m: Any) -> dict[str, Any]:
    """What the event files keep of one `ModuleReport` beyond its numbers: the verdict, the
    dominant cause (`gradwatch.Explanation`) and where the first non-finite value appeared."""
    exp = getattr(m, "explanation", None)
    nf = getattr(m, "nonfinite_at", None)
    return {
        "module": str(m.name),
        "kind": str(m.kind),
        "verdict": str(m.verdict),
        "seq_len": int(getattr(m, "seq_len", 0) or 0),
        "exact": bool(getattr(m, "exact", True)),
        "approximate_reason": getattr(m, "approximate_reason", None),
        "cause": None if exp is None else str(exp.cause),
        "cause_layer": None if exp is None or exp.layer is None else int(exp.layer),
        "cause_direction": None if exp is None or exp.direction is None else int(exp.direction),
        "explanation": None if exp is None else str(exp.text),
        "nonfinite_at": None
        if nf is None
        else {
            "module": str(nf.module),
            "layer": int(nf.layer),
            "direction": int(nf.direction),
            "timestep": int(nf.timestep),
        },
    }


def diagnosis_summary(tag: str, m: Any, summary_class: Any = None) -> Any:
    """A ``Summary`` proto with `diagnosis_json` of one module call as a string tensor."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.util import tensor_util

    metadata = summary_pb2.SummaryMetadata(
        summary_description="gradwatch verdict, dominant cause, first non-finite value",
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    metadata.plugin_data.plugin_name = PLUGIN_NAME
    metadata.plugin_data.content = json.dumps(_DIAGNOSIS_HEADER).encode("utf-8")
    text = json.dumps(diagnosis_json(m), allow_nan=False).encode("utf-8")
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata, tensor=tensor_util.make_tensor_proto(text))
    if summary_class is not None and summary_class is not type(summary):
        return summary_class.FromString(summary.SerializeToString())
    return summary


def is_diagnosis(content: bytes | str | None) -> bool:
    """Whether ``plugin_data.content`` is the header of a ``diagnosis`` tag."""
    try:
        raw = json.loads(content.decode("utf-8") if isinstance(content, bytes) else content or "")
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("type") == DIAGNOSIS_METRIC


def parse_header(content: bytes | str | None) -> Header | None:
    """The header from ``plugin_data.content``; ``None`` when absent or not ours."""
    if not content:
        return None
    try:
        raw = json.loads(content.decode("utf-8") if isinstance(content, bytes) else content)
        return Header(
            module=str(raw["module"]),
            kind=str(raw.get("kind", "")),
            num_layers=int(raw["num_layers"]),
            num_directions=int(raw["num_directions"]),
            seq_len=int(raw.get("seq_len", 0)),
            rows=tuple(str(r) for r in raw["rows"]),
            version=int(raw.get("version", VERSION)),
        )
    except (ValueError, KeyError, TypeError):
        return None


def unpack(header: Header, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """Rows by name: ``[L, D, T]`` per-step rows, ``[L, D]`` per-layer rows."""
    tensor = np.asarray(tensor, dtype=np.float32)
    out: dict[str, np.ndarray] = {}
    for i, row in enumerate(header.rows[: tensor.shape[0]]):
        values = tensor[i]
        if row in PER_LAYER_ROWS:
            values = values[..., 0] if values.shape[-1] else np.full(values.shape[:-1], np.nan)
        out[row] = values
    return out
