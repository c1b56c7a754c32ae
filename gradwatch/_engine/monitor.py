"""The framework-free core shared by the Lightning callback and the plain-PyTorch monitor.

One *optimizer step* is the unit of everything here: the gradients of all the backward passes
since the previous step (accumulation micro-batches, truncated-BPTT chunks, a closure called
several times) make one step. The owner (an adapter) drives the core with two calls:

- `MonitorCore.bind` once, when the model's recurrent modules exist, then
  `MonitorCore.attach`;
- `MonitorCore.finish_step` after the last backward of a step and *before* the
  optimizer changes the weights (the replay needs the weights of the forward pass);
  with ``end=False``, then `MonitorCore.end_step` once the adapter's own work for the step
  (publishing) is done.

A step costs the *cheap signals* (`.signals`), checked by the spike detector
(`.detector`): the norm of the gradient injected into each watched module's outputs,
the gradient norm of each module's parameters, and a non-finite check. Some steps, and
those where the cheap signals show a spike or a non-finite value, are *captured*: the
recurrences are recorded by a windowed `gradwatch._capture.Recorder`, analysed
(`gradwatch._analysis.analyze`) and merged over micro-batches and ranks (`.merge`).
Which steps, and how often the signals are computed, the overhead budget decides
(`.budget`), from gradwatch's own time measured here around each piece of its work; a
fixed ``every_n_steps`` overrides its captures. Clipping lives in `.clip_control`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradwatch._analysis import analyze
from gradwatch._analysis.report import Report
from gradwatch._capture import Recorder, select_modules
from gradwatch._capture.families import looked_for
from gradwatch._engine._common import Warn, default_warn, distributed, scaler_info
from gradwatch._engine.accounting import BudgetMeter
from gradwatch._engine.budget import Overhead
from gradwatch._engine.detector import DeviceFlag, HostFlag, SpikeDetector, StepFlags
from gradwatch._engine.merge import build_step_report
from gradwatch._engine.options import WatchOptions
from gradwatch._engine.signals import CheapSignals, StepOutcome, StepSignals

__all__ = ["MonitorCore"]


class _Pending(NamedTuple):
    """One step's cheap signals and flags, still where they were computed (device or host)."""

    step: int
    signals: Any  # [4, M]: a device tensor, or nested lists on the host (see signals.py)
    flags: Any  # a uint8 [3] device tensor, or StepFlags
    captured: str | None


_PENDING_MAX = 1000  # cheap signals kept on the device at most before a transfer
_BUDGET_CHECK = 500  # after this many steps, say so if no capture ever fitted the budget


