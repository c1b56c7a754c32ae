"""Write reports to whatever logger the run has: scalars everywhere, pictures where possible.

Scalars go through the Lightning logger API (``logger.log_metrics(metrics, step)``), which
every Lightning logger implements (TensorBoard, CSV, W&B, MLflow, ...), or through
``add_scalar`` for a raw ``SummaryWriter``. Figures and the custom-scalars layout need a
TensorBoard ``SummaryWriter``; W&B-style loggers with ``log_image`` get the figures too.
Anything else skips them quietly: one debug line, never an exception into training.

Only TensorBoard loggers have their ``experiment`` touched, and only on first use: for
other loggers that attribute creates remote runs.
"""

from __future__ import annotations

import importlib
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import numpy as np

from gradwatch._analysis.report import ModuleReport, Report
from gradwatch._outputs.layout import layout_for
from gradwatch._outputs.scalars import PREFIX, module_tag, scalars_for

__all__ = ["PanelWriter", "ProfileHistory"]

log = logging.getLogger("gradwatch")

FIGURE_KINDS = ("heatmap", "profile", "propagation")

#: With ``figures="auto"`` and no TensorBoard writer, figures are rendered on every this
#: many-th report only (they cost about as much as a capture on small models).
AUTO_FIGURE_EVERY = 5


class ProfileHistory:
    """The last ``maxlen`` per-timestep profiles (``total``, ``[L, D, T]``) of each call.

    Bounded in both directions: ``maxlen`` steps per call and ``max_calls`` calls, so a long
    run never grows it. Profiles are kept as float32 numpy arrays.
    """

    def __init__(self, maxlen: int = 200, max_calls: int = 64) -> None:
        if maxlen < 1:
            raise ValueError(f"history must be at least 1 step, got {maxlen}")
        self.maxlen = maxlen
        self.max_calls = max_calls
        self._rings: dict[str, deque[tuple[int, np.ndarray]]] = {}

    def add(self, step: int, report: Mapping[str, ModuleReport]) -> None:
        for name, m in report.items():
            ring = self._rings.get(name)
            if ring is None:
                if len(self._rings) >= self.max_calls:
                    continue
                ring = self._rings[name] = deque(maxlen=self.maxlen)
            ring.append((int(step), m.total.detach().float().cpu().numpy().copy()))

    def get(self, name: str) -> tuple[list[int], list[np.ndarray]]:
        """Training steps (sorted) and the matching profiles of one call."""
        items = sorted(self._rings.get(name, ()), key=lambda item: item[0])
        return [s for s, _ in items], [p for _, p in items]

    def __contains__(self, name: object) -> bool:
        return name in self._rings

    def __len__(self) -> int:
        return sum(len(r) for r in self._rings.values())


@dataclass
class _Sink:
    """One destination: a Lightning logger or a raw SummaryWriter."""

    target: Any
    lightning: bool
    tensorboard: bool
    logger_prefix: str = ""
    images: bool = True  # turned off after the first failure
    profiles: bool = True  # the gradwatch tab's tensors; off after the first failure
    scalars_failed: bool = False
    resolved: bool = False
    writer: Any = None  # SummaryWriter for images and layout, once resolved
    image_fn: Any = None  # W&B-style logger.log_image
    layout_modules: list[str] = field(default_factory=list)


