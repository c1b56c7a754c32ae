"""The one recorder of a model's recurrences: hooks, call names, windows, step sequences.

`Recorder` registers each selected module's family hooks, names the calls, keeps the
records the families add, and at the right moment turns each record into a `RawCapture`
(`Family.capture`) which it hands to ``consume`` (the analysis, given by the layer above:
capture never diagnoses). Two ways to drive it:

- *per block* (``windowed=False``, what ``gradwatch.trace`` uses): everything is recorded;
  at the end of each backward pass the records that received a gradient are captured and
  consumed at once, while the weights are still those of the forward pass;
- *per window* (``windowed=True``, what the monitor uses): one window per optimizer step.
  The owner sets a plan per window (`plan`): with ``capture`` every call and step is
  recorded; with only ``retain`` fused calls are recorded (for a capture decided at the end
  of the step) and cells and marks left alone; with neither (the cheap steps), the hooks on
  fused outputs only keep the gradients injected into each module
  (`gradwatch._capture.injected`, `take_injected`) and the model's root is not hooked.
  `finish` captures and consumes the window. Calls are keyed per micro-batch (the first call
  after a completed backward starts a new one), so the k-th call of a module has the same
  key in every micro-batch of a window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from gradwatch._capture.families import Family, Record
from gradwatch._capture.hooks import WeakHook, active_here, attach_here, detach_here
from gradwatch._capture.injected import InjectedGradients, InjectedGrads
from gradwatch._capture.oom import is_out_of_memory
from gradwatch._capture.own_time import OwnTime
from gradwatch._capture.passes import PassClassifier, in_backward
from gradwatch._capture.raw import RawCapture
from gradwatch._capture.steps import StepSequence

__all__ = ["Recorder", "active_recorder", "active_recorders"]

Consume = Callable[[RawCapture], Any]

_HIGHER_ORDER = (
    "a backward pass with create_graph=True (a gradient penalty or a double backward) went "
    "through this call and another training pass reached it too: the second-order "
    "contributions to the training gradient flow through autograd's double-backward graph, "
    "not through the call's outputs, so they cannot be separated; the values are the "
    "first-order gradients that reached the outputs"
)


def active_recorders() -> list[Recorder]:
    """The recorders attached in the calling thread (oldest first): `gradwatch.mark_state`
    records into each of them. No global strong reference: a dropped one disappears."""
    return active_here()


def active_recorder() -> Recorder | None:
    """The most recently attached recorder of the calling thread, if any."""
    live = active_here()
    return live[-1] if live else None


class Recorder:
    """Records the recurrences of ``model`` (see the module docstring).

    Args:
        model: The model; its root gets a forward pre-hook that counts forward passes.
        modules: ``(name, module, family)`` to hook, e.g. `Selection.watched`.
        consume: Called with every `RawCapture`; its results are what `results` and
            `finish` return. An exception in it is a failure of that call, not a crash.
        windowed: Per window (monitor) rather than per block (trace).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[tuple[str, nn.Module, Family]],
        consume: Consume,
        *,
        windowed: bool = False,
    ) -> None:
        self.model = model
        self.modules = list(modules)
        self.names: list[str] = [n for n, _, _ in self.modules]
        self.consume = consume
        self.windowed = windowed
        self.disabled: dict[str, str] = {}
        self._index = {n: i for i, n in enumerate(self.names)}
        self._handles: dict[str, list[Any]] = {}
        self._root_handle: Any = None
        self._attached = False
        self._capture = self._retain = not windowed
        self._signals = True
        self._forward_index = 0
        self._microbatch = 0
        self._queued: set[int] = set()  # passes whose end-of-pass callback is queued
        self._passes = PassClassifier(model)
        self._mark_stack: Any = None
        # The time spent in the hooks (ns), for the monitor's overhead budget: every hook
        # body adds to it, read and reset by the owner. ``clock`` is replaceable in tests.
        self.own_time = OwnTime()
        self._signals = True
        # parameters of each watched module, checked first when a pass is classified
        self._params = [tuple(m.parameters()) for _, m, _ in self.modules]
        self.injected = InjectedGradients(
            len(self.names), self._passes, self._params, self._fail_index, self.own_time
        )
        self._reset_window()

    def _reset_window(self) -> None:
        self._records: list[tuple[Record, Family]] = []
        self._sequences: dict[str, StepSequence] = {}  # current sequence per module / mark
        self._name_counts: dict[str, int] = {}
        self._module_of: dict[str, str] = {}  # call name -> module (or mark) name
        self._results: dict[str, Any] = {}
        self._failures: dict[str, str] = {}
        # calls whose capture ran out of memory: skipped, not failed (the module stays watched)
        self.skipped: dict[str, str] = {}
        # modules whose capture in the last finished window ran out of memory, with why
        self.window_skipped: dict[str, str] = {}
        self._dirty: set[int] = set()
        self._backward_seen = False
        self._only_untrained = False  # only passes that train nothing reached a record
        self._boundary = False  # a backward pass completed since the last recorded call
        # per record (by id): forward pass, micro-batch, passes that reached it
        self._group_of: dict[int, int] = {}
        self._mb_of: dict[int, int] = {}
        self._reached: dict[int, set[tuple[int, bool, bool]]] = {}
        self._trained_groups: set[int] = set()
        # gradients of passes still running, applied when the pass completes (an aborted
        # pass never completes: its gradients are dropped)
        self._pending: dict[int, list[tuple[Record | None, Callable[[], None]]]] = {}
        self._ghosts: dict[str, int] = {}  # calls under no_grad (reentrant checkpointing)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def backward_seen(self) -> bool:
        """Whether a gradient reached a recorded call or step in this window."""
        return self._backward_seen

    def attach(self) -> None:
        """Register the module hooks (idempotent)."""
        if self._attached:
            return
        # parameters may have been replaced since (a parametrization registered at fit start)
        self._params[:] = [tuple(m.parameters()) for _, m, _ in self.modules]
        self._hook_root(self._retain)
        for name, module, family in self.modules:
            if name not in self.disabled:
                self._handles[name] = family.hook(self, name, module)
        self._mark_stack = attach_here(self)
        self._attached = True

    def forward_hook(
        self, module: nn.Module, fn: Callable[..., Any], *bound: Any, with_kwargs: bool = True
    ) -> Any:
        """Register ``fn(recorder, *bound, module, args[, kwargs], output)`` as a forward
        hook of ``module`` holding this recorder weakly (see `gradwatch._capture.hooks`)."""
        hook = WeakHook(self, module, fn, *bound)
        return module.register_forward_hook(hook, with_kwargs=with_kwargs)

    def forward_pre_hook(
        self, module: nn.Module, fn: Callable[..., Any], *bound: Any, with_kwargs: bool = True
    ) -> Any:
        """Like `forward_hook`, as a forward pre-hook."""
        hook = WeakHook(self, module, fn, *bound)
        return module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)

    def _hook_root(self, on: bool) -> None:
        """The root's forward pre-hook, which counts forward passes (a sequence does not span
        two): only while calls are recorded, so a cheap step does not pay for it."""
        if on and self._root_handle is None:
            if not isinstance(self.model, nn.RNNCellBase):  # a cell as root: each call is a step
                self._root_handle = self.forward_pre_hook(
                    self.model, Recorder._on_root_forward, with_kwargs=False
                )
        elif not on and self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None

    def detach(self) -> None:
        """Remove the module hooks; what was recorded is kept."""
        for hs in self._handles.values():
            for h in hs:
                h.remove()
        self._handles.clear()
        self._hook_root(False)
        detach_here(self, self._mark_stack)
        self._mark_stack = None
        self._attached = False

    def close(self) -> None:
        """Remove every hook and release every recorded tensor."""
        self.detach()
        self.release()

    def disable(self, name: str, reason: str) -> None:
        """Stop watching one module (or marked-state name) for good."""
        self.disabled.setdefault(name, reason)
        for h in self._handles.pop(name, []):
            h.remove()

    def plan(self, *, capture: bool, retain: bool = False, signals: bool = True) -> None:
        """Set what the next window records (windowed use, see the module docstring).
        ``signals=False`` (a step whose cheap signals are not computed): a call that is not
        recorded is not hooked either."""
        self._capture = bool(capture)
        self._retain = bool(capture or retain)
        self._signals = bool(signals)
        if self._attached:
            self._hook_root(self._retain)

    @property
    def own_ns(self) -> int:
        """Nanoseconds spent in the hooks since the owner last reset it (to 0)."""
        return self.own_time.ns

    @own_ns.setter
    def own_ns(self, value: int) -> None:
        self.own_time.ns = value

    @property
    def clock(self) -> Callable[[], int]:
        """The clock the hooks are timed with (the overhead budget's)."""
        return self.own_time.clock

    @clock.setter
    def clock(self, clock: Callable[[], int]) -> None:
        self.own_time.clock = clock

    @property
    def capturing(self) -> bool:
        """Whether calls and steps are recorded for a capture."""
        return self._capture

    @property
    def signals(self) -> bool:
        """Whether the injected norms are computed in this window (`plan`)."""
        return self._signals

    @property
    def retaining(self) -> bool:
        """Whether fused calls are recorded (to be replayed if `finish` is asked to)."""
        return self._retain

    # -- services for the families -----------------------------------------------------------
    @property
    def forward_index(self) -> int:
        """Which forward pass of the model is running (a sequence does not span two)."""
        return self._forward_index

    def watching(self, name: str) -> bool:
        """Whether ``name`` is watched now (not disabled, gradients enabled)."""
        return name not in self.disabled and torch.is_grad_enabled()

    def new_name(self, base: str) -> str:
        """A unique name for a new call of ``base`` while it is recorded (``base``,
        ``base#1``, ...); the report names are given at the end (`final_names`), counting
        only the calls that are reported."""
        if self.windowed and self._boundary:  # first recorded call of a new micro-batch
            self._boundary = False
            self._sequences = {}
            self._forward_index += 1
            self._microbatch += 1
        k = self._name_counts.get(base, 0)
        self._name_counts[base] = k + 1
        name = base if k == 0 else f"{base}#{k}"
        self._module_of[name] = base
        return name

    def add(self, record: Record, family: Family) -> None:
        """Keep a record (named with `new_name`) until it is captured."""
        self._records.append((record, family))
        self._group_of[id(record)] = self._forward_index
        self._mb_of[id(record)] = self._microbatch

    def sequence(self, base: str) -> StepSequence | None:
        """The current step sequence of a module or mark, if any."""
        return self._sequences.get(base)

    def start_sequence(
        self, base: str, kind: str, module: nn.Module | None, family: Family
    ) -> StepSequence:
        """Start (and `add`) a new step sequence of a module or mark."""
        seq = StepSequence(
            name=self.new_name(base),
            module_name=base,
            kind=kind,
            module=module,
            forward_index=self._forward_index,
        )
        params = tuple(module.parameters()) if module is not None else ()
        seq.deliver = partial(self.gradient, seq, params=params)
        self._sequences[base] = seq
        self.add(seq, family)
        return seq

    # -- gradients: only those of passes that train, applied when the pass completes ---------
    def gradient(
        self, record: Record | None, apply: Callable[[], None], params: Iterable[Tensor] = ()
    ) -> None:
        """A gradient reached ``record`` (``None``: only the cheap signal); ``apply``
        stores it. Dropped when the running pass trains nothing; otherwise applied when the
        pass completes (never, if it is aborted by an exception)."""
        start = self.clock()
        try:
            self._gradient(record, apply, params)
        finally:
            self.own_ns += self.clock() - start

    def _gradient(
        self, record: Record | None, apply: Callable[[], None], params: Iterable[Tensor]
    ) -> None:
        running = self._passes.current(params)
        if record is not None:
            reached = self._reached.setdefault(id(record), set())
            reached.add((running.task, running.trains, running.create_graph))
        if not running.trains:
            self._only_untrained = True
            return
        if running.task == -1:  # not inside a pass (cannot happen from autograd): apply now
            apply()
            return
        self._pending.setdefault(running.task, []).append((record, apply))
        if running.task not in self._queued:
            self._queued.add(running.task)
            # Runs once the whole pass is done: every output gradient has arrived and the
            # weights are still those of the forward pass (no optimizer step yet).
            Variable._execution_engine.queue_callback(partial(self._end_of_backward, running.task))

    def gradient_arrived(self, record: Record) -> None:
        """Capture ``record`` after this backward pass (kept for families that store their
        gradients themselves; prefer `gradient`)."""
        self.gradient(record, lambda: None)

    def add_injected(self, module_name: str, grad: Tensor) -> None:
        """Count a gradient of a completed pass at a module's outputs in its injected norm
        (windowed use only; kept by reference, reduced at the end of the step)."""
        i = self._index.get(module_name)
        if i is not None and self.windowed:
            self.injected.add(i, grad.detach())

    def watch_outputs(self, module_name: str, outputs: tuple[Tensor | None, ...]) -> None:
        """A cheap step's call of a watched module: only the gradients reaching its
        ``outputs`` are kept, for its injected norm (see `gradwatch._capture.injected`)."""
        i = self._index.get(module_name)
        if i is not None and self.windowed:
            self.injected.watch(i, outputs)

    def _fail_index(self, index: int, why: str) -> None:
        self.fail(self.names[index], why, keep_first=True)

    def fail(self, name: str, why: str, *, keep_first: bool = False) -> None:
        """Record why a call (or module) could not be measured."""
        if keep_first:
            self._failures.setdefault(name, why)
        else:
            self._failures[name] = why

    def take_injected(self) -> InjectedGrads:
        """The gradients that reached each watched module's outputs since the last call
        (references, and norms of those already reduced; see `InjectedGrads`); their norms
        are computed by the caller, with the parameter gradients'."""
        return self.injected.take()

    # -- calls during backward (activation checkpointing) -----------------------------------
    def skip_call(self, name: str, module: nn.Module) -> bool:
        """Whether a forward call of ``name`` is not a call of its own.

        Under activation checkpointing the forward of a block runs again inside backward.
        Without reentrancy (``use_reentrant=False``) the first run was recorded: the rerun
        only rebuilds saved tensors and is skipped. With reentrancy the first run was under
        ``no_grad`` (noted here as a pending call, `skip_call` returning True for it) and
        the rerun, which the gradient goes through, is the call.
        """
        if in_backward():
            if self._ghosts.get(name, 0) > 0:
                self._ghosts[name] -= 1
                return False
            return True
        if not torch.is_grad_enabled():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._ghosts[name] = self._ghosts.get(name, 0) + 1
            return True
        return False

    # -- backward boundaries -----------------------------------------------------------------
    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        if not in_backward():  # a recomputation is not a new forward pass
            self._forward_index += 1

    def _end_of_backward(self, task: int) -> None:
        start = self.clock()
        try:
            self._apply_pass(task)
        finally:
            self.own_ns += self.clock() - start

    def _apply_pass(self, task: int) -> None:
        self._queued.discard(task)
        for record, apply in self._pending.pop(task, []):
            try:
                apply()
            except Exception as e:  # monitoring must never crash training
                if record is not None:
                    self.fail(record.name, f"could not record a gradient: {e!r}")
            if record is not None:
                self._dirty.add(id(record))
                self._trained_groups.add(self._group_of.get(id(record), -1))
        self._backward_seen = True
        if self.windowed:  # only a micro-batch boundary: the capture waits for finish()
            self._boundary = True
            return
        for record, family in self._records:
            if id(record) in self._dirty:
                self._capture_one(record, family)
        self._dirty.clear()

    def _capture_one(self, record: Record, family: Family) -> None:
        try:
            raw = family.capture(record)
            if self._higher_order(record):
                raw = dataclasses.replace(raw, reasons=(*raw.reasons, _HIGHER_ORDER))
            self._results[record.name] = self.consume(raw)
            self._failures.pop(record.name, None)
            self.skipped.pop(record.name, None)
        except Exception as e:  # monitoring must never crash training
            if is_out_of_memory(e):  # may fit next time: skip this capture, keep watching
                self._results.pop(record.name, None)
                self.skipped[record.name] = f"out of memory during the capture ({e!s:.200})"
                self._failures[record.name] = f"skipped: {self.skipped[record.name]}"
                return
            self._failures[record.name] = f"{family.failure}: {e!r}"

    def _higher_order(self, record: Record) -> bool:
        """Whether a create_graph pass and another training pass both reached ``record``."""
        reached = self._reached.get(id(record), set())
        graphs = {task for task, _, create_graph in reached if create_graph}
        trained = {task for task, trains, _ in reached if trains}
        return bool(graphs) and bool(trained - graphs or (trained and len(graphs) > 1))

    # -- results ----------------------------------------------------------------------------
    @property
    def recorded(self) -> list[str]:
        """The names of the calls and sequences recorded so far, in call order."""
        return [r.name for r, _ in self._records]

    @property
    def failures(self) -> dict[str, str]:
        """Why calls or modules could not be measured so far, by name."""
        return dict(self._failures)

    @property
    def only_untrained(self) -> bool:
        """Whether gradients reached the records only in passes that train nothing."""
        return self._only_untrained and not self._backward_seen

    def final_names(self) -> dict[str, tuple[str, str]]:
        """Report name and per-micro-batch key of every reported record, by recorded name.

        Reported are the records of the forward passes whose backward trained: the calls
        of an aborted forward or backward are dropped (and do not shift the others' names).
        """
        names: dict[str, tuple[str, str]] = {}
        counts: dict[str, int] = {}
        mb_counts: dict[tuple[int, str], int] = {}
        for record, _ in self._records:
            if self._group_of.get(id(record), -1) not in self._trained_groups:
                continue
            base = record.module_name
            k = counts.get(base, 0)
            counts[base] = k + 1
            mb = (self._mb_of.get(id(record), 0), base)
            m = mb_counts.get(mb, 0)
            mb_counts[mb] = m + 1
            names[record.name] = (
                base if k == 0 else f"{base}#{k}",
                base if m == 0 else f"{base}#{m}",
            )
        return names

    def results(self, *, complete: bool) -> tuple[dict[str, Any], dict[str, str]]:
        """Per block: the consumed captures by report name, in call order, and the failures.

        ``complete`` first captures the records not captured yet (calls whose outputs got no
        gradient read zero): at the end of the block.
        """
        final = self.final_names()
        if complete and self._backward_seen:
            for record, family in self._records:
                name = record.name
                if name in final and name not in self._results and name not in self._failures:
                    self._capture_one(record, family)
        results = {}
        for record, _ in self._records:
            if record.name in final and record.name in self._results:
                results[final[record.name][0]] = _renamed(
                    self._results[record.name], final[record.name][0]
                )
        failures = {}
        recorded = set(self.recorded)
        for name, why in self._failures.items():
            if name in recorded:  # a call: reported under its report name, if at all
                if name not in final:
                    continue
                name = final[name][0]
            if name not in results:
                failures[name] = why
        return results, failures

    def finish(self, replay: bool) -> tuple[list[tuple[str, Any]], dict[str, str]]:
        """Close the current window (windowed use).

        With ``replay``, every reported record (`final_names`) is captured and consumed;
        returns ``[(key, result), ...]`` in call order, where ``key`` is the per-micro-batch
        name (equal keys are calls to merge), and the failures by module name. Everything
        recorded is released.
        """
        if not self._window_used():  # a cheap step: nothing to capture, nothing to release
            self.release()
            return [], {}
        results: list[tuple[str, Any]] = []
        failures: dict[str, str] = {}
        skipped: dict[str, str] = {}
        try:
            final = self.final_names()
            if replay and self._backward_seen:
                for record, family in self._records:
                    if record.name in final and record.name not in self._failures:
                        self._capture_one(record, family)
                for record, _ in self._records:
                    if record.name in final and record.name in self._results:
                        name, key = final[record.name]
                        results.append((key, _renamed(self._results[record.name], name)))
            for name, why in self._failures.items():
                if name in self._module_of and name not in final:
                    continue  # a call that is not reported (aborted forward)
                module = self._module_of.get(name, name)
                if name in self.skipped:  # not a failure: the module stays watched
                    skipped.setdefault(module, self.skipped[name])
                else:
                    failures.setdefault(module, why)
        finally:
            self.release()
            self.window_skipped = skipped  # after release(), which resets the window
        return results, failures

    def finish_quiet(self) -> bool:
        """Close a window in which nothing was to be recorded, if nothing was: `finish`
        without replay, in a few operations. ``False`` (nothing done) when anything was
        recorded, failed or reached the injected-gradient hooks."""
        if self._window_used() or not self.injected.empty() or self.window_skipped:
            return False
        self._next_window()
        return True

    def release(self) -> None:
        """Release every record (hooks and tensors) and start a new window."""
        self.injected.clear()
        if self._window_used():
            for record, _ in self._records:
                record.release()
            self._reset_window()
            self._forward_index += 1
            self._microbatch += 1
        else:
            if self.window_skipped:
                self.window_skipped = {}
            self._next_window()

    def _next_window(self) -> None:
        """End a window in which nothing was recorded (a cheap step): only flags to reset."""
        self._backward_seen = self._only_untrained = self._boundary = False
        self._forward_index += 1
        self._microbatch += 1

    def _window_used(self) -> bool:
        """Whether anything was recorded (or failed) in this window."""
        return bool(
            self._records
            or self._failures
            or self.skipped
            or self._results
            or self._pending
            or self._ghosts
            or self._name_counts
            or self._reached
            or self._trained_groups
            or self._sequences
        )


def _renamed(result: Any, name: str) -> Any:
    """``result`` under its report name (a dataclass with a ``name`` field, like
    `ModuleReport`, is copied with the new name)."""
    if getattr(result, "name", name) == name or not dataclasses.is_dataclass(result):
        return result
    return dataclasses.replace(result, name=name)
