"""The overhead budget: when gradwatch may capture, and how often it computes its signals.

gradwatch keeps its own time within a fraction of the training time (2% by default). Both
are measured, with the wall clock, by the owner of a `BudgetScheduler` (the monitor core's
`gradwatch._engine.accounting.BudgetMeter`), one *interval* per optimizer step, from the
end of one step's gradwatch work to the end of the next:

- ``own``: the time spent inside gradwatch in that interval (its hooks during forward and
  backward, its step work: signals, replay, diagnostics, merging, and what its adapter
  writes to loggers), measured with ``time.perf_counter_ns`` around each piece of its own work;
- ``training``: the rest of the interval (data loading, forward, backward, the optimizer,
  the loop's own logging). The first interval after an attach (the start of training, the
  end of a validation loop) has no start and adds no training time.

Decisions, made at the end of each step for the next one:

- **Captures** (without a fixed ``every_n_steps``): the next step is captured when what has
  been spent, plus the expected cost of a capture, stays within ``fraction`` of the training
  time, the next step's included. The expected cost is the measured own time of recent
  capture intervals (a running average); before the first capture it is ``prior_capture``
  times the training time of a step, so the first capture is paid for by the budget too.
  The first capture of a run also pays for one-time work (imports, first calls of
  kernels): it is paid in full, but as an estimate of the next ones it counts for at most
  the prior (later captures correct the estimate). The step after a capture runs slower
  than usual (the capture released its memory and evicted the caches): its excess over the
  running average of a step is counted as the capture's, not as training.
- **Forced captures** (a spike, a non-finite value) happen at once, are recorded and are paid
  from the same budget: the scheduled ones wait until it has recovered. A spike while the
  budget is still overdrawn by earlier captures is not captured (`force_allowed`; the spike
  stays in the signals and is counted in ``Overhead.uncaptured``), so a run whose gradients
  keep spiking overshoots the budget by at most one capture. The first non-finite step of a
  run is always captured.
- **Signals**: the cheap signals of a step may use ``signal_share`` of the budget. When they
  cost more on this model, they are computed every ``stride`` steps only, the stride chosen
  from their measured cost.

This class only does arithmetic on the durations it is given: no clock, no framework, so it
can be tested with made-up numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_OVERHEAD_BUDGET", "BudgetScheduler", "Overhead"]

#: Default budget: gradwatch's own time as a fraction of the training time.
DEFAULT_OVERHEAD_BUDGET = 0.02

_STEP_ALPHA = 0.1  # running average of a step's training time (about 10 steps)
_COST_ALPHA = 0.5  # running averages of own costs (recent captures weigh most)


@dataclass(frozen=True)
class Overhead:
    """What gradwatch has spent so far.

    Attributes:
        spent_s: Seconds of gradwatch's own work.
        training_s: Seconds of training time, gradwatch's own work excluded.
        fraction: ``spent_s / training_s`` (0 before any training time): the slowdown of
            training, ``1 + fraction`` times its time without gradwatch.
        budget: The budget (a fraction of the training time), ``None`` without one.
        captures: Captured steps.
        signal_stride: Signals are computed every this many steps (1: every step).
        uncaptured: Spikes not captured because the budget was overdrawn.
    """

    spent_s: float
    training_s: float
    fraction: float
    budget: float | None
    captures: int
    signal_stride: int
    uncaptured: int = 0

    def describe(self) -> str:
        """One line for the end-of-training summary."""
        budget = "no budget" if self.budget is None else f"budget {100 * self.budget:.1f}%"
        stride = "" if self.signal_stride == 1 else f", signals every {self.signal_stride} steps"
        missed = "" if not self.uncaptured else f", {self.uncaptured} spikes not captured"
        return (
            f"gradwatch overhead: {100 * self.fraction:.2f}% of training time "
            f"({self.spent_s:.2f} s of {self.training_s:.1f} s; {budget}; "
            f"{self.captures} captures{stride}{missed})"
        )


class BudgetScheduler:
    """Decides, step by step, whether the next step is captured and measures its signals.

    Args:
        fraction: The budget, gradwatch's own time as a fraction of the training time
            (``None``: no budget; signals every step, captures only every
            ``every_n_steps``).
        every_n_steps: A fixed capture schedule (every this many steps, starting at the
            first) instead of the budget's. The budget still spaces the signals.
        prior_capture: Expected cost of the first capture, in training steps.
        signal_share: Share of the budget the per-step signals may use.
        max_stride: The longest signal stride.
    """

    # class defaults: instances pickled by earlier versions lack these
    uncaptured = 0
    _pending_capture: float | None = None

    def __init__(
        self,
        fraction: float | None = DEFAULT_OVERHEAD_BUDGET,
        *,
        every_n_steps: int | None = None,
        prior_capture: float = 4.0,
        signal_share: float = 0.5,
        max_stride: int = 50,
    ) -> None:
        if fraction is not None and not (
            isinstance(fraction, int | float) and not isinstance(fraction, bool) and fraction > 0
        ):
            raise ValueError(f"overhead_budget must be a number > 0 or None, got {fraction!r}")
        if fraction is None and every_n_steps is None:
            raise ValueError("without an overhead budget, every_n_steps must be given")
        self.fraction = None if fraction is None else float(fraction)
        self.every_n_steps = every_n_steps
        self.prior_capture = prior_capture
        self.signal_share = signal_share
        self.max_stride = max_stride
        self.spent = 0.0
        self.training = 0.0
        self.captures = 0
        self.uncaptured = 0
        self.stride = 1
        self._step: float | None = None  # running training time of one step
        self._capture: float | None = None  # running own time of a capture interval
        self._signal: float | None = None  # ... of an interval with signals, no capture
        self._quiet: float | None = None  # ... of an interval with neither
        self._pending_capture: float | None = None  # own time of the last step, a capture
        self._since_signals = 0  # steps since the last one with signals

    # -- accounting ---------------------------------------------------------------------------
    def record(
        self,
        interval: float | None,
        own: float,
        *,
        captured: bool,
        signals: bool,
        steps: int = 1,
    ) -> None:
        """One step's interval: ``interval`` wall seconds (``None`` for the first interval
        after an attach), ``own`` of them gradwatch's; whether the step was captured and
        had its signals computed. ``steps > 1``: the interval also holds the quiet steps
        skipped before it (`quiet_ahead`), each taking an equal share."""
        own = max(own, 0.0)
        after = self._pending_capture
        self._pending_capture = None
        excess = 0.0
        if interval is not None:
            train = max(interval - own, 0.0)
            if after is not None and not captured and self._step is not None:
                # the step after a capture is slower (the capture's memory was released,
                # caches were evicted): its excess over usual steps is the capture's cost
                excess = max(train - steps * self._step, 0.0)
                train -= excess
            self.training += train
            self._step = _average(self._step, train / steps, _STEP_ALPHA, steps)
        self.spent += own + excess
        if steps > 1:  # the skipped quiet steps, then this one
            self._quiet = _average(self._quiet, own / steps, _COST_ALPHA, steps - 1)
            self._since_signals += steps - 1
            own /= steps
        if after is not None:
            self._capture_cost(after + excess)
        if captured:
            self.captures += 1
            self._pending_capture = own  # its cost is known after the next step
        elif signals:
            self._signal = _average(self._signal, own, _COST_ALPHA)
        else:
            self._quiet = _average(self._quiet, own, _COST_ALPHA)
        self._since_signals = 0 if (signals or captured) else self._since_signals + 1
        self.stride = self._stride()

    def _capture_cost(self, cost: float) -> None:
        self._capture = self._estimate_with(cost)

    def _estimate_with(self, cost: float) -> float:
        """The capture estimate after one more capture costing ``cost``."""
        if self._capture is None and self._step is not None:
            # the first capture's one-time work is no estimate of the next ones
            cost = min(cost, self.prior_capture * self._step)
        return _average(self._capture, cost, _COST_ALPHA)

    def overhead(self) -> Overhead:
        fraction = self.spent / self.training if self.training > 0 else 0.0
        return Overhead(
            self.spent,
            self.training,
            fraction,
            self.fraction,
            self.captures,
            self.stride,
            self.uncaptured,
        )

    # -- decisions for the next step ------------------------------------------------------
    def capture_next(self, step: int) -> bool:
        """Whether optimizer step ``step`` (the next one) is a scheduled capture."""
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        assert self.fraction is not None
        if self._step is None:  # nothing measured yet: no training time to pay with
            return False
        return self.spent + self._expected_capture() <= self.fraction * (self.training + self._step)

    def _expected_capture(self) -> float:
        """The expected own time of a capture (``_step`` is known)."""
        assert self._step is not None
        estimate = self._capture
        if self._pending_capture is not None:  # the last step was one, aftermath unknown yet
            estimate = self._estimate_with(self._pending_capture)
        return self.prior_capture * self._step if estimate is None else estimate

    def force_allowed(self, reason: str, *, first_nonfinite: bool = False) -> bool:
        """Whether a capture forced by ``reason`` (``"spike"``, ``"nonfinite"``) happens
        at the next step: unless the budget is overdrawn (always with a fixed schedule or
        without a budget, and for the first non-finite step of a run). A refused spike is
        counted in ``uncaptured``."""
        if (
            self.fraction is None
            or self.every_n_steps is not None
            or (reason == "nonfinite" and first_nonfinite)
            or self.spent <= self.fraction * self.training
        ):
            return True
        self.uncaptured += 1
        return False

    def quiet_ahead(self, step: int) -> int:
        """How many steps after ``step`` (planned without capture and signals) surely have
        neither a scheduled capture nor signals, so that they need no planning.

        Signals: the stride of now says when (a stride that changes meanwhile applies from
        the next run). Captures on a fixed schedule: the next multiple.
        Captures on the budget: each step adds ``fraction`` of its training time to the
        budget; counting steps up to twice as slow as the running average, the next
        capture cannot fit before the budget's shortfall has been made up."""
        ahead = self.stride - self._since_signals - 2
        if ahead <= 0:
            return 0
        if self.every_n_steps is not None:
            return min(ahead, -(step + 1) % self.every_n_steps)
        if self.fraction is None or self._step is None:
            return 0
        per_step = 2.0 * self.fraction * self._step
        short = self.spent + self._expected_capture() - self.fraction * (self.training + self._step)
        return max(0, min(ahead, math.floor(short / per_step) - 1))

    def signals_next(self) -> bool:
        """Whether the next step computes the cheap signals (every `stride` steps)."""
        return self._since_signals + 1 >= self.stride

    def _stride(self) -> int:
        """The fewest steps between two signal steps that keeps the signals within their
        share of the budget: ``quiet + (signal - quiet) / stride <= share * budget * step``."""
        if self.fraction is None or self._signal is None or self._step is None:
            return 1
        allowed = self.signal_share * self.fraction * self._step
        quiet = self._quiet or 0.0
        extra = self._signal - quiet
        if extra <= allowed - quiet:
            return 1
        if allowed <= quiet:
            return self.max_stride
        return min(self.max_stride, max(1, math.ceil(extra / (allowed - quiet))))


def _average(old: float | None, new: float, alpha: float, times: int = 1) -> float:
    """A running average after ``times`` equal samples ``new``."""
    if old is None:
        return new
    return new + (old - new) * (1.0 - alpha) ** times