class PanelWriter:
    """gradwatch's panels for one run: scalars every call, figures and a dashboard where the
    logger can show them.

    Args:
        target: A Lightning logger (anything with ``log_metrics``), a
            ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's), a list of those
            (e.g. ``trainer.loggers``) or ``None`` (write nothing).
        history: How many reports per call the heatmap keeps (a ring; older ones drop out).
        figures: Render figures: ``True`` on every k-th `write` (``figure_every``),
            ``False`` never, ``"auto"`` never while the gradwatch TensorBoard tab gets the
            same data (some destination is a TensorBoard writer taking the profiles), else
            on every ``max(figure_every, AUTO_FIGURE_EVERY)``-th `write`. They cost tens of
            milliseconds each, on the training thread.
        figure_every: Render figures on every k-th `write` only.
        dpi: Figure resolution.
        auto_layout: Write the dashboard on the first `write` if `write_layout`
            was not called, and extend it when a new module appears.
        prefix: Tag prefix (``"gradwatch"``).
        profiles: Write the per-timestep profiles of each call as a tensor summary for the
            gradwatch TensorBoard tab (``<prefix>/<module>/profiles``, TensorBoard only).
    """

    def __init__(
        self,
        target: Any,
        history: int = 200,
        *,
        figures: bool | Literal["auto"] = True,
        figure_every: int = 1,
        dpi: int = 80,
        auto_layout: bool = True,
        prefix: str = PREFIX,
        profiles: bool = True,
    ) -> None:
        if figure_every < 1:
            raise ValueError(f"figure_every must be >= 1, got {figure_every}")
        targets = target if isinstance(target, (list, tuple)) else [target]
        self._sinks = [_make_sink(t) for t in targets if t is not None]
        self.history = ProfileHistory(history)
        self.figures = figures
        self.figure_every = figure_every
        self.dpi = dpi
        self.auto_layout = auto_layout
        self.prefix = prefix
        self.profiles = profiles
        self._writes = 0
        self._layout_modules: list[str] = []
        self._figures_module: ModuleType | None = None
        self._matplotlib_missing = False

    # -- public API --------------------------------------------------------------------------

    @property
    def supports_figures(self) -> bool:
        """Whether some destination can show figures (resolves TensorBoard writers)."""
        return any(self._image_target(s) for s in self._sinks)

    def write_layout(self, module_names: Iterable[str]) -> None:
        """Write the custom-scalars dashboard (once per run; again only to add modules).

        ``module_names`` are module or call names; calls of one module share a category.
        """
        added = False
        for name in module_names:
            base = _base(name)
            if base not in self._layout_modules:
                self._layout_modules.append(base)
                added = True
        for sink in self._sinks:
            if not added and sink.layout_modules == self._layout_modules:
                continue
            writer = self._writer(sink)
            if writer is None or not callable(getattr(writer, "add_custom_scalars", None)):
                continue
            layout = layout_for(
                self._layout_modules, logger_prefix=sink.logger_prefix, prefix=self.prefix
            )
            try:
                writer.add_custom_scalars(layout)
            except Exception as err:  # never break training for a dashboard
                log.debug("gradwatch: could not write the TensorBoard layout: %r", err)
                continue
            sink.layout_modules = list(self._layout_modules)

    def write(
        self,
        step: int,
        report: Report | Mapping[str, ModuleReport],
        extra_scalars: Mapping[str, float] | None = None,
    ) -> None:
        """Scalars of ``report`` (plus ``extra_scalars``, tags used as given) and figures."""
        self._writes += 1
        scalars = scalars_for(report, prefix=self.prefix)
        if extra_scalars:
            scalars.update({k: _float(v) for k, v in extra_scalars.items()})
        self.write_scalars(step, scalars)
        names = [m.module_name or _base(n) for n, m in report.items()]
        if self.auto_layout and any(n not in self._layout_modules for n in names):
            self.write_layout(names)
        if self.profiles:
            self.write_profiles(step, report)
        every = self._figure_interval()
        if every is None:
            return
        self.history.add(step, report)
        if (self._writes - 1) % every == 0:
            self.write_figures(step, report)

    def _figure_interval(self) -> int | None:
        """Render figures on every this many-th `write` (``None``: not at all)."""
        if not self.figures or not self._sinks:
            return None
        if self.figures == "auto" and self.tab_draws_profiles:
            return None
        if not any(self._image_target(s) for s in self._sinks):
            return None
        if self.figures == "auto":
            return max(self.figure_every, AUTO_FIGURE_EVERY)
        return self.figure_every

    @property
    def tab_draws_profiles(self) -> bool:
        """Whether some destination is a TensorBoard writer taking the profiles, which the
        gradwatch tab draws (the heatmap, profile and propagation of the figures)."""
        return self.profiles and any(
            s.profiles and self._file_writer(s) is not None for s in self._sinks
        )

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Cheap per-step signals: scalars only, tags used as given."""
        if not scalars:
            return
        metrics = {k: _float(v) for k, v in scalars.items()}
        for sink in self._sinks:
            try:
                if sink.lightning:
                    sink.target.log_metrics(metrics, step=int(step))
                else:
                    for tag, value in metrics.items():
                        sink.target.add_scalar(tag, value, int(step))
            except Exception as err:
                if not sink.scalars_failed:
                    sink.scalars_failed = True
                    log.warning(
                        "gradwatch could not log scalars to %s (%r); training continues, further "
                        "failures of this logger are not reported",
                        type(sink.target).__name__,
                        err,
                    )

    def write_figures(self, step: int, report: Report | Mapping[str, ModuleReport]) -> None:
        """Heatmap (from the history), latest profile and propagation curve of each call."""
        figs = self._load_figures()
        if figs is None:
            return
        for name, m in report.items():
            for kind in FIGURE_KINDS:
                try:
                    fig = self._make_figure(figs, kind, name, m)
                    if fig is None:
                        continue
                    image = figs.render(fig)
                except Exception as err:  # a drawing bug must not stop training
                    log.debug("gradwatch: could not draw the %s of %s: %r", kind, name, err)
                    continue
                self._emit_image(module_tag(name, kind, self.prefix), image, step)

    def write_profiles(self, step: int, report: Report | Mapping[str, ModuleReport]) -> None:
        """The gradwatch tab's data: one ``<prefix>/<module>/profiles`` tensor summary per call,
        and one ``<prefix>/<module>/diagnosis`` string tensor (format in
        `gradwatch._outputs.tb_plugin.metadata`), TensorBoard writers only."""
        sinks = [s for s in self._sinks if s.profiles and self._file_writer(s) is not None]
        if not sinks:
            return
        from gradwatch._outputs.tb_plugin.metadata import (
            DIAGNOSIS_METRIC,
            PROFILE_METRIC,
            diagnosis_summary,
            profile_summary,
        )

        for name, m in report.items():
            tag = module_tag(name, PROFILE_METRIC, self.prefix)
            diagnosis_tag = module_tag(name, DIAGNOSIS_METRIC, self.prefix)
            for sink in sinks:
                head = f"{sink.logger_prefix}-" if sink.logger_prefix else ""
                try:
                    cls = _summary_class(sink.writer)
                    summary = profile_summary(head + tag, m, cls)
                    self._file_writer(sink).add_summary(summary, int(step))
                    # what `gradwatch report` needs beyond numbers: the dominant cause and
                    # where the first non-finite value appeared
                    summary = diagnosis_summary(head + diagnosis_tag, m, cls)
                    self._file_writer(sink).add_summary(summary, int(step))
                except Exception as err:  # the tab's data must never break training
                    sink.profiles = False
                    log.debug(
                        "gradwatch: profiles for the gradwatch tab disabled for %s: %r",
                        type(sink.target).__name__,
                        err,
                    )

    def flush(self) -> None:
        """Push buffered events to disk (``logger.save()`` or ``writer.flush()``)."""
        for sink in self._sinks:
            try:
                if sink.lightning and callable(getattr(sink.target, "save", None)):
                    sink.target.save()
                elif sink.writer is not None or not sink.lightning:
                    (sink.writer or sink.target).flush()
            except Exception as err:
                log.debug("gradwatch: flush failed: %r", err)

    # -- internals ---------------------------------------------------------------------------

    def _make_figure(self, figs: ModuleType, kind: str, name: str, m: ModuleReport) -> Any:
        if kind == "heatmap":
            steps, profiles = self.history.get(name)
            if not profiles:
                return None
            return figs.heatmap_figure(m, steps, profiles, dpi=self.dpi)
        if kind == "profile":
            return figs.profile_figure(m, dpi=self.dpi)
        return figs.propagation_figure(m, dpi=self.dpi)

    def _load_figures(self) -> ModuleType | None:
        if self._figures_module is None and not self._matplotlib_missing:
            try:
                self._figures_module = importlib.import_module("gradwatch._outputs.figures")
            except ImportError as err:
                self._matplotlib_missing = True
                log.info(
                    "gradwatch figures are skipped: matplotlib is not available (%s); "
                    "install it with `pip install gradwatch[plots]`",
                    err,
                )
        return self._figures_module

    def _emit_image(self, tag: str, image: np.ndarray, step: int) -> None:
        for sink in self._sinks:
            if not self._image_target(sink):
                continue
            full = f"{sink.logger_prefix}-{tag}" if sink.logger_prefix else tag
            try:
                if sink.writer is not None:
                    sink.writer.add_image(full, image, int(step), dataformats="HWC")
                else:
                    sink.image_fn(key=full, images=[image], step=int(step))
            except Exception as err:
                sink.images = False
                log.debug("gradwatch: figures disabled for %s: %r", type(sink.target).__name__, err)

    def _image_target(self, sink: _Sink) -> bool:
        if not sink.images:
            return False
        self._writer(sink)
        if sink.writer is None and sink.image_fn is None:
            sink.images = False
            log.debug(
                "gradwatch: %s shows no images; figures are skipped for it (scalars still go "
                "through log_metrics)",
                type(sink.target).__name__,
            )
            return False
        return True

    def _file_writer(self, sink: _Sink) -> Any:
        """The event-file writer of a TensorBoard sink (``SummaryWriter._get_file_writer()``)."""
        writer = self._writer(sink)
        get = getattr(writer, "_get_file_writer", None)
        return get() if callable(get) else None

    def _writer(self, sink: _Sink) -> Any:
        """The SummaryWriter behind a sink, resolved on first use."""
        if not sink.resolved:
            sink.resolved = True
            if not sink.lightning:
                sink.writer = sink.target
            elif sink.tensorboard:
                try:
                    experiment = sink.target.experiment
                except Exception as err:
                    log.debug("gradwatch: no TensorBoard writer: %r", err)
                    experiment = None
                if _is_summary_writer(experiment):
                    sink.writer = experiment
            elif callable(getattr(sink.target, "log_image", None)):
                sink.image_fn = sink.target.log_image
        return sink.writer


def _make_sink(target: Any) -> _Sink:
    if callable(getattr(target, "log_metrics", None)):
        tb = _looks_like_tensorboard(target)
        prefix = str(getattr(target, "_prefix", "") or "") if tb else ""
        return _Sink(target, lightning=True, tensorboard=tb, logger_prefix=prefix)
    if _is_summary_writer(target):
        return _Sink(target, lightning=False, tensorboard=True)
    raise TypeError(
        "PanelWriter needs a Lightning logger (with log_metrics), a TensorBoard SummaryWriter, "
        f"a list of those or None; got {type(target).__name__}"
    )


def _looks_like_tensorboard(logger: Any) -> bool:
    """By class, not isinstance: lightning.pytorch and pytorch_lightning classes differ."""
    names = (f"{c.__module__}.{c.__name__}".lower() for c in type(logger).__mro__)
    return any("tensorboard" in n for n in names)


def _is_summary_writer(obj: Any) -> bool:
    return (
        obj is not None
        and all(callable(getattr(obj, attr, None)) for attr in ("add_scalar", "add_image"))
        and (hasattr(obj, "_get_file_writer") or hasattr(obj, "add_custom_scalars"))
    )


def _summary_class(writer: Any) -> Any:
    """tensorboardX writers take their own ``Summary`` proto; ``None``: TensorBoard's."""
    if type(writer).__module__.split(".")[0] != "tensorboardX":
        return None
    from tensorboardX.proto.summary_pb2 import Summary

    return Summary


def _base(name: str) -> str:
    head, sep, tail = name.rpartition("#")
    return head if sep and tail.isdigit() else name


def _float(value: Any) -> float:
    try:
        if hasattr(value, "item"):
            return float(value.item())
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return float("nan")
