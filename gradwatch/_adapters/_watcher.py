"""What `GradWatch` and `Monitor` share: options, results, the step, panels, checkpoint state.

An adapter only says *when* things happen (Lightning hooks, or ``Monitor.step``) and where
its loop keeps the scaler and the loggers; everything else is here, written once.
"""

from __future__ import annotations

import logging
from typing import Any

from gradwatch._analysis.report import Report
from gradwatch._clipping import ClipEvent, Clipper
from gradwatch._engine.budget import Overhead
from gradwatch._engine.clip_control import ClipControl
from gradwatch._engine.history import ReportHistory
from gradwatch._engine.monitor import MonitorCore
from gradwatch._engine.options import WatchOptions
from gradwatch._engine.signals import StepOutcome, StepSignals

__all__ = ["Watcher"]

log = logging.getLogger("gradwatch")


class _Option:
    """A read-only attribute that reads the adapter's `WatchOptions` field of that name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.__doc__ = f"The ``{name}`` option (see `WatchOptions`)."

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj._options, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(
            f"{self.name} is read-only: the options are fixed at construction; make a new "
            f"{type(obj).__name__} to change them"
        )


class Watcher:
    """Base of the adapters. Subclasses call `_configure` first in ``__init__``."""

    _options: WatchOptions
    _core: MonitorCore
    _clip: ClipControl | None
    _writer: Any  # a PanelWriter, or None: nothing is written

    overhead_budget = _Option()
    every_n_steps = _Option()
    include = _Option()
    exclude = _Option()
    spike_factor = _Option()
    warmup_steps = _Option()
    history = _Option()
    log_every_n_steps = _Option()
    thresholds = _Option()
    clip = _Option()
    figures = _Option()
    async_flags = _Option()

    def _configure(self, options: WatchOptions, warn: Any = None) -> None:
        self._options = options
        self._core = MonitorCore(options, warn=warn)
        self._clip = ClipControl.build(options.clip, history=options.history, warn=self._core.warn)
        self._core.signals_every_step = self._clip is not None and self._clip.reactive
        self._writer = None

    @property
    def options(self) -> WatchOptions:
        """The validated options (frozen)."""
        return self._options

    # -- results -----------------------------------------------------------------------------
    @property
    def reports(self) -> ReportHistory:
        """Captured reports by optimizer step, the last ``history`` of them; ``reports[-1]``
        is the latest (see `ReportHistory`)."""
        return ReportHistory(self._core.reports)

    @property
    def latest_report(self) -> Report | None:
        """The latest captured report (``None`` before the first capture)."""
        return next(reversed(self._core.reports.values()), None)

    @property
    def verdicts(self) -> dict[str, str]:
        """Latest verdict of every watched module call (with hysteresis)."""
        return self._core.verdicts

    @property
    def signals(self) -> list[StepSignals]:
        """Cheap signals of recent optimizer steps (those still on the device are copied to
        the host first)."""
        self._core.flush_signals()
        return list(self._core.signals)

    @property
    def names(self) -> list[str]:
        """The watched modules (known once training has started)."""
        return list(self._core.names)

    @property
    def overhead(self) -> Overhead:
        """What gradwatch has spent so far: its own time against the training time
        (`gradwatch.Overhead`; ``overhead.fraction`` is also logged as ``gradwatch/overhead``
        on logging steps)."""
        return self._core.overhead

    @property
    def clipper(self) -> Clipper | None:
        """The `gradwatch.Clipper` in use (``None`` with ``clip=None``)."""
        return None if self._clip is None else self._clip.clipper

    @property
    def clip_events(self) -> list[ClipEvent]:
        """Recent clipping events (the last ``10 * history``): every step in ``"always"``
        mode, the clipped steps in ``"reactive"`` mode, and every non-finite step."""
        return [] if self._clip is None else list(self._clip.events)

    # -- the step ----------------------------------------------------------------------------
    def _finish_step(
        self,
        step: int,
        *,
        optimizer: Any,
        model: Any,
        scaler: Any,
        monitor: bool = True,
        clip: bool = True,
    ) -> StepOutcome | None:
        """Measure the step's raw gradients, then clip them, then publish both.

        Monitoring errors switch monitoring off and never reach training; clipping errors
        do (clipping changes training, so it must not fail silently). The overhead budget
        counts the monitoring and the publishing as gradwatch's time; clipping, which the
        user asked to change training, counts as training."""
        out = None
        core = self._core
        if monitor:
            try:
                out = core.finish_step(
                    step,
                    optimizer=optimizer,
                    scaler=scaler,
                    read_flags=self._clip is not None and self._clip.reactive,
                    end=False,
                )
            except Exception as e:  # monitoring must never crash training
                core.break_down(e)
        event = None
        if self._clip is not None and clip:
            self._before_clip(optimizer)
            event = self._clip.step(
                step,
                optimizer=optimizer,
                model=model,
                outcome=out,
                verdicts=self._core.verdicts,
                monitoring=self._core.broken is None,
                scaler=scaler,
            )
        if event is not None or (out is not None and _has_news(out)):
            start = core.clock()
            try:
                self._publish(out or StepOutcome(step), event)
            except Exception as e:  # monitoring must never crash training
                core.break_down(e)
            core.add_own_time(core.clock() - start)
        if monitor:
            try:
                core.end_step(step)
            except Exception as e:  # monitoring must never crash training
                core.break_down(e)
        return out

    def _before_clip(self, optimizer: Any) -> None:
        """Make the gradients ready for clipping (unscaled); Lightning has done it already."""

    def _publish(self, out: StepOutcome, event: ClipEvent | None) -> None:
        """Verdict changes as warnings; scalars, figures and profiles to the panels."""
        if event is None and not _has_news(out):
            return  # a cheap step between logging steps: nothing to say
        for change in out.changes:
            self._core.warn(_change_message(change))
        if self._writer is None:
            return
        from gradwatch._outputs.scalars import clip_scalars, overhead_scalars, signal_scalars

        extra = signal_scalars(out.signals[-1]) if out.signals else {}
        if self._core.is_logging_step(out.step):
            extra.update(overhead_scalars(self._core.overhead))
        # every clip, every non-finite step and every reactive event; in "always" mode (an
        # event every step) the threshold on logging steps only
        reactive = self._clip is not None and self._clip.reactive
        if event is not None and (
            event.clipped
            or event.threshold is None
            or reactive
            or self._core.is_logging_step(out.step)
        ):
            extra.update(clip_scalars(event))
        try:
            if out.report is not None:
                self._writer.write(out.step, out.report, extra_scalars=extra)
            elif extra:
                self._writer.write_scalars(out.step, extra)
        except Exception as e:  # a logger problem must not stop monitoring or training
            log.debug("gradwatch: could not write panels: %r", e)

    def _open_panels(self, target: Any) -> None:
        """Write panels to ``target`` (loggers, a SummaryWriter) from now on."""
        try:
            from gradwatch._outputs.panels import PanelWriter
        except ImportError as e:  # numpy missing: monitoring goes on without panels
            log.debug("gradwatch: no panels: %r", e)
            return

        self._writer = PanelWriter(
            target, history=self._options.history, figures=self._options.figures
        )

    def _write_layout(self) -> None:
        if self._writer is not None and self._core.names:
            self._writer.write_layout(self._core.names)

    def _close_panels(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.flush()
            except Exception as e:  # a logger problem must not stop training
                log.debug("gradwatch: could not flush panels: %r", e)

    # -- checkpointing -----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Detector state, history and clipping state: plain types and CPU tensors only."""
        state = self._core.state_dict()
        if self._clip is not None:
            state["clip"] = self._clip.state_dict()
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        clip = state.pop("clip", None)
        self._core.load_state_dict(state)
        if self._clip is not None and clip is not None:
            self._clip.load_state_dict(clip)
        elif self._clip is not None:
            log.info("gradwatch: the checkpoint holds no clipping state; clipping starts afresh")


def _has_news(out: StepOutcome) -> bool:
    """Whether a step has anything to publish (most steps under the budget have not)."""
    return out.report is not None or bool(out.changes) or bool(out.signals)


def _change_message(change: Any) -> str:
    """One log line for a verdict change (the panels' message when available)."""
    try:
        from gradwatch._outputs.messages import change_message

        return change_message(change.report, change.old, change.new, change.report.seq_len)
    except Exception:
        m = change.report
        return f"gradwatch: {change.name}: {change.old} -> {change.new}. {m.explain()}"