class MonitorCore:
    """Schedule, cheap signals, capture, merging, reduction, detector state and history.

    ``options`` are the validated `WatchOptions` of the adapter that owns it.
    """

    # class defaults: instances pickled by earlier versions lack these
    _nonfinite_seen = False
    _quiet_until = -1

    def __init__(self, options: WatchOptions | None = None, *, warn: Warn | None = None) -> None:
        options = options or WatchOptions()
        self.options = options
        self.include = options.include
        self.exclude = options.exclude
        self.every_n_steps = options.every_n_steps
        self.meter = BudgetMeter(options.overhead_budget, options.every_n_steps)
        # Reactive clipping reads the flags of every step: no signal stride then.
        self.signals_every_step = False
        self.detector = SpikeDetector(float(options.spike_factor), options.warmup_steps)
        self.history = options.history
        # ``None`` until the adapter knows its loop's interval (the Trainer's)
        self.log_every_n_steps = options.log_every_n_steps
        self.thresholds = options.thresholds
        self.async_flags = options.async_flags
        self.warn: Warn = warn or default_warn
        self.reports: OrderedDict[int, Report] = OrderedDict()
        self.signals: deque[StepSignals] = deque(maxlen=10 * self.history)
        self.tracker = self._make_tracker()
        self._init_runtime()

    def _init_runtime(self) -> None:
        """Everything that is rebuilt by `bind` and is not pickled."""
        self.session: Recorder | None = None
        self.names: list[str] = []
        self._cheap = CheapSignals([], torch.device("cpu"))
        self._device = torch.device("cpu")
        self._loaded: dict[str, Any] | None = getattr(self, "_loaded", None)
        self._pending: list[_Pending] = []
        self._flags: deque[DeviceFlag | HostFlag] = deque()
        self._planned: str | None = None
        self._signals_planned = True  # the planned step computes the cheap signals
        self._sync = True
        self._step_kind = (False, False)  # the finished step: (captured, had signals)
        self._next_forced: str | None = None
        self._nonfinite_seen = False  # a non-finite step has been captured in this run
        self._quiet_until = -1  # the last step of the planned run of quiet steps
        self._warned: set[str] = set()
        self.disabled: dict[str, str] = {}
        self.broken: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # picklable for ddp_spawn: no hooks, no session
        state = self.__dict__.copy()
        for k in ("session", "_cheap", "_pending", "_flags"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.session, self._cheap = None, CheapSignals([], torch.device("cpu"))
        self._pending, self._flags = [], deque()

    def _make_tracker(self) -> Any:
        from gradwatch._analysis.verdicts import VerdictTracker

        return VerdictTracker(self.thresholds)

    # -- results ---------------------------------------------------------------------------
    @property
    def verdicts(self) -> dict[str, str]:
        """Latest verdict of every watched module call, with hysteresis."""
        return dict(self.tracker.verdicts)

    # -- lifecycle -------------------------------------------------------------------------
    def bind(self, model: nn.Module, start_step: int = 0) -> list[str]:
        """Find the recurrent modules of ``model`` (not yet hooked); returns their names.

        Modules that cannot be measured are left out with a warning. When none is found,
        warns with what was searched (states marked with ``gradwatch.mark_state`` are still
        watched).
        """
        self.close()
        selection = select_modules(model, self.include, self.exclude)
        for name, _, why in selection.unsupported:
            self._warn_once(name, f"gradwatch: not watching {name!r}: {why}")
        for entry in selection.unmatched:
            self._warn_once(f"unmatched:{entry}", f"gradwatch: {entry} matched no recurrent module")
        consume = partial(analyze, thresholds=self.thresholds)
        session = Recorder(model, selection.watched, consume, windowed=True)
        session.clock = self.meter.clock
        self.meter.set_distributed(distributed())
        self.session = session
        self.names = list(session.names)
        params = [list(m.parameters()) for _, m, _ in selection.watched]
        first = next((p for ps in params for p in ps), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._cheap = CheapSignals(params, self._device)
        self._sync = (
            not self.async_flags if self.async_flags is not None else (self._device.type != "cuda")
        )
        if not self.names:
            filters = ""
            if self.include or self.exclude:
                filters = f" with include={self.include!r}, exclude={self.exclude!r}"
            self._warn_once(
                "<none>",
                f"gradwatch: no recurrent module found in {type(model).__name__} (searched its "
                f"{selection.searched} modules for {looked_for()} and their subclasses"
                f"{filters}); only states marked with gradwatch.mark_state() will be measured",
            )
        self._restore_detector()
        self.plan_step(start_step)
        return self.names

    def attach(self) -> None:
        if self.session is not None and self.broken is None:
            self.session.attach()
        self.meter.restart_interval()  # since the last step: neither training nor ours

    def detach(self) -> None:
        if self.session is not None:
            self.session.detach()

    def close(self) -> None:
        """Remove every hook and release everything recorded (the pending cheap signals are
        copied to the history first)."""
        if self.session is not None:
            self.flush_signals()
            self.session.close()
        self.session = None
        self._pending.clear()
        self._flags.clear()
        self._cheap.clear()

    def break_down(self, error: BaseException) -> None:
        """An unexpected internal error: stop monitoring altogether, warn once."""
        self.broken = repr(error)
        self.close()
        self._warn_once(
            "<internal>",
            f"gradwatch: internal error, monitoring is switched off for the rest of the run "
            f"(training continues unchanged): {error!r}",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    # -- schedule --------------------------------------------------------------------------
    @property
    def overhead(self) -> Overhead:
        """What gradwatch has spent so far, against the training time."""
        return self.meter.overhead()

    @property
    def clock(self) -> Callable[[], int]:
        """The budget's clock (nanoseconds)."""
        return self.meter.clock

    def _set_clock(self, clock: Callable[[], int]) -> None:
        """Measure the budget with ``clock`` (nanoseconds) instead of the wall clock: tests
        drive the schedule deterministically with a fake one."""
        self.meter.clock = clock
        if self.session is not None:
            self.session.clock = clock

    def plan_step(self, step: int, forced: str | None = None) -> None:
        """Set what optimizer step ``step`` records: a capture when it is scheduled or
        ``forced`` (``"spike"``, ``"nonfinite"``), else the cheap signals (on the budget's
        signal stride, and on every logging step) or nothing."""
        scheduler = self.meter.scheduler
        reason = "scheduled" if scheduler.capture_next(step) else None
        if forced is not None and reason is None:
            first = forced == "nonfinite" and not self._nonfinite_seen
            if not scheduler.force_allowed(forced, first_nonfinite=first):
                forced = None  # spiking while the budget is overdrawn: not captured
            elif forced == "nonfinite":
                self._nonfinite_seen = True
        self._planned = reason or forced
        signals = (  # the signals a logging step logs are its own
            self._planned is not None
            or self.signals_every_step
            or self.is_logging_step(step)
            or scheduler.signals_next()
        )
        self._signals_planned = signals
        self._quiet_until = step
        if not signals and not self.meter.distributed:
            self._quiet_until = step + self._quiet_ahead(step)
        if self.session is not None:
            self.session.plan(capture=self._planned is not None, signals=signals)

    def _quiet_ahead(self, step: int) -> int:
        """How many steps after quiet step ``step`` are surely quiet too (no capture, no
        signals, no logging step): those close without planning (`end_step`)."""
        ahead = self.meter.scheduler.quiet_ahead(step)
        every = self.log_every_n_steps
        if every is not None and ahead > 0:
            ahead = min(ahead, every - 1 - step % every)  # the next logging step logs
        return ahead

    def is_logging_step(self, step: int) -> bool:
        return self.log_every_n_steps is not None and step % self.log_every_n_steps == 0

    # -- the step ----------------------------------------------------------------------------
    def finish_step(
        self,
        step: int,
        *,
        optimizer: Any = None,
        scaler: Any = None,
        read_flags: bool = False,
        end: bool = True,
    ) -> StepOutcome:
        """Close optimizer step ``step``: cheap signals, capture if due, plan the next step.

        Call after the step's last backward pass and before the optimizer updates the
        weights. ``scaler`` is the run's ``torch.amp.GradScaler``, if any. ``read_flags``
        reads this step's flags on the host even with ``async_flags`` (one device sync; the
        spike capture is still scheduled two steps later): reactive clipping needs them now,
        so the signals are computed at every step then. Without ``async_flags`` (the CPU)
        a spike or non-finite value at this step is captured at the next step. With
        ``end=False`` the caller calls `end_step` after its own work for the step (writing
        the panels), so that it is measured as gradwatch's time, and the next step is
        planned then.
        """
        session = self.session
        if session is None or self.broken is not None:
            return StepOutcome(step)
        clock = self.meter.clock
        start = clock()
        try:
            out = None
            if self._planned is None and not self._signals_planned and not read_flags:
                out = self._finish_quiet(session, step)
            if out is None:
                out = self._measure(session, step, optimizer, scaler, read_flags)
        finally:
            self.meter.add(clock() - start)
        if end:
            self.end_step(step)
        return out

    def add_own_time(self, ns: int) -> None:
        """Count ``ns`` nanoseconds of the adapter's work (writing panels) as gradwatch's."""
        self.meter.add(ns)

    def end_step(self, step: int) -> None:
        """End the budget's interval of step ``step`` (everything since the previous
        step's end: gradwatch's own time, the rest is training) and plan step ``step + 1``."""
        session = self.session
        if session is None or self.broken is not None:
            return
        meter = self.meter
        hooks, session.own_ns = session.own_ns, 0
        captured, signals = self._step_kind
        if step < self._quiet_until and not (captured or signals or self._next_forced):
            # a run of quiet steps planned ahead: the next one is as quiet as this one, and
            # the budget's interval closes at the end of the run
            meter.skip_step(hooks)
            return
        sync = meter.distributed and self.is_logging_step(step)  # the same steps on all ranks
        meter.end_step(hooks, captured=captured, signals=signals, sync=sync)
        if meter.steps >= _BUDGET_CHECK and "<budget>" not in self._warned and meter.unreachable():
            self._warn_budget()
        start = meter.start
        self.plan_step(step + 1, self._next_forced)
        self._next_forced = None
        if start is not None:  # this bookkeeping belongs to the next interval
            meter.add(meter.clock() - start)

    def _warn_budget(self) -> None:
        o = self.overhead
        self._warn_once(
            "<budget>",
            f"gradwatch: its work at every step alone costs {100 * o.fraction:.1f}% of the "
            f"training time, more than overhead_budget={o.budget:g}: no capture has fitted "
            f"in {_BUDGET_CHECK} steps (spikes and non-finite values are still captured). "
            "Raise overhead_budget, or pass every_n_steps for a fixed schedule",
        )

    def _measure(
        self, session: Recorder, step: int, optimizer: Any, scaler: Any, read_flags: bool
    ) -> StepOutcome:
        scale, grads_scaled, found_inf = scaler_info(scaler, optimizer)
        injected = session.take_injected()
        reason = self._planned
        signals = self._signals_planned or reason is not None or read_flags
        sig: Any = None
        flag: DeviceFlag | HostFlag | None = None
        if signals:
            if self._cheap.host:  # a CPU model: reading values costs nothing, no tensor ops
                sig = self._cheap.host_signals(injected, optimizer, scale, grads_scaled)
                flag = HostFlag(self.detector.update_host(sig, scale is not None, found_inf))
            else:
                sig = self._cheap.device_signals(injected, optimizer, scale, grads_scaled)
                flag = DeviceFlag(self.detector.update(sig, scale is not None, found_inf))

        now: StepFlags | None = None
        # on the CPU (sync) the flags are read now, for free: a spike is captured at the next
        # step (cheap steps record nothing to replay); a capture step synchronises anyway
        if flag is None:  # a step off the signal stride: nothing measured, nothing to read
            pass
        elif self._sync or reason is not None:
            now = flag.read()
        else:
            self._flags.append(flag)
            if read_flags:
                now = flag.read()
        results, failures = session.finish(replay=reason is not None)
        self._warn_skipped(step, session.window_skipped)

        report = None
        skipped = now.skipped if now is not None else False
        changes: tuple[Any, ...] = ()
        if reason is not None:
            report, failures = build_step_report(results, failures, scale)
            if not report.modules and not report.failures:
                report = None  # nothing was measured (no recurrent module reached)
        self._handle_failures(failures)
        if report is not None:
            if not skipped:
                changes = tuple(self.tracker.update(report))
            self.reports[step] = report
            while len(self.reports) > self.history:
                self.reports.popitem(last=False)
        if flag is not None:
            self._pending.append(_Pending(step, sig, flag.flags, reason))
        materialised: tuple[StepSignals, ...] = ()
        if reason is not None or self.is_logging_step(step) or len(self._pending) > _PENDING_MAX:
            materialised = self.flush_signals()
        self._step_kind = (reason is not None, flag is not None)
        self._next_forced = self._late_flags(now, reason, all_of_them=flag is None)
        return StepOutcome(step, report, reason, skipped, changes, materialised, now)

    def _finish_quiet(self, session: Recorder, step: int) -> StepOutcome | None:
        """A step planned to record nothing (most steps under the budget): close its window
        with the fewest operations; ``None`` when something was recorded after all (a
        failure, an injected gradient, flags still pending) and the full path must run."""
        if self._flags or not session.finish_quiet():
            return None
        self._step_kind = (False, False)
        self._next_forced = None
        return StepOutcome(step)

    def _late_flags(
        self, now: StepFlags | None, reason: str | None, all_of_them: bool
    ) -> str | None:
        """The capture forced on the next step by flags: on the host (sync), this step's
        (a captured spike needs no second capture); with asynchronous flags, the previous
        signal step's, one step late (all pending ones on a step without signals)."""
        if self._sync:
            if now is None or reason is not None:
                return None
            return "nonfinite" if now.nonfinite else "spike" if now.spike else None
        forced = None
        keep = 0 if all_of_them else 1
        while len(self._flags) > keep:
            old = self._flags.popleft().read()
            if old.nonfinite:
                forced = "nonfinite"
            elif old.spike and forced is None:
                forced = "spike"
        return forced

    def _warn_skipped(self, step: int, skipped: Mapping[str, str]) -> None:
        """A capture that ran out of memory is skipped, not a failure: the module stays
        watched and the next capture tries again. One warning per skipped capture."""
        if skipped:
            names = ", ".join(repr(n) for n in skipped)
            self.warn(
                f"gradwatch: skipped the capture of {names} at step {step}: "
                f"{next(iter(skipped.values()))}; training and monitoring go on"
            )

    def _handle_failures(self, failures: Mapping[str, str]) -> None:
        if self.session is None:
            return
        for name, why in failures.items():
            if name in self.disabled:
                continue
            self.disabled[name] = why
            self.session.disable(name, why)
            self._warn_once(
                f"failure:{name}",
                f"gradwatch: stopped watching {name!r} after an internal error ({why}); the "
                "other modules are still watched and training is not affected",
            )

    # -- history -----------------------------------------------------------------------------
    def flush_signals(self) -> tuple[StepSignals, ...]:
        """Copy the pending cheap signals to the host history (one transfer)."""
        if not self._pending:
            return ()
        pending, self._pending = self._pending, []
        on_device = [i for i, p in enumerate(pending) if isinstance(p.signals, Tensor)]
        rows: list[Any] = [p.signals for p in pending]
        flags: list[Any] = [p.flags for p in pending]
        if on_device:
            sigs = torch.stack([rows[i] for i in on_device]).cpu().tolist()
            fls = torch.stack([flags[i] for i in on_device]).cpu().tolist()
            for i, sig, fl in zip(on_device, sigs, fls, strict=True):
                rows[i], flags[i] = sig, fl
        out = []
        for p, sig, fl in zip(pending, rows, flags, strict=True):
            # rows: the values of both signals, then how many ranks measured each (their mean)
            injected, grad_norm = (
                {n: v[i] / max(c[i], 1.0) for i, n in enumerate(self.names) if c[i] > 0}
                for v, c in zip(sig[:2], sig[2:], strict=True)
            )
            flag = StepFlags(*(bool(v) for v in fl))
            s = StepSignals(p.step, injected, grad_norm, *flag, p.captured)
            self.signals.append(s)
            out.append(s)
        return tuple(out)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detector state and history, made of plain types and CPU tensors only (loadable
        with ``torch.load(weights_only=True)``). Reports are not saved."""
        self.flush_signals()
        pending = getattr(self, "_loaded", None)
        if pending is not None:  # loaded before training started: hand it on unchanged
            return {
                **pending,
                "tracker": self.tracker.state_dict(),
                "signals": [s.as_dict() for s in self.signals],
            }
        ema, count = self.detector.ema, self.detector.count
        return {
            "version": 1,
            "names": list(self.names),
            "ema": None if ema is None else ema.detach().cpu().clone(),
            "count": None if count is None else count.detach().cpu().clone(),
            "tracker": self.tracker.state_dict(),
            "signals": [s.as_dict() for s in self.signals],
            "disabled": dict(self.disabled),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"not a gradwatch monitor state: {state!r:.200}")
        self.tracker.load_state_dict(state["tracker"])
        self.signals = deque(
            (StepSignals(**s) for s in state.get("signals", [])), maxlen=10 * self.history
        )
        self._loaded = state
        if self.session is not None:
            self._restore_detector()

    def _restore_detector(self) -> None:
        state, self._loaded = self._loaded, None
        if state is None:
            return
        if state.get("names") != self.names:
            self._warn_once(
                "<resume>",
                "gradwatch: the checkpoint's monitor state is for modules "
                f"{state.get('names')}, the model has {self.names}: spike detection restarts",
            )
            return
        if state.get("ema") is not None:
            self.detector.load(state["ema"], state["count"], self._device, self._cheap.host)
