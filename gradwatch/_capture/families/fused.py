"""Family: fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` calls, measured by replaying them.

A forward hook keeps references to each call's tensors and hooks its outputs; after backward
the recurrence is replayed with the observed output gradients (`gradwatch._capture.fused`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from gradwatch._capture.families import Family, register
from gradwatch._capture.fused import (
    FusedCall,
    check_fused_module,
    output_tensors,
    record_fused_call,
    replay,
    split_output,
)
from gradwatch._capture.raw import RawCapture, Recurrences
from gradwatch._capture.steps import observe_gradient
from gradwatch._capture.weights import raw_parameter

if TYPE_CHECKING:
    from gradwatch._capture.recorder import Recorder

__all__ = ["FUSED", "FusedFamily", "capture_call"]


def _weight_keys(mod: nn.RNNBase) -> dict[tuple[int, int], Tensor]:
    """The module's own recurrent weight parameters by (layer, direction), read without
    running a parametrization (`raw_parameter`)."""
    keys = {}
    for layer in range(mod.num_layers):
        for d in range(2 if mod.bidirectional else 1):
            w = raw_parameter(mod, f"weight_hh_l{layer}" + ("_reverse" if d else ""))
            if w is not None:
                keys[layer, d] = w
    return keys


def capture_call(call: FusedCall, probes: bool = True) -> RawCapture:
    """Replay one recorded call: its per-step statistics and the replayed recurrence, with
    unit probes walked back alongside (``probes``; the raw data of the propagation)."""
    rep = replay(call, probes=probes)
    mod = call.module
    reasons = []
    if call.dropout_active:
        reasons.append(
            f"inter-layer dropout (p={mod.dropout}) in training mode: the kernel's dropout masks "
            "are not visible, so layers below the top are replayed without dropout"
        )
    # exact means equal to what this kernel computed, up to its math mode's rounding
    mode = call.mode
    tolerance = None if call.dropout_active else mode.tolerance
    steps = rep.stats["total"].shape[-1]
    num_dir = 2 if mod.bidirectional else 1
    return RawCapture(
        name=call.name,
        module_name=call.module_name,
        kind=mod.mode,
        num_layers=mod.num_layers,
        num_directions=num_dir,
        stats=rep.stats,
        valid_samples=(rep.lengths.view(1, -1) > torch.arange(steps).view(steps, 1)).sum(1),
        reverse=(False, True)[:num_dir],
        source="replay",
        received_gradient=bool(call.grads),
        fidelity=rep.fidelity,
        fidelity_tolerance=tolerance,
        fidelity_reason="the replay deviates from the module's real outputs by {fidelity:.1e} "
        f"(relative), above the {{tolerance:.0e}} expected of a kernel computing in "
        f"{mode.describe()}; does a subclass change the forward computation?",
        reasons=tuple(reasons),
        # an empty batch (a routing step that sent no sample here) has no trajectory to walk
        recurrences=None
        if rep.lengths.numel() == 0
        else Recurrences(
            dict(rep.recurrences), rep.valid, rep.lengths, _weight_keys(mod), walked=rep.walked
        ),
    )


class FusedFamily(Family):
    name = "fused"
    looks_for = "nn.RNN, nn.LSTM, nn.GRU"
    failure = "replay failed"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.RNNBase)

    def check(self, name: str, module: nn.Module) -> str | None:
        try:
            check_fused_module(name, module)  # type: ignore[arg-type]
        except ValueError as e:
            return str(e)
        return None

    def hook(self, recorder: Recorder, name: str, module: nn.Module) -> list[RemovableHandle]:
        return [recorder.forward_hook(module, self._on_call, name)]

    def capture(self, record: FusedCall) -> RawCapture:
        return capture_call(record)

    # -- hooks -------------------------------------------------------------------------------
    def _on_call(self, recorder: Recorder, name: str, module: nn.Module, args, kwargs, output):
        if not recorder.retaining and not recorder.signals:
            return  # a step without signals: nothing to do
        if name in recorder.disabled or recorder.skip_call(name, module):
            return
        inp = args[0] if args else kwargs.get("input")
        if not recorder.retaining:  # a cheap step: only the injected gradient is kept
            try:
                out, h_n, c_n = split_output(name, module, inp, output)  # type: ignore[arg-type]
                recorder.watch_outputs(name, (_data(out), h_n, c_n))
            except Exception as e:  # monitoring must never crash training
                recorder.fail(name, f"could not hook the outputs: {e!r}", keep_first=True)
            return
        params = tuple(module.parameters())
        try:
            call = record_fused_call("", name, module, args, kwargs, output)  # type: ignore[arg-type]
            if call is None:
                return
            call.name = recorder.new_name(name)
            for slot, tensor in output_tensors(name, module, inp, output).items():  # type: ignore[arg-type]
                hook = partial(self._on_grad, recorder, call, slot, params)
                call.handles.append(observe_gradient(tensor, hook))
            recorder.add(call, self)
        except Exception as e:  # monitoring must never crash training
            recorder.fail(name, f"could not record the call: {e}")

    @staticmethod
    def _on_grad(recorder: Recorder, call: FusedCall, slot: str, params: tuple, grad: Any) -> None:
        if grad is None:  # an unused output of a multi-output node
            return
        try:
            # Per window (every step on the CPU) kept by reference, not copied: autograd never
            # writes into a gradient someone else still holds, and the replay only reads it.
            kept = grad.detach() if recorder.windowed else grad.detach().clone()
            recorder.gradient(call, partial(_store, recorder, call, slot, kept), params)
        except Exception as e:  # monitoring must never crash training
            recorder.fail(call.name, f"could not record a gradient: {e!r}")


def _store(recorder: Recorder, call: FusedCall, slot: str, grad: Tensor) -> None:
    """Apply one gradient of a completed training pass to a recorded call."""
    recorder.add_injected(call.module_name, grad)
    old = call.grads.get(slot)
    call.grads[slot] = grad if old is None else old + grad


def _data(x: Tensor | PackedSequence) -> Tensor:
    return x.data if isinstance(x, PackedSequence) else x


FUSED = register(FusedFamily())
