"""``gradwatch.trace``: capture per-timestep hidden-state gradients of one training step."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from gradwatch._analysis.report import ModuleReport, Report
from gradwatch._analysis.verdicts import Thresholds
from gradwatch._base.errors import BackwardNotRunError, GradwatchError, NoRecurrentModuleError
from gradwatch._capture.discovery import (
    RECURRENT_TYPES,
    Selector,
    cell_kind,
    find_recurrent_modules,
)
from gradwatch._capture.fused import FusedCall, output_tensors, record_fused_call, replay_fused_call
from gradwatch._capture.stepwise import Step, StepSequence, build_step_report, consumes

__all__ = ["Session", "Trace", "mark_state", "trace"]

_ACTIVE: list[Trace] = []


class Trace:
    """Capture of the exact ``dL/dh_t`` of every recurrent module call inside a ``with`` block.

    Use it through `trace`. Inside the block, run forward and backward as usual; the
    values are computed at the end of each backward pass, before any optimizer step. After
    the block every hook is removed and every saved tensor released; `report` returns
    the result.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Iterable[Selector] | None = None,
        exclude: Iterable[Selector] | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.model = model
        self.thresholds = thresholds
        self._targets = find_recurrent_modules(model, include, exclude)
        self._searched = sum(1 for _ in model.modules())
        self._module_handles: list[Any] = []
        self._calls: list[FusedCall] = []
        self._sequences: dict[str, StepSequence] = {}  # current sequence per module / mark name
        self._all_sequences: list[StepSequence] = []
        self._pending_cells: dict[nn.Module, tuple[StepSequence, Step]] = {}
        self._name_counts: dict[str, int] = {}
        self._order: list[str] = []
        self._results: dict[str, ModuleReport] = {}
        self._failures: dict[str, str] = {}
        self._dirty: set[int] = set()
        self._callback_queued = False
        self._backward_seen = False
        self._forward_index = 0
        self._state = "new"
        self._report: Report | None = None

    # -- context manager -----------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self._state != "new":
            raise GradwatchError("a gradwatch trace can be entered only once; create a new one")
        self._state = "active"
        add = self._module_handles.append
        if not isinstance(self.model, RECURRENT_TYPES):  # a cell as root: each call is a step
            add(self.model.register_forward_pre_hook(self._on_root_forward))
        for name, module in self._targets:
            if isinstance(module, nn.RNNBase):
                add(module.register_forward_hook(partial(self._on_fused, name), with_kwargs=True))
            else:
                pre = partial(self._on_cell_pre, name)
                add(module.register_forward_pre_hook(pre, with_kwargs=True))
                add(module.register_forward_hook(partial(self._on_cell, name), with_kwargs=True))
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._state = "closed"
        if self._backward_seen:
            self._finish_backward()
            for call in self._calls:  # calls whose outputs got no gradient: zeros, honestly
                if call.name not in self._results and call.name not in self._failures:
                    self._replay(call)
            self._build_step_reports()
        for call in self._calls:
            call.release()
        for seq in self._all_sequences:
            seq.release()
        self._pending_cells.clear()

    # -- results ---------------------------------------------------------------------------
    def report(self, strict: bool = True) -> Report:
        """The per-call reports, in call order.

        Raises a `GradwatchError` subclass with the reason when
        nothing could be measured, and, with ``strict`` (the default), a
        `CaptureError` when some call failed; with ``strict=False``
        those failures are listed in ``Report.failures`` instead.
        """
        if self._report is None or self._state != "closed":
            self._report = self._build_report()
        if strict:
            self._report.raise_failures()
        return self._report

    def _build_report(self) -> Report:
        model = type(self.model).__name__
        if not self._targets and not self._all_sequences:
            kinds = ", ".join(t.__name__ for t in (*RECURRENT_TYPES, nn.RNN, nn.LSTM, nn.GRU))
            raise NoRecurrentModuleError(
                f"gradwatch.trace({model}): no recurrent module found among its "
                f"{self._searched} modules (looked for subclasses of {kinds}), and no state was "
                "marked with gradwatch.mark_state()"
            )
        if not self._calls and not self._all_sequences:
            names = ", ".join(repr(n) for n, _ in self._targets)
            raise GradwatchError(
                f"gradwatch.trace({model}): the recurrent modules {names} were not called with "
                "gradients enabled inside the trace (was the forward pass run under "
                "torch.no_grad() or outside the `with` block?)"
            )
        if not self._backward_seen:
            names = ", ".join(repr(n) for n in self._order)
            raise BackwardNotRunError(
                f"gradwatch.trace({model}): no backward pass reached {names}; call "
                "loss.backward() inside the `with` block before asking for the report"
            )
        if self._state != "closed":
            self._build_step_reports()
        modules = {n: self._results[n] for n in self._order if n in self._results}
        failures = {n: w for n, w in self._failures.items() if n not in modules}
        return Report(modules=modules, failures=failures)

    def _build_step_reports(self) -> None:
        for seq in self._all_sequences:
            if seq.name not in self._failures and seq.steps:
                try:
                    self._results[seq.name] = build_step_report(seq, self.thresholds)
                except Exception as e:  # monitoring must never crash training
                    self._failures[seq.name] = f"could not build the report: {e!r}"

    # -- naming ------------------------------------------------------------------------------
    def _new_name(self, base: str) -> str:
        k = self._name_counts.get(base, 0)
        self._name_counts[base] = k + 1
        name = base if k == 0 else f"{base}#{k}"
        self._order.append(name)
        return name

    # -- hooks: fused modules --------------------------------------------------------------
    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        self._forward_index += 1

    def _on_fused(self, module_name: str, module: nn.RNNBase, args, kwargs, output) -> None:
        try:
            call = record_fused_call("", module_name, module, args, kwargs, output)
            if call is None:
                return
            call.name = self._new_name(module_name)
            for slot, tensor in output_tensors(output).items():
                call.handles.append(tensor.register_hook(partial(self._on_fused_grad, call, slot)))
            self._calls.append(call)
        except Exception as e:  # monitoring must never crash training
            self._failures[module_name] = f"could not record the call: {e!r}"

    def _on_fused_grad(self, call: FusedCall, slot: str, grad: Tensor | None) -> None:
        if grad is None:  # an unused output of a multi-output node
            return
        try:
            old = call.grads.get(slot)
            grad = grad.detach()
            call.grads[slot] = grad.clone() if old is None else old + grad
            self._dirty.add(id(call))
            self._queue_finish()
        except Exception as e:  # monitoring must never crash training
            self._failures[call.name] = f"could not record a gradient: {e!r}"

    def _queue_finish(self) -> None:
        self._backward_seen = True
        if not self._callback_queued:
            self._callback_queued = True
            # Runs once the whole backward pass is done: every output gradient has arrived
            # and the weights are still those of the forward pass (no optimizer step yet).
            Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        self._callback_queued = False
        for call in self._calls:
            if id(call) in self._dirty:
                self._replay(call)
        self._dirty.clear()

    def _replay(self, call: FusedCall) -> None:
        try:
            # The replay runs inside the user's backward, possibly under autocast: it must
            # compute in the weights' own precision, as documented.
            device = call.weights[0].device.type
            with torch.no_grad(), torch.autocast(device, enabled=False):
                self._results[call.name] = replay_fused_call(call, self.thresholds)
            self._failures.pop(call.name, None)
        except Exception as e:  # monitoring must never crash training
            self._failures[call.name] = f"replay failed: {e!r}"

    # -- hooks: cells --------------------------------------------------------------------------
    def _on_cell_pre(self, module_name: str, module: nn.Module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        try:
            x = args[0] if args else kwargs["input"]
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            state = None if hx is None else (hx if isinstance(hx, tuple) else (hx,))
            seq = self._sequences.get(module_name)
            carry = None
            if not self._continues(seq, state):
                seq = self._start_sequence(module_name, cell_kind(module) or "", module)
            elif state is not None:
                assert seq is not None
                # The carried part of the previous step is what this call sends back into
                # the state it receives. It is read from this call's autograd nodes after the
                # forward (see _hook_carried); the state itself is passed on untouched, so
                # PyTorch sums the gradient contributions in the same order as without us.
                inputs = (x, *state)
                bound = max((t.grad_fn._sequence_nr() for t in inputs if t.grad_fn), default=-1)
                carry = (seq.steps[-1], state, bound)
            step = Step(x=x.detach())
            if state is not None:  # the state the step started from, for the diagnostics
                step.hx = tuple(s.detach() for s in state)
            seq.steps.append(step)
            self._pending_cells[module] = (seq, step, carry)
            return None
        except Exception as e:  # monitoring must never crash training
            self._failures[module_name] = f"could not record a cell step: {e!r}"
            return None

    def _continues(self, seq: StepSequence | None, state: tuple[Tensor, ...] | None) -> bool:
        """Whether a step continues the current sequence: same forward pass, and the state it
        receives is the previous output or derived from it (not a fresh leaf tensor)."""
        if seq is None or state is None or seq.forward_index != self._forward_index:
            return False
        h = state[0]
        return any(h is o for o in seq.outputs) or (h.requires_grad and h.grad_fn is not None)

    def _start_sequence(self, base: str, kind: str, module: nn.Module | None) -> StepSequence:
        seq = StepSequence(
            name=self._new_name(base),
            module_name=base,
            kind=kind,
            module=module,
            forward_index=self._forward_index,
            on_grad=self._on_step_grad,
        )
        self._sequences[base] = seq
        self._all_sequences.append(seq)
        return seq

    def _on_cell(self, module_name: str, module: nn.Module, args, kwargs, output) -> None:
        pending = self._pending_cells.pop(module, None)
        if pending is None:
            return
        seq, step, carry = pending
        try:
            h, c = output if isinstance(output, tuple) else (output, None)
            if carry is not None:
                self._hook_carried(seq, *carry, (h,) if c is None else (h, c))
            if step.hx is None:  # the cell started from zeros
                parts = (h,) if c is None else (h, c)
                step.hx = tuple(torch.zeros_like(p.detach()) for p in parts)
            step.h = h.detach()
            self._hook_step(seq, h, step, "total_h")
            if c is not None:
                step.c = c.detach()
                step.c_hook_has_h_path = c.grad_fn is not h.grad_fn and consumes(h, c)
                self._hook_step(seq, c, step, "total_c")
            seq.outputs = (h,) if c is None else (h, c)
        except Exception as e:  # monitoring must never crash training
            self._failures[module_name] = f"could not record a cell step: {e!r}"

    def _hook_carried(
        self,
        seq: StepSequence,
        prev: Step,
        state: tuple[Tensor, ...],
        bound: int,
        outputs: tuple[Tensor, ...],
    ) -> None:
        """Hook the autograd nodes of one cell call that read the state it received.

        The nodes created by the call are those reachable from its outputs with a sequence
        number above ``bound`` (every input was made before the call). A post-hook on each
        node that consumes a state tensor sees that node's gradient for it; their sum is the
        carried part of the previous step. Post-hooks only observe: no value, no order of
        accumulation changes.
        """
        prev.carried = [None] * len(state)
        targets = {
            (id(t.grad_fn), t.output_nr): i
            for i, t in enumerate(state)
            if t.requires_grad and t.grad_fn is not None
        }
        if not targets:
            return
        seen: set[int] = set()
        frontier = [o.grad_fn for o in outputs if o.grad_fn is not None]
        while frontier:
            node = frontier.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            edges = []
            for k, (child, nr) in enumerate(node.next_functions):
                if child is None:
                    continue
                slot = targets.get((id(child), nr))
                if slot is not None:
                    edges.append((k, slot))
                elif child._sequence_nr() > bound and id(child) not in seen:
                    frontier.append(child)
            if edges:
                seq.handles.append(node.register_hook(partial(self._on_carried, seq, prev, edges)))

    def _on_carried(self, seq: StepSequence, prev: Step, edges, grad_inputs, grad_outputs):
        try:
            for k, slot in edges:
                g = grad_inputs[k]
                if g is not None:
                    g = g.detach().clone()
                    old = prev.carried[slot]
                    prev.carried[slot] = g if old is None else old + g
            if seq.on_grad is not None:
                seq.on_grad()
        except Exception:  # monitoring must never crash training: the step reads zero
            pass

    def _hook_step(self, seq: StepSequence, tensor: Tensor, step: Step, slot: str) -> None:
        if tensor.requires_grad:
            seq.hook(tensor, partial(step.add, slot))

    def _on_step_grad(self) -> None:
        self._backward_seen = True

    # -- marked states ---------------------------------------------------------------------
    def _mark(self, name: str, state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Any]:
        parts = state if isinstance(state, tuple) else (state,)
        h = parts[0]
        seq = self._sequences.get(name)
        if seq is None or seq.forward_index != self._forward_index:
            seq = self._start_sequence(name, "custom", None)
        elif seq.steps and seq.outputs:
            # What this step's graph sends back to the previous marked state is its carried
            # part: hooked on the autograd nodes that read it (created after it), so the
            # state is passed on untouched and gradients are summed in the same order.
            prev_state = seq.outputs
            bound = max((t.grad_fn._sequence_nr() for t in prev_state if t.grad_fn), default=-1)
            self._hook_carried(seq, seq.steps[-1], prev_state, bound, parts)
        step = Step()
        seq.steps.append(step)
        self._hook_step(seq, h, step, "total_h")
        seq.outputs = parts
        return h, state


class Session(Trace):
    """A long-lived, reusable trace for training loops: one *window* per optimizer step.

    Used by `gradwatch.Monitor` and the Lightning callback; most users do not need it.
    Hooks stay registered between `attach` and `detach`. For every window the
    owner sets a plan (`plan`): with ``capture`` every fused call is recorded and every
    cell step and marked state hooked, so that `finish` can return exact reports; with
    only ``retain`` fused calls are recorded (references to their tensors and their output
    gradients) so that the window can still be replayed if `finish` is asked to, while
    cells and marked states are left alone; with neither, the hooks on the fused outputs only
    accumulate the norm of the gradient injected into each watched module (on the device, no
    host synchronisation), which `take_injected` returns.

    Nothing is replayed at the end of a backward pass: the replay happens in `finish`,
    which must be called before the optimizer changes the weights. Calls are named per
    micro-batch (the first forward after a completed backward starts a new one), so the k-th
    call of a module gets the same key in every micro-batch of a window.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Iterable[Selector] | None = None,
        exclude: Iterable[Selector] | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        super().__init__(model, include=include, exclude=exclude, thresholds=thresholds)
        self._state = "session"
        self.names: list[str] = [n for n, _ in self._targets]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._by_module: dict[str, list[Any]] = {}
        self._root_handle: Any = None
        self._attached = False
        self._capture = False
        self._retain = False
        self.disabled: dict[str, str] = {}
        self._injected: list[Tensor | float | None] = [None] * len(self.names)
        self._boundary = False  # a backward pass completed since the last recorded call
        self._mb_counts: dict[str, int] = {}
        self._key_of: dict[str, str] = {}  # unique call name -> per-micro-batch key
        self._module_of: dict[str, str] = {}  # call name -> module (or mark) name

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        raise GradwatchError("a gradwatch Session is driven by attach()/finish(), not `with`")

    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> None:
        """Register the module hooks (idempotent)."""
        if self._attached:
            return
        if not isinstance(self.model, RECURRENT_TYPES):
            self._root_handle = self.model.register_forward_pre_hook(self._on_root_forward)
        for name, module in self._targets:
            if name not in self.disabled:
                self._hook_module(name, module)
        _ACTIVE.append(self)
        self._attached = True

    def _hook_module(self, name: str, module: nn.Module) -> None:
        hs = self._by_module.setdefault(name, [])
        if isinstance(module, nn.RNNBase):
            hs.append(module.register_forward_hook(partial(self._on_fused, name), with_kwargs=True))
        else:
            pre = partial(self._on_cell_pre, name)
            hs.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            hs.append(module.register_forward_hook(partial(self._on_cell, name), with_kwargs=True))

    def detach(self) -> None:
        """Remove the module hooks; what was recorded in the current window is kept."""
        for hs in self._by_module.values():
            for h in hs:
                h.remove()
        self._by_module.clear()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._attached = False

    def close(self) -> None:
        """Remove every hook and release every recorded tensor."""
        self.detach()
        self._release()
        self._injected = [None] * len(self.names)

    def disable(self, name: str, reason: str) -> None:
        """Stop watching one module (or marked-state name) for the rest of the session."""
        self.disabled.setdefault(name, reason)
        for h in self._by_module.pop(name, []):
            h.remove()

    def plan(self, *, capture: bool, retain: bool = False) -> None:
        """Set what the next window records (see the class docstring)."""
        self._capture = bool(capture)
        self._retain = bool(capture or retain)

    @property
    def capturing(self) -> bool:
        return self._capture

    # -- cheap signal ------------------------------------------------------------------------
    def take_injected(self) -> list[Tensor | float | None]:
        """Per watched module, the L2 norm of every gradient that reached its outputs since
        the last call; ``None`` where none did. A float64 tensor on the gradients' device
        (no host synchronisation), or a Python float for gradients on the CPU."""
        out, self._injected = self._injected, [None] * len(self.names)
        return out

    def _add_injected(self, module_name: str, grad: Tensor) -> None:
        i = self._index.get(module_name)
        if i is None:
            return
        g = grad.detach()
        old = self._injected[i]
        if g.device.type == "cpu" and not isinstance(old, Tensor):
            from math import hypot

            v = self._host_norm(g)
            self._injected[i] = v if old is None else hypot(old, v)
            return
        n = torch.linalg.vector_norm(g, dtype=torch.float64)
        if old is not None and not isinstance(old, Tensor):
            old = torch.tensor(old, dtype=torch.float64, device=n.device)
        self._injected[i] = n if old is None else torch.hypot(old, n)

    @staticmethod
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

    def _on_light_grad(self, module_name: str, grad: Tensor | None) -> None:
        if grad is None:
            return
        try:
            self._add_injected(module_name, grad)
            self._queue_finish()
        except Exception as e:  # monitoring must never crash training
            self._failures.setdefault(module_name, f"could not measure a gradient: {e!r}")

    # -- hooks -------------------------------------------------------------------------------
    def _new_name(self, base: str) -> str:
        if self._boundary:  # first recorded call of a new micro-batch
            self._boundary = False
            self._mb_counts.clear()
            self._sequences = {}
            self._forward_index += 1
        name = super()._new_name(base)
        k = self._mb_counts.get(base, 0)
        self._mb_counts[base] = k + 1
        self._key_of[name] = base if k == 0 else f"{base}#{k}"
        self._module_of[name] = base
        return name

    def _on_fused(self, module_name: str, module: nn.RNNBase, args, kwargs, output) -> None:
        if module_name in self.disabled or not torch.is_grad_enabled():
            return
        if self._retain:
            super()._on_fused(module_name, module, args, kwargs, output)
            return
        try:
            for tensor in output_tensors(output).values():
                tensor.register_hook(partial(self._on_light_grad, module_name))
        except Exception as e:  # monitoring must never crash training
            self._failures.setdefault(module_name, f"could not hook the outputs: {e!r}")

    def _on_fused_grad(self, call: FusedCall, slot: str, grad: Tensor | None) -> None:
        if grad is None:
            return
        grad = grad.detach()
        try:
            self._add_injected(call.module_name, grad)
        except Exception as e:  # monitoring must never crash training
            self._failures.setdefault(call.module_name, f"could not measure a gradient: {e!r}")
        try:
            # Kept by reference, not copied (this runs at every step on the CPU): autograd
            # never writes into a gradient that someone else still holds (its in-place
            # accumulation needs the only reference), and the replay only reads it.
            old = call.grads.get(slot)
            call.grads[slot] = grad if old is None else old + grad
            self._queue_finish()
        except Exception as e:  # monitoring must never crash training
            self._failures[call.name] = f"could not record a gradient: {e!r}"

    def _finish_backward(self) -> None:
        # Only mark the micro-batch boundary: the replay waits for finish().
        self._callback_queued = False
        self._boundary = True

    def _on_step_grad(self) -> None:
        super()._on_step_grad()
        self._queue_finish()

    def _on_cell_pre(self, module_name: str, module: nn.Module, args, kwargs):
        if not self._capture or module_name in self.disabled:
            return None
        return super()._on_cell_pre(module_name, module, args, kwargs)

    def _on_cell(self, module_name: str, module: nn.Module, args, kwargs, output) -> None:
        if module in self._pending_cells:
            super()._on_cell(module_name, module, args, kwargs, output)

    def _mark(self, name: str, state: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Any]:
        if not self._capture or name in self.disabled:
            return (state[0] if isinstance(state, tuple) else state), state
        return super()._mark(name, state)

    # -- end of a window ---------------------------------------------------------------------
    def finish(self, replay: bool) -> tuple[list[tuple[str, ModuleReport]], dict[str, str]]:
        """Close the current window.

        With ``replay``, every recorded call is replayed and every hooked sequence reduced;
        returns ``[(key, report), ...]`` in call order, where ``key`` is the per-micro-batch
        name (equal keys are calls to merge), and the failures by module name. Everything
        recorded is released either way.
        """
        results: list[tuple[str, ModuleReport]] = []
        failures: dict[str, str] = {}
        try:
            if replay and self._backward_seen:
                for call in self._calls:
                    if call.name not in self._failures:
                        self._replay(call)
                self._build_step_reports()
                for name in self._order:
                    if name in self._results:
                        results.append((self._key_of.get(name, name), self._results[name]))
            for name, why in self._failures.items():
                failures.setdefault(self._module_of.get(name, name), why)
        finally:
            self._release()
        return results, failures

    def _release(self) -> None:
        for call in self._calls:
            call.release()
        for seq in self._all_sequences:
            seq.release()
        self._calls = []
        self._all_sequences = []
        self._sequences = {}
        self._pending_cells.clear()
        self._results = {}
        self._failures = {}
        self._order = []
        self._name_counts = {}
        self._mb_counts = {}
        self._key_of = {}
        self._module_of = {}
        self._dirty.clear()
        self._backward_seen = False
        self._boundary = False
        self._forward_index += 1


def trace(
    model: nn.Module,
    *,
    include: Iterable[Selector] | None = None,
    exclude: Iterable[Selector] | None = None,
    thresholds: Thresholds | None = None,
) -> Trace:
    """Trace the exact per-timestep hidden-state gradients of ``model``'s recurrent modules.

    ```python
    with gradwatch.trace(model) as tr:
        loss = loss_fn(model(x), y)
        loss.backward()
    rep = tr.report()
    rep["encoder.rnn"].total     # [num_layers, num_directions, T]
    ```

    Fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` calls are measured by replaying their
    recurrence after backward; cells (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``) called
    step by step and states marked with `mark_state` are measured by hooks. Training
    is not changed: losses, parameter gradients and the RNG state are bit-identical.

    Args:
        model: The module to watch; its recurrent submodules are found by type.
        include: Only watch modules whose qualified name matches one of these ``fnmatch``
            patterns or that are instances of one of these types.
        exclude: Do not watch modules matching one of these patterns or types.
        thresholds: The `gradwatch._analysis.verdicts.Thresholds` for the reports' verdicts
            (default thresholds when ``None``).

    Raises:
        UnsupportedModuleError: a watched module has a configuration that cannot be measured.
    """
    return Trace(model, include=include, exclude=exclude, thresholds=thresholds)


def mark_state(
    name: str, state: Tensor | tuple[Tensor, ...]
) -> tuple[Tensor, Tensor | tuple[Tensor, ...]]:
    """Mark the new state of one step of a hand-written recurrence.

    Call it once per step on the state the step produced; use the first result for
    everything that leaves the recurrence (outputs, the final state) and the second to feed
    the next step:

    ```python
    for x_t in xs:
        h = torch.tanh(x_t @ U + h @ W)
        out_t, h = gradwatch.mark_state("my_rnn", h)
        outputs.append(head(out_t))
    ```

    ``state`` may be a tuple (for example ``(h, c)``); its first element is the hidden state
    whose gradient is reported, and the carried part is measured over all elements. Outside
    a trace, or with gradients disabled, it returns ``(state[0], state)`` unchanged, at no cost.
    Steps with the same name in one forward pass of the traced model form one sequence.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"gradwatch.mark_state: name must be a non-empty string, got {name!r}")
    parts = state if isinstance(state, tuple) else (state,)
    if not parts or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError(
            f"gradwatch.mark_state({name!r}): state must be a tensor or a tuple of tensors"
        )
    tr = _ACTIVE[-1] if _ACTIVE else None
    if tr is None or not torch.is_grad_enabled() or not parts[0].requires_grad:
        return parts[0], state
    return tr._mark(name, state)
