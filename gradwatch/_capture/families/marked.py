"""Family: hand-written recurrences whose state is marked with `mark_state` at every step.

No module is claimed: the records come from the user's calls. The step equations are
unknown, so the capture holds the hooked per-step gradients only (the analysis estimates the
propagation from the actual gradient's per-step factor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradwatch._capture.families import Family, register
from gradwatch._capture.raw import RawCapture, hooked_sequence
from gradwatch._capture.recorder import active_recorders
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

__all__ = ["MARKED", "MarkedFamily", "mark_state"]


class MarkedFamily(Family):
    name = "marked"

    def capture(self, record: StepSequence) -> RawCapture:
        return hooked_sequence(record.name, record.module_name, "custom", step_stats(record))

    def mark(self, recorder: Recorder, name: str, state: Tensor | tuple[Tensor, ...]) -> Any:
        """Record one step of the marked recurrence ``name`` (see `mark_state`)."""
        parts = state if isinstance(state, tuple) else (state,)
        h = parts[0]
        if not recorder.capturing or name in recorder.disabled:
            return h, state
        seq = recorder.sequence(name)
        if seq is None or seq.forward_index != recorder.forward_index:
            seq = recorder.start_sequence(name, "custom", None, self)
        elif seq.steps and seq.outputs:
            # What this step's graph sends back to the previous marked state is its carried
            # part: hooked on the autograd nodes that read it (created after it), so the
            # state is passed on untouched and gradients are summed in the same order.
            prev_state = seq.outputs
            hook_carried(seq, seq.steps[-1], prev_state, graph_bound(prev_state), parts)
        step = Step()
        seq.steps.append(step)
        hook_step(seq, h, step, "total_h")
        seq.outputs = parts
        return h, state


MARKED = register(MarkedFamily())


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
    The step goes to every trace (and monitor) attached in the calling thread: a trace in
    another thread does not see it, and nested traces each do.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"gradwatch.mark_state: name must be a non-empty string, got {name!r}")
    parts = state if isinstance(state, tuple) else (state,)
    if not parts or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError(
            f"gradwatch.mark_state({name!r}): state must be a tensor or a tuple of tensors"
        )
    recorders = active_recorders()  # those of the calling thread: nested traces each get it
    if not recorders or not torch.is_grad_enabled() or not parts[0].requires_grad:
        return parts[0], state
    for recorder in recorders:
        MARKED.mark(recorder, name, state)
    return parts[0], state
