"""Read what gradwatch wrote into TensorBoard event files, without torch or Lightning.

Event files are TFRecord streams: per record an 8-byte length, its masked CRC-32C, the
serialized ``Event`` proto and the data's masked CRC-32C. TensorBoard's loaders stop quietly
at a truncated or corrupted record (they poll files that are still being written), so the
framing is walked here, with TensorBoard's protos and checksum, to warn about such a file by
name and keep what came before. Only gradwatch's records have their data checksum verified:
TensorBoard's checksum is pure Python (about 0.2 s per MB), and figures, which the report
does not use, are most of a file's bytes.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch._outputs.tags import PREFIX
from gradwatch._outputs.tb_plugin.metadata import (
    PLUGIN_NAME,
    Header,
    is_diagnosis,
    parse_header,
    unpack,
)

__all__ = ["EVENT_FILE_MARK", "RunData", "find_event_files", "read_runs"]

EVENT_FILE_MARK = "tfevents"
# "[<logger prefix>-]gradwatch/<rest>": Lightning's TensorBoardLogger joins its prefix with "-".
_TAG = re.compile(rf"^(?:(?P<lp>.*)-)?{PREFIX}/(?P<rest>.+)$")


@dataclass
class RunData:
    """Everything gradwatch wrote to one run (a directory of event files, one logger prefix).

    ``scalars`` maps a tag without the logger prefix (``gradwatch/rnn/l0d0/gain``) to
    ``{step: value}``; ``profiles`` and ``diagnoses`` map a module's tag name (``rnn``,
    ``encoder.rnn:1``) to ``{step: ...}``. A step written twice (a resumed run) keeps the
    later value.
    """

    name: str
    directory: Path
    files: list[Path] = field(default_factory=list)
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    profiles: dict[str, dict[int, tuple[Header, dict[str, np.ndarray]]]] = field(
        default_factory=dict
    )
    diagnoses: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    last_wall_time: float = 0.0

    @property
    def empty(self) -> bool:
        return not (self.scalars or self.profiles or self.diagnoses)


class _Corrupt(Exception):
    """A record that cannot be read; the message says where and why."""


def find_event_files(path: Path) -> list[Path]:
    """Event files at or below ``path`` (a file is taken as is), sorted."""
    if path.is_file():
        return [path]
    found: list[Path] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found.extend(Path(root) / f for f in sorted(files) if EVENT_FILE_MARK in f)
    return found


def read_runs(path: Path, display: str) -> tuple[list[RunData], list[str], int]:
    """Runs with gradwatch data below ``path`` (``display``: how the user spelled it).

    Returns the runs, warnings about files that belong to no reported run, and how many
    event files were searched. Runs are grouped by directory, then by logger prefix.
    """
    files = find_event_files(path)
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    runs: list[RunData] = []
    orphan_warnings: list[str] = []
    for directory, dir_files in by_dir.items():
        rel = directory.relative_to(path) if path.is_dir() else Path()
        name = display if str(rel) == "." else str(Path(display) / rel)
        per_prefix: dict[str, RunData] = {}
        warnings: list[str] = []
        # event files sort by creation time (their names start with it): later ones win
        for f in sorted(dir_files, key=lambda p: p.name):
            _read_file(f, name, directory, per_prefix, warnings)
        if per_prefix:
            first = True
            for prefix in sorted(per_prefix):
                run = per_prefix[prefix]
                if first:
                    run.warnings.extend(warnings)
                    first = False
                runs.append(run)
        else:
            orphan_warnings.extend(warnings)
    return runs, orphan_warnings, len(files)


def _read_file(
    f: Path, name: str, directory: Path, per_prefix: dict[str, RunData], warnings: list[str]
) -> None:
    plugins: dict[str, tuple[str, bytes]] = {}  # tag -> (plugin name, content), first seen
    try:
        for event in _events(f):
            _take_event(event, f, name, directory, per_prefix, plugins)
    except _Corrupt as err:
        warnings.append(f"{f}: {err}; reporting what was read before it")
    except OSError as err:
        warnings.append(f"{f}: cannot be read ({err.strerror or err}); skipped")


def _run(per_prefix: dict[str, RunData], prefix: str, name: str, directory: Path) -> RunData:
    run = per_prefix.get(prefix)
    if run is None:
        label = f"{name} [{prefix}]" if prefix else name
        run = per_prefix[prefix] = RunData(label, directory)
    return run


def _take_event(
    event: Any,
    f: Path,
    name: str,
    directory: Path,
    per_prefix: dict[str, RunData],
    plugins: dict[str, tuple[str, bytes]],
) -> None:
    from tensorboard.util import tensor_util

    step = int(event.step)
    for value in event.summary.value:
        match = _TAG.match(value.tag)
        if match is None:
            continue
        if value.HasField("metadata") and value.tag not in plugins:
            data = value.metadata.plugin_data
            plugins[value.tag] = (data.plugin_name, data.content)
        plugin, content = plugins.get(value.tag, ("", b""))
        kind = value.WhichOneof("value")
        run = _run(per_prefix, match["lp"] or "", name, directory)
        if f not in run.files:
            run.files.append(f)
        run.last_wall_time = max(run.last_wall_time, float(event.wall_time))
        rest = match["rest"]
        if kind == "simple_value":
            run.scalars.setdefault(f"{PREFIX}/{rest}", {})[step] = float(value.simple_value)
        elif kind == "tensor" and plugin == PLUGIN_NAME:
            module = rest.rpartition("/")[0]
            array = tensor_util.make_ndarray(value.tensor)
            if is_diagnosis(content):
                _take_diagnosis(run, module, step, array)
            else:
                header = parse_header(content)
                if header is not None:
                    run.profiles.setdefault(module, {})[step] = (header, unpack(header, array))
        elif kind == "tensor" and plugin == "scalars" and not value.tensor.tensor_shape.dim:
            # tensor-style scalars (plugin "scalars", e.g. tensorboardX new-style)
            array = tensor_util.make_ndarray(value.tensor)
            if array.dtype.kind in "fiu":
                run.scalars.setdefault(f"{PREFIX}/{rest}", {})[step] = float(array)


def _take_diagnosis(run: RunData, module: str, step: int, array: np.ndarray) -> None:
    import json

    try:
        raw = array.reshape(-1)[0]
        data = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
    except (ValueError, IndexError, AttributeError):
        return
    if isinstance(data, dict):
        run.diagnoses.setdefault(module, {})[step] = data


def _events(path: Path) -> Iterator[Any]:
    """Parsed ``Event`` protos of one file; raises `_Corrupt` at the first bad record."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with open(path, "rb") as fh:
        offset = 0
        while True:
            head = fh.read(12)
            if not head:
                return
            if len(head) < 12:
                raise _Corrupt(_partial(offset))
            (length,) = struct.unpack("<Q", head[:8])
            if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                raise _Corrupt(f"corrupted record at byte {offset} (length checksum mismatch)")
            data = fh.read(length)
            tail = fh.read(4)
            if len(data) < length or len(tail) < 4:
                raise _Corrupt(_partial(offset))
            try:
                event = event_pb2.Event.FromString(data)
            except DecodeError:
                raise _Corrupt(f"corrupted record at byte {offset} (not an event)") from None
            if _ours(event) and struct.unpack("<I", tail)[0] != masked_crc32c(data):
                raise _Corrupt(f"corrupted record at byte {offset} (data checksum mismatch)")
            yield event
            offset += 16 + length


def _partial(offset: int) -> str:
    return f"ends in a partial record at byte {offset} (truncated, or still being written)"


def _ours(event: Any) -> bool:
    """Whether the event holds a value the report reads (its checksum is then verified)."""
    if not event.HasField("summary"):
        return False
    return any(
        v.WhichOneof("value") in ("simple_value", "tensor") and f"{PREFIX}/" in v.tag
        for v in event.summary.value
    )
