"""Measuring gradwatch's own time for the overhead budget, and agreeing on it over ranks.

`BudgetMeter` owns the clock and the `BudgetScheduler` of a monitor core. The core (and its
adapter) add the nanoseconds of each piece of gradwatch's own work (`add`); the recorder
counts its hooks' time itself (``Recorder.own_ns``), handed over at the end of each step
(`end_step`), which closes the step's interval: everything since the previous step's end
that was not gradwatch's is training.

Under DDP every rank must capture the same steps and compute the signals on the same steps
(both run collectives), but each rank measures its own times. So there the scheduler that
decides is fed *estimates* that are identical on every rank: at each synchronisation (a
logging step, identical on all ranks) the ranks average their measurements with one
``all_reduce`` of a few numbers, and until the next one the scheduler records, per step,
the agreed average costs of that kind of step. Before the first synchronisation it has no
measurement, so it schedules no capture and computes the signals at every step, on every
rank alike. What the ranks measured locally is kept in a second scheduler, used only for
the next synchronisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from gradwatch._engine.budget import BudgetScheduler, Overhead

__all__ = ["BudgetMeter"]

Clock = Callable[[], int]


class BudgetMeter:
    """The clock, the interval bookkeeping and the scheduler of one monitor core."""

    _run = 0  # (class defaults: instances pickled by earlier versions lack these)

    def __init__(self, fraction: float | None, every_n_steps: int | None) -> None:
        self.scheduler = BudgetScheduler(fraction, every_n_steps=every_n_steps)
        self.clock: Clock = time.perf_counter_ns
        self.own_ns = 0  # own time of the current interval, the recorder's hooks apart
        self.start: int | None = None  # None: the first interval after an attach
        self.distributed = False
        self.steps = 0  # steps closed
        self._run = 0  # quiet steps skipped since the last closed interval
        self._local: BudgetScheduler | None = None  # under DDP: this rank's measurements

    def restart_interval(self) -> None:
        """What happens until the next step's end is neither training nor gradwatch's
        (attaching after a validation loop, the start of training)."""
        self.start = None

    def set_distributed(self, on: bool) -> None:
        self.distributed = on
        if on and self._local is None:
            s = self.scheduler
            self._local = BudgetScheduler(s.fraction, every_n_steps=s.every_n_steps)

    def add(self, ns: int) -> None:
        self.own_ns += ns

    def skip_step(self, hooks_ns: int) -> None:
        """A quiet step inside a run of them (see `BudgetScheduler.quiet_ahead`): its time
        joins the interval that the run's last step closes."""
        self.own_ns += hooks_ns
        self._run += 1

    def end_step(self, hooks_ns: int, *, captured: bool, signals: bool, sync: bool) -> None:
        """Close the step's interval (its own time: what was `add`-ed plus ``hooks_ns``),
        with the quiet steps skipped before it; under DDP, ``sync`` agrees on the
        measurements with the other ranks first."""
        now = self.clock()
        own = (self.own_ns + hooks_ns) * 1e-9
        interval = None if self.start is None else (now - self.start) * 1e-9
        steps, self._run = self._run + 1, 0
        if self._local is None or not self.distributed:
            self.scheduler.record(interval, own, captured=captured, signals=signals, steps=steps)
        else:
            self._local.record(interval, own, captured=captured, signals=signals)
            self._record_estimate(interval is not None, captured=captured, signals=signals)
            if sync:
                self._synchronise()
        self.start = now
        self.own_ns = 0
        self.steps += steps

    def unreachable(self) -> bool:
        """Whether the budget schedules captures yet none fits: gradwatch's per-step work
        alone has spent more than the budget."""
        s = self.scheduler
        o = s.overhead()
        return (
            s.every_n_steps is None
            and o.captures == 0
            and o.budget is not None
            and (o.fraction > o.budget)
        )

    def overhead(self) -> Overhead:
        return self.scheduler.overhead()

    # -- DDP -----------------------------------------------------------------------------------
    def _record_estimate(self, timed: bool, *, captured: bool, signals: bool) -> None:
        """Record the agreed average costs of this kind of step (nothing before the first
        synchronisation: no rank knows any cost yet)."""
        s = self.scheduler
        if s._step is None:
            return
        own = s._capture if captured else (s._signal if signals else s._quiet)
        own = own or 0.0
        s.record(s._step + own if timed else None, own, captured=captured, signals=signals)

    def _synchronise(self) -> None:
        """Average this rank's measurements with the other ranks' (one small all_reduce) and
        give them to the deciding scheduler."""
        t = torch.tensor(self.local_measurements(), dtype=torch.float64)
        t = t.to(_collective_device())
        torch.distributed.all_reduce(t)
        self.agree(t.cpu().tolist())

    def local_measurements(self) -> list[list[float]]:
        """``[values, counts]``: this rank's totals and running averages, each with 1 where
        it was measured (a sum over ranks of these gives the means)."""
        local = self._local
        assert local is not None
        values, counts = [local.spent, local.training], [1.0, 1.0]
        for v in (local._step, local._capture, local._signal, local._quiet):
            values.append(0.0 if v is None else v)
            counts.append(0.0 if v is None else 1.0)
        return [values, counts]

    def agree(self, summed: list[list[float]]) -> None:
        """Decide from now on from the ranks' summed `local_measurements` (their means)."""
        local = self._local
        assert local is not None
        sums, ns = summed
        mean = [v / n if n > 0 else None for v, n in zip(sums, ns, strict=True)]
        s = self.scheduler
        s.spent, s.training = mean[0] or 0.0, mean[1] or 0.0
        s.captures = local.captures  # the same on every rank: their decisions are
        s._step, s._capture, s._signal, s._quiet = mean[2:]
        s.stride = s._stride()


def _collective_device() -> torch.device:
    """Where the process group's backend takes tensors (NCCL: the current CUDA device)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
