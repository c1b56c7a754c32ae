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
  of the step) and cells and marks left alone; with neither, the hooks on fused outputs only
  accumulate the norm of the gradient injected into each module (`take_injected`). `finish`
  captures and consumes the window. Calls are keyed per micro-batch (the first call after a
  completed backward starts a new one), so the k-th call of a module has the same key in
  every micro-batch of a window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from math import hypot
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from gradwatch._capture.families import Family, Record, family_of
from gradwatch._capture.raw import RawCapture
from gradwatch._capture.steps import StepSequence

__all__ = ["Recorder", "active_recorder"]

Consume = Callable[[RawCapture], Any]

# Recorders with hooks attached, most recent last: `mark_state` records into the last one.
_ACTIVE: list[Recorder] = []


def active_recorder() -> Recorder | None:
    """The recorder that `gradwatch.mark_state` (and any family driven by a user call)
    records into: the most recently attached one."""
    return _ACTIVE[-1] if _ACTIVE else None


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
        self._injected: list[Tensor | float | None] = [None] * len(self.names)
        self._forward_index = 0
        self._queued = False
        self._reset_window()

    def _reset_window(self) -> None:
        self._records: list[tuple[Record, Family]] = []
        self._sequences: dict[str, StepSequence] = {}  # current sequence per module / mark
        self._name_counts: dict[str, int] = {}
        self._mb_counts: dict[str, int] = {}
        self._key_of: dict[str, str] = {}  # unique call name -> per-micro-batch key
        self._module_of: dict[str, str] = {}  # call name -> module (or mark) name
        self._results: dict[str, Any] = {}
        self._failures: dict[str, str] = {}
        self._dirty: set[int] = set()
        self._backward_seen = False
        self._boundary = False  # a backward pass completed since the last recorded call

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
        if family_of(self.model) is None:  # a recurrence as root: each call is a step
            self._root_handle = self.model.register_forward_pre_hook(self._on_root_forward)
        for name, module, family in self.modules:
            if name not in self.disabled:
                self._handles[name] = family.hook(self, name, module)
        _ACTIVE.append(self)
        self._attached = True

    def detach(self) -> None:
        """Remove the module hooks; what was recorded is kept."""
        for hs in self._handles.values():
            for h in hs:
                h.remove()
        self._handles.clear()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._attached = False

    def close(self) -> None:
        """Remove every hook and release every recorded tensor."""
        self.detach()
        self.release()
        self._injected = [None] * len(self.names)

    def disable(self, name: str, reason: str) -> None:
        """Stop watching one module (or marked-state name) for good."""
        self.disabled.setdefault(name, reason)
        for h in self._handles.pop(name, []):
            h.remove()

    def plan(self, *, capture: bool, retain: bool = False) -> None:
        """Set what the next window records (windowed use, see the module docstring)."""
        self._capture = bool(capture)
        self._retain = bool(capture or retain)

    @property
    def capturing(self) -> bool:
        """Whether calls and steps are recorded for a capture."""
        return self._capture

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
        """The report name of a new call of ``base``: ``base``, ``base#1``, ..."""
        if self.windowed and self._boundary:  # first recorded call of a new micro-batch
            self._boundary = False
            self._mb_counts.clear()
            self._sequences = {}
            self._forward_index += 1
        k = self._name_counts.get(base, 0)
        self._name_counts[base] = k + 1
        name = base if k == 0 else f"{base}#{k}"
        m = self._mb_counts.get(base, 0)
        self._mb_counts[base] = m + 1
        self._key_of[name] = base if m == 0 else f"{base}#{m}"
        self._module_of[name] = base
        return name

    def add(self, record: Record, family: Family) -> None:
        """Keep a record (named with `new_name`) until it is captured."""
        self._records.append((record, family))

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
        seq.on_grad = lambda: self.gradient_arrived(seq)
        self._sequences[base] = seq
        self.add(seq, family)
        return seq

    def gradient_arrived(self, record: Record) -> None:
        """A gradient reached ``record``: capture it after this backward pass (per block)."""
        self._dirty.add(id(record))
        self._queue_end_of_backward()

    def add_injected(self, module_name: str, grad: Tensor) -> None:
        """Add a gradient at a module's outputs to its injected norm (windowed use only)."""
        i = self._index.get(module_name)
        if i is None or not self.windowed:
            return
        g = grad.detach()
        old = self._injected[i]
        if g.device.type == "cpu" and not isinstance(old, Tensor):
            v = _host_norm(g)
            self._injected[i] = v if old is None else hypot(old, v)
        else:
            n = torch.linalg.vector_norm(g, dtype=torch.float64)
            if old is not None and not isinstance(old, Tensor):
                old = torch.tensor(old, dtype=torch.float64, device=n.device)
            self._injected[i] = n if old is None else torch.hypot(old, n)
        self._queue_end_of_backward()

    def fail(self, name: str, why: str, *, keep_first: bool = False) -> None:
        """Record why a call (or module) could not be measured."""
        if keep_first:
            self._failures.setdefault(name, why)
        else:
            self._failures[name] = why

    def take_injected(self) -> list[Tensor | float | None]:
        """Per watched module, the L2 norm of every gradient that reached its outputs since
        the last call; ``None`` where none did. A float64 tensor on the gradients' device
        (no host synchronisation), or a Python float for gradients on the CPU."""
        out, self._injected = self._injected, [None] * len(self.names)
        return out

    # -- backward boundaries -----------------------------------------------------------------
    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        self._forward_index += 1

    def _queue_end_of_backward(self) -> None:
        self._backward_seen = True
        if not self._queued:
            self._queued = True
            # Runs once the whole backward pass is done: every output gradient has arrived
            # and the weights are still those of the forward pass (no optimizer step yet).
            Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        if self.windowed:  # only a micro-batch boundary: the capture waits for finish()
            self._boundary = True
            return
        for record, family in self._records:
            if id(record) in self._dirty:
                self._capture_one(record, family)
        self._dirty.clear()

    def _capture_one(self, record: Record, family: Family) -> None:
        try:
            self._results[record.name] = self.consume(family.capture(record))
            self._failures.pop(record.name, None)
        except Exception as e:  # monitoring must never crash training
            self._failures[record.name] = f"{family.failure}: {e!r}"

    # -- results ----------------------------------------------------------------------------
    @property
    def recorded(self) -> list[str]:
        """The names of the calls and sequences recorded so far, in call order."""
        return [r.name for r, _ in self._records]

    def results(self, *, complete: bool) -> tuple[dict[str, Any], dict[str, str]]:
        """Per block: the consumed captures by call name, in call order, and the failures.

        ``complete`` first captures the records not captured yet (calls whose outputs got no
        gradient read zero): at the end of the block.
        """
        if complete and self._backward_seen:
            self._end_of_backward()
            for record, family in self._records:
                if record.name not in self._results and record.name not in self._failures:
                    self._capture_one(record, family)
        order = [r.name for r, _ in self._records]
        results = {n: self._results[n] for n in order if n in self._results}
        return results, {n: w for n, w in self._failures.items() if n not in results}

    def finish(self, replay: bool) -> tuple[list[tuple[str, Any]], dict[str, str]]:
        """Close the current window (windowed use).

        With ``replay``, every record is captured and consumed; returns ``[(key, result),
        ...]`` in call order, where ``key`` is the per-micro-batch name (equal keys are calls
        to merge), and the failures by module name. Everything recorded is released.
        """
        results: list[tuple[str, Any]] = []
        failures: dict[str, str] = {}
        try:
            if replay and self._backward_seen:
                for record, family in self._records:
                    if record.name not in self._failures:
                        self._capture_one(record, family)
                for record, _ in self._records:
                    if record.name in self._results:
                        key = self._key_of.get(record.name, record.name)
                        results.append((key, self._results[record.name]))
            for name, why in self._failures.items():
                failures.setdefault(self._module_of.get(name, name), why)
        finally:
            self.release()
        return results, failures

    def release(self) -> None:
        """Release every record (hooks and tensors) and start a new window."""
        for record, _ in self._records:
            record.release()
        self._reset_window()
        self._forward_index += 1


def _host_norm(g: Tensor) -> float:
    """The L2 norm of a CPU tensor as a float. A float32 reduction (4x cheaper than a
    float64 one on the CPU), redone in float64 when its squares may have overflowed or
    underflowed (outside [1e-10, 1e18]): reading the value on the CPU costs nothing."""
    if g.dtype == torch.float64:
        return float(torch.linalg.vector_norm(g))
    v = float(torch.linalg.vector_norm(g, dtype=torch.float32))
    if not 1e-10 <= v <= 1e18:
        v = float(torch.linalg.vector_norm(g, dtype=torch.float64))
    return v
