"""The report contract: what one traced training step measured, per recurrent module call."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from gradwatch.errors import CaptureError

__all__ = ["ModuleReport", "Report"]


@dataclass(frozen=True)
class ModuleReport:
    """Per-timestep hidden-state gradients of one recurrent module call.

    Every per-step tensor is float32 on the CPU with shape ``[num_layers, num_directions, T]``
    and holds, at step ``t``, the per-sample L2 norm over hidden units averaged over the
    samples whose sequence covers ``t``. Non-finite values are kept as they are.

    Attributes:
        name: Key in the :class:`Report`: the qualified module name as in
            ``model.named_modules()``, with ``#k`` appended for the k-th extra call
            (``"encoder.rnn"``, ``"encoder.rnn#1"``, ...), or the name given to
            :func:`gradwatch.mark_state`.
        module_name: The qualified name without the call suffix.
        kind: ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ``"RNN_RELU"``, ``"LSTMCell"``,
            ``"GRUCell"``, ``"RNNCell"`` or ``"custom"``.
        total: ``dL/dh_t``, everything that reaches the hidden state ``h_t``.
        carried: The part arriving through the recurrence from the neighbouring step
            (``t+1``; ``t-1`` for the reverse direction), over the full recurrent state:
            ``sqrt(|dL/dh_t|^2 + |dL/dc_t|^2)`` of the carried parts for LSTM.
        direct: The part injected from outside the recurrence at ``t``: the layer's output
            going up to the next layer or the head, and the final-state gradient at the last
            step of each sequence.
        cell_total: LSTM only: ``dL/dc_t``, everything reaching the cell state.
        valid_samples: ``[T]`` int64, how many samples cover each step.
        exact: Whether the values are exact up to float rounding. ``False`` where the replay
            cannot reproduce the kernel (see ``approximate_reason``).
        fidelity: Largest deviation of the replayed outputs from the module's real outputs,
            relative to the largest output magnitude (0.0 when measured by hooks directly).
        approximate_reason: Why ``exact`` is ``False``; ``None`` otherwise.
        source: ``"replay"`` (fused modules) or ``"hooks"`` (cells and marked states).
        received_gradient: ``False`` when backward ran but no gradient reached this call
            (its outputs did not contribute to the loss): the values are then zeros.
    """

    name: str
    module_name: str
    kind: str
    num_layers: int
    num_directions: int
    total: Tensor
    carried: Tensor
    direct: Tensor
    cell_total: Tensor | None
    valid_samples: Tensor
    exact: bool = True
    fidelity: float = 0.0
    approximate_reason: str | None = None
    source: str = "replay"
    received_gradient: bool = True

    @property
    def steps(self) -> int:
        """Number of timesteps T (the longest sequence for variable lengths)."""
        return int(self.total.shape[-1])


@dataclass(frozen=True)
class Report(Mapping[str, ModuleReport]):
    """Read-only mapping from call name to :class:`ModuleReport`, in call order.

    ``failures`` maps a call or module name to the reason it could not be measured.
    """

    modules: dict[str, ModuleReport]
    failures: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ModuleReport:
        try:
            return self.modules[name]
        except KeyError:
            known = ", ".join(repr(k) for k in self.modules) or "none"
            reason = self.failures.get(name)
            detail = f": {reason}" if reason else ""
            raise KeyError(f"no report for {name!r}{detail} (reported: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def raise_failures(self) -> None:
        """Raise :class:`CaptureError` listing every failure, if there is any."""
        if self.failures:
            lines = "\n".join(f"  {name}: {why}" for name, why in self.failures.items())
            raise CaptureError(f"gradwatch could not measure some recurrent modules:\n{lines}")
