"""Family: ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` called step by step in a loop.

Each call of a cell is one step; consecutive calls whose state is the previous call's output
(or derived from it) form one sequence. The per-step gradients are hooked exactly
(`gradwatch._capture.steps`); the cell's recurrence is recomputed from the recorded steps so
that the analysis can walk it back.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch._capture.families import Family, register
from gradwatch._capture.raw import RawCapture, Recurrences, hooked_sequence
from gradwatch._capture.recurrences import LayerWeights, make_recurrence
from gradwatch._capture.stats import relative_deviation
from gradwatch._capture.steps import (
    Step,
    StepSequence,
    consumes,
    graph_bound,
    hook_carried,
    hook_step,
    step_stats,
)
from gradwatch._capture.weights import ParametrizedOutputs, forward_weight, raw_parameter

if TYPE_CHECKING:
    from gradwatch._capture.recorder import Recorder

__all__ = ["CELLS", "CellFamily", "cell_kind"]

_CELL_KINDS = ((nn.LSTMCell, "LSTMCell"), (nn.GRUCell, "GRUCell"), (nn.RNNCell, "RNNCell"))
_MODES = {"LSTMCell": "LSTM", "GRUCell": "GRU", "RNNCell": "RNN_TANH"}
# Largest deviation of the recomputed cell outputs from the recorded ones for the propagation
# curve to be trusted (recorded under autocast, outputs are low precision: looser).
_CELL_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}


def cell_kind(module: nn.Module) -> str | None:
    """``"LSTMCell"``, ``"GRUCell"`` or ``"RNNCell"`` for a cell (or a subclass), else ``None``."""
    return next((kind for cls, kind in _CELL_KINDS if isinstance(module, cls)), None)


_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _dtype(step: Step) -> torch.dtype:
    w = step.weights.get("weight_hh")
    return torch.float64 if w is not None and w.dtype == torch.float64 else torch.float32


def _trajectory(seq: StepSequence, device: torch.device) -> Recurrences | None:
    """The cell's recurrence set up from the recorded steps, with the deviation of its
    recomputed outputs from the recorded ones; ``None`` when the steps cannot be stacked
    (varying batch, missing records)."""
    cell, steps = seq.module, seq.steps
    kind = None if cell is None else cell_kind(cell)
    if cell is None or kind is None or not steps:
        return None
    if any(st.x is None or st.hx is None or st.h is None for st in steps):
        return None
    if steps[-1].weights.get("weight_hh") is None or steps[-1].weights.get("weight_ih") is None:
        return None
    mode = _MODES[kind]
    if mode == "RNN_TANH" and getattr(cell, "nonlinearity", "tanh") == "relu":
        mode = "RNN_RELU"
    dtype = _dtype(steps[-1])

    def stacked(parts: list[Any]) -> Tensor:
        return torch.stack(
            [(p if p.dim() == 2 else p.unsqueeze(0)).to(device, dtype) for p in parts]
        )

    try:
        x = stacked([st.x for st in steps])
        h_prev = stacked([st.hx[0] for st in steps])  # type: ignore[index]
        c_prev = stacked([st.hx[1] for st in steps]) if mode == "LSTM" else None  # type: ignore[index]
        real = stacked([st.h for st in steps])
    except RuntimeError:  # steps of different batch sizes
        return None
    if x.shape[1] == 0:  # an empty batch: no trajectory to walk
        return None

    def weight(name: str) -> Tensor | None:  # as the last step's forward read it
        w = steps[-1].weights.get(name)
        return None if w is None else w.detach().to(device, dtype)

    weights = LayerWeights(
        weight("weight_ih"), weight("weight_hh"), weight("bias_ih"), weight("bias_hh")
    )
    rec = make_recurrence(mode, weights, reverse=False)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        out = rec.from_states(x, h_prev, c_prev)
        deviation = relative_deviation([out], [real])
    lengths = torch.full((x.shape[1],), len(steps))
    return Recurrences(
        {(0, 0): rec},
        None,
        lengths,
        {(0, 0): raw_parameter(cell, "weight_hh")},
        deviation=deviation,
        tolerance=_CELL_TOLERANCE[dtype],
    )


def _lstm_cell_path(cell: nn.LSTMCell, step: Step, dh: Tensor) -> Tensor:
    """The gradient reaching c_t through h_t = o * tanh(c_t) inside the same cell call."""
    assert step.x is not None and step.hx is not None and step.c is not None
    dtype = _dtype(step)
    H = cell.hidden_size
    w = step.weights
    x, h = step.x.to(dtype), step.hx[0].to(dtype)
    pre_o = x @ w["weight_ih"][3 * H :].detach().to(dtype).t()  # type: ignore[index]
    pre_o = pre_o + h @ w["weight_hh"][3 * H :].detach().to(dtype).t()  # type: ignore[index]
    for b in ("bias_ih", "bias_hh"):
        if w.get(b) is not None:
            pre_o = pre_o + w[b][3 * H :].detach().to(dtype)  # type: ignore[index]
    tc = torch.tanh(step.c.to(dtype))
    return dh.to(dtype) * torch.sigmoid(pre_o) * (1 - tc * tc)


class CellFamily(Family):
    name = "cells"
    looks_for = "nn.RNNCell, nn.LSTMCell, nn.GRUCell"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.RNNCellBase)

    def check(self, name: str, module: nn.Module) -> str | None:
        if cell_kind(module) is not None:
            return None
        return (
            f"module {name!r}: {type(module).__name__} derives from nn.RNNCellBase but not "
            "from nn.RNNCell, nn.LSTMCell or nn.GRUCell, so its step equations are unknown; "
            "exclude it or mark its state with gradwatch.mark_state()"
        )

    def hook(self, recorder: Recorder, name: str, module: nn.Module) -> list[RemovableHandle]:
        pending: dict[str, Any] = {}  # the step between this module's pre-hook and hook
        seen = ParametrizedOutputs()  # parametrized weights as the forward computed them
        return [
            recorder.forward_pre_hook(module, self._on_pre, name, pending),
            recorder.forward_hook(module, self._on_call, name, pending, seen),
            *seen.hook(recorder, module),
        ]

    def capture(self, record: StepSequence) -> RawCapture:
        module = record.module
        lstm = isinstance(module, nn.LSTMCell) and record.kind == "LSTMCell"
        path = partial(_lstm_cell_path, module) if lstm else None
        measured = step_stats(record, path)
        device = measured[0]["total"].device
        return hooked_sequence(
            record.name, record.module_name, record.kind, measured, _trajectory(record, device)
        )

    # -- hooks -------------------------------------------------------------------------------
    def _on_pre(self, recorder: Recorder, name: str, pending: dict, module, args, kwargs):
        if not recorder.capturing or name in recorder.disabled:
            return None
        if recorder.skip_call(name, module):  # no_grad, or a recomputation in backward
            return None
        try:
            x = args[0] if args else kwargs["input"]
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            state = None if hx is None else (hx if isinstance(hx, tuple) else (hx,))
            seq = recorder.sequence(name)
            carry = None
            if not _continues(recorder, seq, state):
                seq = recorder.start_sequence(name, cell_kind(module) or "", module, self)
            elif state is not None:
                assert seq is not None
                # The carried part of the previous step is what this call sends back into
                # the state it receives. It is read from this call's autograd nodes after the
                # forward (hook_carried); the state itself is passed on untouched, so
                # PyTorch sums the gradient contributions in the same order as without us.
                carry = (seq.steps[-1], state, graph_bound((x, *state)))
            step = Step(x=x.detach())
            if state is not None:  # the state the step started from, for the diagnostics
                step.hx = tuple(s.detach() for s in state)
            seq.steps.append(step)
            pending["step"] = (seq, step, carry)
        except Exception as e:  # monitoring must never crash training
            recorder.fail(name, f"could not record a cell step: {e!r}")
        return None

    def _on_call(
        self, recorder: Recorder, name: str, pending: dict, seen, module, args, kwargs, out
    ):
        record = pending.pop("step", None)
        if record is None:
            return
        seq, step, carry = record
        try:
            step.weights = {w: forward_weight(module, w, seen) for w in _WEIGHTS}
            h, c = out if isinstance(out, tuple) else (out, None)
            parts = (h,) if c is None else (h, c)
            if carry is not None:
                hook_carried(seq, *carry, parts)
            if step.hx is None:  # the cell started from zeros
                step.hx = tuple(torch.zeros_like(p.detach()) for p in parts)
            step.h = h.detach()
            hook_step(seq, h, step, "total_h")
            if c is not None:
                step.c = c.detach()
                step.c_hook_has_h_path = c.grad_fn is not h.grad_fn and consumes(h, c)
                hook_step(seq, c, step, "total_c")
            seq.outputs = parts
        except Exception as e:  # monitoring must never crash training
            recorder.fail(name, f"could not record a cell step: {e!r}")


def _continues(recorder: Recorder, seq: StepSequence | None, state: Any) -> bool:
    """Whether a step continues the current sequence: same forward pass, and the state it
    receives is the previous output or derived from it (not a fresh leaf tensor)."""
    if seq is None or state is None or seq.forward_index != recorder.forward_index:
        return False
    h = state[0]
    return any(h is o for o in seq.outputs) or (h.requires_grad and h.grad_fn is not None)


CELLS = register(CellFamily())
