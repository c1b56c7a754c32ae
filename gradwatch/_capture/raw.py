"""What capture hands to analysis: one module call's raw per-step statistics, undiagnosed.

A `RawCapture` holds device tensors (no value has been read back to the host) and, where
the family knows its step equations, the recorded recurrence as `Walkable` objects, one per
layer and direction. `gradwatch._analysis.analyze` turns it into a `ModuleReport`; capture
never computes a diagnostic quantity or a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["RawCapture", "Recurrences", "Transition", "Walkable"]

Source = Literal["replay", "hooks"]


@runtime_checkable
class Walkable(Protocol):
    """One layer and direction of a recorded recurrence, as the analysis reads it.

    The propagation curve walks it back with `step_back` from a unit probe on the full state
    (``state_sizes`` wide); the causes read the recurrent matrices, whether the state passes
    through gates, and the named values `trajectory` returns. `gradwatch._capture.recurrences
    .Recurrence` is the built-in implementation; a new family only has to provide these.
    """

    reverse: bool  # processes t = T-1 .. 0
    steps: int  # T, set once the trajectory is recorded

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Widths of the parts of the recurrent state, e.g. ``(H,)`` or ``(P, H)`` for h, c."""
        ...

    @property
    def gated(self) -> bool:
        """Whether gates multiply the state path (no Pascanu bound then)."""
        ...

    @property
    def weight(self) -> Tensor:
        """A tensor on the device and in the dtype of the walk (for probes)."""
        ...

    def order(self, steps: int) -> range:
        """Time indices in the order the forward pass visits them."""
        ...

    def step_back(
        self, t: int, dh: Tensor, dc: Tensor | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Back through step ``t``: ``(d_input, dh_prev, dc_prev, dc_total)`` for a gradient
        ``dh`` at the state (``dc`` at the second state part, if any)."""
        ...

    def recurrent_matrix(self) -> Tensor:
        """The map from the previous state to the pre-activations (its spectral norm)."""
        ...

    def candidate_block(self) -> Tensor:
        """The square block feeding the state nonlinearity (its spectral radius)."""
        ...

    def forget_bias(self) -> Tensor | None:
        """The mean effective forget-gate bias, where there is one."""
        ...

    def trajectory(self, steps: Tensor) -> dict[str, Tensor]:
        """Values along the trajectory at ``steps``, ``[S, B, H]`` each: ``"derivative"`` of
        the state nonlinearity, gate values by gate name (`gradwatch._base.vocabulary.Gate`),
        and ``"relu"`` when the nonlinearity is a ReLU."""
        ...


@dataclass
class Recurrences:
    """The recorded recurrence of one call, for the propagation and the causes.

    ``layers`` maps ``(layer, direction)`` to its `Walkable`; ``valid`` is the ``[T, B]``
    mask (``None``: every sample covers every step) and ``lengths`` the ``[B]`` sequence
    lengths; ``keys`` are the module's own weight parameters per ``(layer, direction)``,
    which key the warm start of the power iterations (weakly held). When the trajectory was
    recomputed rather than observed, ``deviation`` (a device scalar) is how far the recomputed
    outputs are from the recorded ones: above ``tolerance`` the analysis does not trust it.
    ``walked`` holds, where the capture already walked unit probes back through a layer
    (`gradwatch._capture.probes`: the fused replay does it alongside its own backward walk),
    their log norms ``[R, T, B]``; the analysis then summarises them instead of walking.
    """

    layers: dict[tuple[int, int], Walkable]
    valid: Tensor | None
    lengths: Tensor
    keys: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    deviation: Tensor | None = None
    tolerance: float = math.inf
    walked: dict[tuple[int, int], Tensor] = field(default_factory=dict)


@dataclass
class Transition:
    """The transition of a diagonal linear recurrence ``h_t = a_t ⊙ h_{t-1} + u_t``.

    ``log_abs_a`` is ``log |a_t|`` as ``[B, T, S]`` (state flattened; ``-inf`` where
    ``a_t = 0``); ``step`` (Δ) and ``input_gate`` are the model's own, where it has them.
    ``lengths`` (``[B]``, right padding, on the CPU) says how many steps each sample covers;
    the steps past a sample's end are then left out, and ``step`` and ``input_gate`` are
    ``[B, T, *]``. The others are device tensors.
    """

    log_abs_a: Tensor
    step: Tensor | None = None
    input_gate: Tensor | None = None
    lengths: Tensor | None = None


@dataclass
class RawCapture:
    """One recurrent module call as captured: per-step statistics, exactness facts, and the
    recorded recurrence. Nothing in it is diagnosed.

    Attributes:
        name: The call's report name (``"rnn"``, ``"rnn#1"``, or a marked-state name).
        module_name: The qualified module (or mark) name without the call suffix.
        kind: The module kind (`gradwatch._base.vocabulary.Kind`, or a new family's own).
        num_layers: L.
        num_directions: D.
        stats: ``total``, ``carried``, ``direct`` and, with a cell state, ``cell_total``:
            float32 ``[L, D, T]`` per-step batch means of per-sample norms, on the device.
        valid_samples: ``[T]`` int64 on the CPU, how many samples cover each step.
        reverse: Per direction, whether it runs backwards in time.
        source: ``"replay"`` or ``"hooks"``.
        received_gradient: Whether any gradient reached the call.
        fidelity: Deviation of the replayed outputs from the real ones (device scalar, or
            0.0 where the values were observed directly).
        fidelity_tolerance: Above it the values are not exact; ``None``: not checked.
        reasons: Why the values are not exact, known without reading any value.
        recurrences: The recorded recurrence, ``None`` where the step equations are unknown.
        transition: For a diagonal linear recurrence, its transition (the propagation and
            the causes follow from it in closed form); ``recurrences`` is then ``None``.
        fidelity_reason: The reason given when ``fidelity`` exceeds its tolerance, with
            ``{fidelity}`` and ``{tolerance}`` fields; ``None``: the replay's wording.
    """

    name: str
    module_name: str
    kind: str
    num_layers: int
    num_directions: int
    stats: dict[str, Tensor]
    valid_samples: Tensor
    reverse: tuple[bool, ...]
    source: Source
    received_gradient: bool
    fidelity: Tensor | float = 0.0
    fidelity_tolerance: float | None = None
    reasons: tuple[str, ...] = ()
    recurrences: Recurrences | None = None
    transition: Transition | None = None
    fidelity_reason: str | None = None

    @property
    def device(self) -> torch.device:
        return self.stats["total"].device


def hooked_sequence(
    name: str,
    module_name: str,
    kind: str,
    measured: tuple[dict[str, Tensor], Tensor, bool],
    recurrences: Recurrences | None = None,
) -> RawCapture:
    """The raw capture of one step-wise sequence measured by hooks (a cell loop or marked
    states): one layer, one forward direction. ``measured`` is what
    `gradwatch._capture.steps.step_stats` returns: (stats, valid samples, received)."""
    stats, valid, received = measured
    return RawCapture(
        name=name,
        module_name=module_name,
        kind=kind,
        num_layers=1,
        num_directions=1,
        stats=stats,
        valid_samples=valid,
        reverse=(False,),
        source="hooks",
        received_gradient=received,
        recurrences=recurrences,
    )
