"""Family: xLSTM's sLSTM cell with the pure-PyTorch ``backend="vanilla"`` (xlstm 2.x).

The vanilla backend (``xlstm.blocks.slstm.src.vanilla.slstm_forward``) loops over time in
Python: each step stacks its new state ``(y_t, c_t, n_t, m_t)`` into one ``[4, B, H]`` tensor,
which the next step reads and which is copied into the preallocated ``states_all[:, t + 1]``
that the cell returns. The loop's locals are out of reach, but every step leaves two autograd
nodes behind in the call's graph, found from its output after the forward:

* the node that produced the stacked state: a pre-hook on it reads the gradient reaching the
  whole state of step ``t`` (every consumer: the next step and the returned tensor);
* the ``CopySlices`` node of ``states_all[:, t + 1] = state``: a post-hook on it reads what the
  returned tensor (the layer output and the final state) sends to that state, the direct part.

The carried part is their difference (what the next step sends back), over all four state
tensors, as the LSTM's carried part is over ``(h, c)``. The reported hidden state is ``y_t``;
``cell_total`` is the whole gradient reaching ``c_t``, read at the node that produced it (so
it includes the path through ``y_t = o_t c_t / n_t`` inside the step). Hooks only read: the
gradients are summed in the same order as without gradwatch. The step equations (Beck et
al., 2024, eq. 8-17, with the stabiliser ``m_t``) are not replayed, so the propagation is
estimated from the measured per-step factor, as for `mark_state`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch._capture.families import Family, register
from gradwatch._capture.raw import RawCapture, hooked_sequence
from gradwatch._capture.steps import Step, StepSequence, graph_bound, step_stats

if TYPE_CHECKING:
    from gradwatch._capture.recorder import Recorder

__all__ = ["SLSTM", "SLSTMFamily"]

_VANILLA = ("xlstm.blocks.slstm.cell", "sLSTMCell_vanilla")
_CUDA = ("xlstm.blocks.slstm.cell", "sLSTMCell_cuda")
_STATE_PARTS = 4  # y, c, n, m


def _is(module: nn.Module, key: tuple[str, str]) -> bool:
    return any((c.__module__, c.__name__) == key for c in type(module).__mro__)


@dataclass
class _SLSTMStep:
    """What the hooks of one step saw (summed over backward passes)."""

    total: Tensor | None = None  # [4, B, H] at the stacked state
    direct: Tensor | None = None  # [4, B, H] from the returned tensor
    cell: Tensor | None = None  # [B, H] at c_t, every path

    def add(self, slot: str, grad: Tensor) -> None:
        old = getattr(self, slot)
        setattr(self, slot, grad if old is None else old + grad)


def _copy_chain(output: Tensor, bound: int, steps: int) -> list[tuple[Any, Any, int]] | None:
    """The ``(CopySlices node, state node, state output_nr)`` of each step, in time order:
    the chain of copies into ``states_all`` that ``output`` was sliced from."""
    frontier, seen, node = [output.grad_fn], set(), None
    while frontier:  # the views the cell applied to states_all: permute, view, slice, select
        fn = frontier.pop()
        if fn is None or id(fn) in seen or fn._sequence_nr() <= bound:
            continue
        seen.add(id(fn))
        if type(fn).__name__ == "CopySlices":
            node = fn
            break
        frontier.extend(child for child, _ in fn.next_functions)
    chain = []
    while node is not None and type(node).__name__ == "CopySlices" and len(chain) < steps:
        (base, _), (src, nr) = node.next_functions[:2]
        chain.append((node, src, nr))
        node = base
    if len(chain) != steps or not all(_is_state_stack(src) for _, src, _ in chain):
        return None  # not the loop of xlstm 2.0.6's vanilla backend: measure nothing
    return chain[::-1]


def _is_state_stack(node: Any) -> bool:
    """Whether ``node`` stacks the four state tensors ``(y, c, n, m)`` of one step."""
    return (
        node is not None
        and type(node).__name__ == "StackBackward0"
        and len(node.next_functions) == _STATE_PARTS
    )


class SLSTMFamily(Family):
    name = "slstm"
    looks_for = "xlstm sLSTM (backend='vanilla')"

    def claims(self, module: nn.Module) -> bool:
        return _is(module, _VANILLA) or _is(module, _CUDA)

    def check(self, name: str, module: nn.Module) -> str | None:
        if _is(module, _VANILLA):
            return None
        return (
            f"module {name!r}: the sLSTM CUDA backend computes every step inside one kernel, "
            "where the states never exist as tensors; use backend='vanilla' (the same "
            "equations in PyTorch) while you diagnose, or exclude it"
        )

    def hook(self, recorder: Recorder, name: str, module: nn.Module) -> list[RemovableHandle]:
        pending: dict[str, int] = {}
        return [
            recorder.forward_pre_hook(module, self._on_pre, name, pending),
            recorder.forward_hook(module, self._on_call, name, pending),
        ]

    def capture(self, record: StepSequence) -> RawCapture:
        # record.steps holds the call's `_SLSTMStep`s; `step_stats` reads generic steps
        steps = [_as_step(p) for p in record.steps]  # type: ignore[arg-type]
        generic = StepSequence(record.name, record.module_name, record.kind, steps=steps)
        measured = step_stats(generic, cell_path=_no_path)
        return hooked_sequence(record.name, record.module_name, "sLSTM", measured)

    def _on_pre(self, recorder: Recorder, name: str, pending: dict, module, args, kwargs):
        pending.clear()
        if not recorder.capturing or name in recorder.disabled:
            return
        if recorder.skip_call(name, module):  # no_grad, or a recomputation in backward
            return
        inputs = (*args, *kwargs.values())
        pending["bound"] = graph_bound(tuple(t for t in inputs if isinstance(t, Tensor)))

    def _on_call(self, recorder: Recorder, name: str, pending: dict, module, args, kwargs, out):
        if "bound" not in pending:
            return
        bound = pending.pop("bound")
        try:
            x = args[0] if args else kwargs["input"]
            y = out[0] if isinstance(out, tuple) else out
            if not isinstance(y, Tensor) or y.grad_fn is None:
                return
            steps = x.shape[1] if module.config.input_shape == "BSGNH" else x.shape[0]
            chain = _copy_chain(y, bound, steps)
            if chain is None:
                recorder.fail(
                    name,
                    "could not find the sLSTM steps in the call's graph (the vanilla "
                    "backend's loop differs from xlstm 2.0.6's); mark the state yourself "
                    "with gradwatch.mark_state",
                )
                return
            seq = recorder.start_sequence(name, "sLSTM", module, self)
            for copy, state, nr in chain:
                part = _SLSTMStep()
                seq.steps.append(part)  # type: ignore[arg-type]
                _hook_step(seq, part, copy, state, nr)
        except Exception as e:  # monitoring must never crash training
            recorder.fail(name, f"could not record the sLSTM steps: {e!r}", keep_first=True)


def _no_path(step: Step, dh: Tensor) -> Tensor:
    """Never called: the hook on ``c_t`` already sees the path through ``y_t``."""
    return torch.zeros_like(dh)


def _hook_step(call: StepSequence, part: _SLSTMStep, copy: Any, state: Any, nr: int) -> None:
    def on_state(grad_outputs: tuple[Tensor | None, ...]) -> None:
        g = grad_outputs[nr] if nr < len(grad_outputs) else None
        if g is not None:
            call.receive(partial(part.add, "total", g.detach().clone()))

    def on_copy(grad_inputs: tuple[Tensor | None, ...], _: Any) -> None:
        g = grad_inputs[1]
        if g is not None:
            call.receive(partial(part.add, "direct", g.detach().clone()))

    call.handles.append(state.register_prehook(_guarded(on_state)))
    call.handles.append(copy.register_hook(_guarded(on_copy)))
    cell_node, cell_nr = _cell_node(state)
    if cell_node is not None:

        def on_cell(grad_outputs: tuple[Tensor | None, ...]) -> None:
            g = grad_outputs[cell_nr] if cell_nr < len(grad_outputs) else None
            if g is not None:
                call.receive(partial(part.add, "cell", g.detach().clone()))

        call.handles.append(cell_node.register_prehook(_guarded(on_cell)))


def _cell_node(state: Any) -> tuple[Any, int]:
    """The node that produced ``c_t``: the second input of the stack of ``(y, c, n, m)``."""
    node, nr = state.next_functions[1]
    return node, nr


def _guarded(fn: Any) -> Any:
    def hook(*args: Any) -> None:
        # monitoring must never crash training: on an error the step reads zero
        with contextlib.suppress(Exception):
            fn(*args)

    return hook


def _as_step(part: _SLSTMStep) -> Step:
    """The generic step of `step_stats`: total and carried parts of ``y``, carried over the
    whole state ``(y, c, n, m)``, ``cell_total`` from the hook on ``c_t``."""
    step = Step(c_hook_has_h_path=True)
    if part.total is None:
        return step
    direct = torch.zeros_like(part.total) if part.direct is None else part.direct
    carried = part.total - direct
    step.total_h = part.total[0]
    step.total_c = part.cell if part.cell is not None else part.total[1]
    step.carried = list(carried.unbind(0))
    step.c = step.x = part.total[1]
    return step


SLSTM = register(SLSTMFamily())
