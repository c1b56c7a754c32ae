"""Family: closed-form continuous-time networks, ncps ``CfC`` (ncps 1.x, PyTorch).

``CfC.forward`` loops over time and calls its cell as ``self.rnn_cell.forward(...)``, so hooks
on the cell never fire. Two submodules are still called normally at every step, and they see
the whole state:

* ``fc`` (``nn.Identity``, or the projection with ``proj_size``) receives ``h_t`` itself, the
  tensor the next step reads, when the layer returns sequences (``return_sequences=True``,
  the default) and the cell is not wired (with a wiring, ``h_t`` is the concatenation of the
  layers, and ``fc`` sees only the motor neurons);
* with ``mixed_memory=True``, ``lstm`` (ncps' own LSTM cell) returns the memory cell ``c_t``.

So each step is recorded as a marked state is (`gradwatch._capture.steps`): a hook on
``h_t`` reads its total gradient, post-hooks on the nodes of the next step that read
``(h_t[, c_t])`` read the carried part, and the direct part is the difference. Hooks only
read; nothing of the package is replaced. The cell's equations (Hasani et al., 2022) are not
replayed, so the propagation is estimated from the measured per-step factor.

``LTC`` calls nothing per step that sees its state, and neither do the configurations above
that are excluded: they are reported unsupported with the declare-it-yourself path
(`gradwatch.mark_state` in a loop over the layer's cell, docs/integrations.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch._capture.families import Family, register
from gradwatch._capture.hooks import WeakHook
from gradwatch._capture.raw import RawCapture, hooked_sequence
from gradwatch._capture.steps import (
    Step,
    StepSequence,
    graph_bound,
    hook_carried,
    hook_step,
    step_stats,
)

if TYPE_CHECKING:
    from gradwatch._capture.recorder import Recorder

__all__ = ["LIQUID", "LiquidFamily"]

_CFC = ("ncps.torch.cfc", "CfC")
_LTC = ("ncps.torch.ltc", "LTC")
_DECLARE = (
    "; declare its state with gradwatch.mark_state in a loop over the layer's rnn_cell "
    "(docs/integrations.md, ncps), or exclude it"
)


def _is(module: nn.Module, key: tuple[str, str]) -> bool:
    return any((c.__module__, c.__name__) == key for c in type(module).__mro__)


class LiquidFamily(Family):
    name = "liquid"
    looks_for = "ncps CfC"

    def claims(self, module: nn.Module) -> bool:
        return _is(module, _CFC) or _is(module, _LTC)

    def check(self, name: str, module: nn.Module) -> str | None:
        where = f"module {name!r}: ncps {type(module).__name__}"
        if _is(module, _LTC):
            return f"{where} calls no submodule that sees its state at each step{_DECLARE}"
        if getattr(module, "wired_mode", False):
            return (
                f"{where} with a wiring keeps its state as a concatenation of layers that "
                f"never reaches a hooked submodule{_DECLARE}"
            )
        if not getattr(module, "return_sequences", True):
            return (
                f"{where} with return_sequences=False shows its state to no submodule "
                f"before the last step{_DECLARE}"
            )
        if not isinstance(getattr(module, "fc", None), nn.Module):
            return f"{where} has no fc submodule{_DECLARE}"
        return None

    def hook(self, recorder: Recorder, name: str, module: nn.Module) -> list[RemovableHandle]:
        # The per-step hooks (on fc, and lstm with mixed memory) are registered only for the
        # calls that are captured, and removed when the call ends, even when it raises: a
        # step that is not captured costs two hook calls per layer call, not one per step.
        call: dict[str, Any] = {}  # the running call: its sequence, step hooks, memory cell
        end = WeakHook(recorder, module, self._on_end, name, call)
        return [
            recorder.forward_pre_hook(module, self._on_start, name, call),
            module.register_forward_hook(end, with_kwargs=True, always_call=True),
        ]

    def capture(self, record: StepSequence) -> RawCapture:
        return hooked_sequence(record.name, record.module_name, "CfC", step_stats(record))

    # -- hooks -------------------------------------------------------------------------------
    def _on_start(self, recorder: Recorder, name: str, call: dict, module, args, kwargs):
        _end_call(call)
        if not recorder.capturing or name in recorder.disabled:
            return
        if recorder.skip_call(name, module):  # no_grad, or a recomputation in backward
            return
        try:
            call["seq"] = recorder.start_sequence(name, "CfC", module, self)
            state = WeakHook(recorder, module.fc, self._on_state, name, call)
            hooks = [module.fc.register_forward_pre_hook(state, with_kwargs=True)]
            lstm = getattr(module, "lstm", None)
            if getattr(module, "use_mixed", False) and isinstance(lstm, nn.Module):
                memory = WeakHook(recorder, lstm, self._on_memory, name, call)
                hooks.append(lstm.register_forward_hook(memory, with_kwargs=True))
            call["hooks"] = hooks
        except Exception as e:  # monitoring must never crash training
            _end_call(call)
            recorder.fail(name, f"could not record a CfC call: {e!r}", keep_first=True)

    def _on_end(self, recorder: Recorder, name: str, call: dict, module, args, kwargs, out):
        _end_call(call)

    def _on_memory(self, recorder: Recorder, name: str, call: dict, module, args, kwargs, out):
        if "seq" in call and isinstance(out, tuple) and len(out) == 2:
            call["memory"] = out[1]  # c_t, the memory cell this step passes on

    def _on_state(self, recorder: Recorder, name: str, call: dict, module, args, kwargs):
        seq: StepSequence | None = call.get("seq")
        h = args[0] if args else None
        if seq is None or not isinstance(h, Tensor) or not h.requires_grad:
            return
        try:
            memory = call.pop("memory", None)
            parts = (h,) if memory is None else (h, memory)
            if seq.steps and seq.outputs:
                # what this step's graph sends back into the previous state: its carried part
                prev = seq.outputs
                hook_carried(seq, seq.steps[-1], prev, graph_bound(prev), parts)
            step = Step(x=h.detach())
            seq.steps.append(step)
            hook_step(seq, h, step, "total_h")
            seq.outputs = parts
        except Exception as e:  # monitoring must never crash training
            recorder.fail(name, f"could not record a CfC step: {e!r}", keep_first=True)
            _end_call(call)


def _end_call(call: dict[str, Any]) -> None:
    """Remove the call's step hooks and forget it."""
    for handle in call.pop("hooks", ()):
        handle.remove()
    call.clear()


LIQUID = register(LiquidFamily())
