"""``gradwatch.trace``: capture per-timestep hidden-state gradients of one training step."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from gradwatch.capture.discovery import (
    RECURRENT_TYPES,
    Selector,
    cell_kind,
    find_recurrent_modules,
)
from gradwatch.capture.fused import FusedCall, output_tensors, record_fused_call, replay_fused_call
from gradwatch.capture.stepwise import Step, StepSequence, build_step_report, consumes
from gradwatch.errors import BackwardNotRunError, GradwatchError, NoRecurrentModuleError
from gradwatch.report import ModuleReport, Report

__all__ = ["Trace", "mark_state", "trace"]

_ACTIVE: list[Trace] = []


class Trace:
    """Capture of the exact ``dL/dh_t`` of every recurrent module call inside a ``with`` block.

    Use it through :func:`trace`. Inside the block, run forward and backward as usual; the
    values are computed at the end of each backward pass, before any optimizer step. After
    the block every hook is removed and every saved tensor released; :meth:`report` returns
    the result.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Iterable[Selector] | None = None,
        exclude: Iterable[Selector] | None = None,
    ) -> None:
        self.model = model
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

        Raises a :class:`~gradwatch.errors.GradwatchError` subclass with the reason when
        nothing could be measured, and, with ``strict`` (the default), a
        :class:`~gradwatch.errors.CaptureError` when some call failed; with ``strict=False``
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
                    self._results[seq.name] = build_step_report(seq)
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
                self._results[call.name] = replay_fused_call(call)
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
            if not self._continues(seq, state):
                seq = self._start_sequence(module_name, cell_kind(module) or "", module)
            elif state is not None:
                assert seq is not None
                views = seq.carried_views(state)
                new_hx = views if isinstance(hx, tuple) else views[0]
                if len(args) > 1:
                    args = (args[0], new_hx, *args[2:])
                else:
                    kwargs = {**kwargs, "hx": new_hx}
            step = Step(x=x.detach())
            if state is not None and len(state) == 2:
                step.hx = (state[0].detach(), state[1].detach())
            seq.steps.append(step)
            self._pending_cells[module] = (seq, step)
            return args, kwargs
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
        seq, step = pending
        try:
            h, c = output if isinstance(output, tuple) else (output, None)
            if step.hx is None and c is not None:  # LSTMCell started from zeros
                step.hx = (torch.zeros_like(h.detach()), torch.zeros_like(c.detach()))
            self._hook_step(seq, h, step, "total_h")
            if c is not None:
                step.c = c.detach()
                step.c_hook_has_h_path = c.grad_fn is not h.grad_fn and consumes(h, c)
                self._hook_step(seq, c, step, "total_c")
            seq.outputs = (h,) if c is None else (h, c)
        except Exception as e:  # monitoring must never crash training
            self._failures[module_name] = f"could not record a cell step: {e!r}"

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
        step = Step()
        seq.steps.append(step)
        out = h.view_as(h)
        self._hook_step(seq, out, step, "direct_h")
        views = seq.carried_views(parts)  # consumed by the next step: this step's carried part
        return out, (views if isinstance(state, tuple) else views[0])


def trace(
    model: nn.Module,
    *,
    include: Iterable[Selector] | None = None,
    exclude: Iterable[Selector] | None = None,
) -> Trace:
    """Trace the exact per-timestep hidden-state gradients of ``model``'s recurrent modules.

    ::

        with gradwatch.trace(model) as tr:
            loss = loss_fn(model(x), y)
            loss.backward()
        rep = tr.report()
        rep["encoder.rnn"].total     # [num_layers, num_directions, T]

    Fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` calls are measured by replaying their
    recurrence after backward; cells (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``) called
    step by step and states marked with :func:`mark_state` are measured by hooks. Training
    is not changed: losses, parameter gradients and the RNG state are bit-identical.

    Args:
        model: The module to watch; its recurrent submodules are found by type.
        include: Only watch modules whose qualified name matches one of these ``fnmatch``
            patterns or that are instances of one of these types.
        exclude: Do not watch modules matching one of these patterns or types.

    Raises:
        UnsupportedModuleError: a watched module has a configuration that cannot be measured.
    """
    return Trace(model, include=include, exclude=exclude)


def mark_state(
    name: str, state: Tensor | tuple[Tensor, ...]
) -> tuple[Tensor, Tensor | tuple[Tensor, ...]]:
    """Mark the new state of one step of a hand-written recurrence.

    Call it once per step on the state the step produced; use the first result for
    everything that leaves the recurrence (outputs, the final state) and the second to feed
    the next step::

        for x_t in xs:
            h = torch.tanh(x_t @ U + h @ W)
            out_t, h = gradwatch.mark_state("my_rnn", h)
            outputs.append(head(out_t))

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
