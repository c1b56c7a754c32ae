"""The report contract: what one traced training step measured, per recurrent module call."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from gradwatch._base.errors import CaptureError
from gradwatch._base.vocabulary import VERDICTS, Verdict

__all__ = [
    "VERDICTS",
    "Causes",
    "Explanation",
    "ModuleReport",
    "NonfiniteLocation",
    "Report",
    "covered_length",
]


def covered_length(valid_samples: Tensor) -> int:
    """The longest sequence length of a call: the last step some sample covers, plus one."""
    covered = (valid_samples > 0).nonzero()
    return int(covered.max()) + 1 if covered.numel() else 0


@dataclass(frozen=True)
class Causes:
    """The per-step factor's ingredients, per layer and direction (float32 ``[L, D]``).

    Attributes:
        weight_norm: Spectral norm ``||W_hh||_2`` of the recurrent weight (for an LSTM with
            ``proj_size``, of ``W_hh @ W_hr``).
        weight_radius: Spectral radius of the square recurrent map: ``W_hh`` for ``nn.RNN``;
            the candidate block (``g`` for LSTM, ``n`` for GRU) for gated cells.
        pascanu_bound: ``gamma * ||W_hh||_2`` (gamma = 1 for tanh and relu): no step can
            multiply the gradient by more (Pascanu et al., 2013). NaN for gated cells.
        act_derivative: Mean derivative of the state nonlinearity along the trajectory
            (tanh: ``1 - h^2``; relu: fraction active; gated cells: the candidate's tanh).
        saturation: Fraction of saturated units: tanh derivative below 0.1, relu inactive.
        gate_mean: Mean gate values, by gate name (``"forget"``, ``"input"``, ``"output"`` for
            LSTM; ``"update"``, ``"reset"`` for GRU); empty for ``nn.RNN``.
        gate_saturation: Fraction of gate values outside ``[0.1, 0.9]``, by gate name.
        forget_bias: LSTM only: mean effective forget bias ``b_if + b_hf``.
        sampled_steps: How many timesteps the trajectory statistics were computed on.
        transition: Diagonal linear recurrences (kind ``"scan"``) only: the repeated factor
            ``|a_t|`` over batch, time and state: ``"mean"``, ``"spread"`` (standard
            deviation), ``"near_zero"`` (fraction below 0.1), ``"near_one"`` (above 0.99),
            ``"above_one"`` (above 1), and where the model has them ``"step_size"`` (mean Δ)
            and ``"input_gate"`` (mean input gate). The weight and activation fields are NaN
            for this family: its factor has no weight matrix and no nonlinearity.
    """

    weight_norm: Tensor
    weight_radius: Tensor
    pascanu_bound: Tensor
    act_derivative: Tensor
    saturation: Tensor
    gate_mean: dict[str, Tensor] = field(default_factory=dict)
    gate_saturation: dict[str, Tensor] = field(default_factory=dict)
    forget_bias: Tensor | None = None
    sampled_steps: int = 0
    transition: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class NonfiniteLocation:
    """Where the first non-finite gradient appeared, in backward order."""

    module: str
    layer: int
    direction: int
    timestep: int

    def __str__(self) -> str:
        return (
            f"{self.module} layer {self.layer} direction {self.direction} timestep {self.timestep}"
        )


@dataclass(frozen=True)
class Explanation:
    """The verdict of one module call with its dominant cause, as data and in plain words.

    Attributes:
        verdict: The verdict explained.
        cause: A stable key (`gradwatch._base.vocabulary.Cause`: ``"small_recurrent_weight"``,
            ``"saturated_activation"``, ``"forget_gate"``, ``"large_recurrent_weight"``,
            ``"nonfinite"``, ``"none"``, ...) for code.
        text: The whole sentence for people: place, measurements and cause.
        layer: Where the verdict was measured (``None``: nowhere in particular).
        direction: Where the verdict was measured.
        remedies: Concrete things to try, from the one remedies table, for the module's kind.
        reason: The cause alone, in words (empty where there is none).
        values: The numbers the reason states, by name (``"forget_gate"``, ``"weight_norm"``...).
    """

    verdict: str
    cause: str
    text: str
    layer: int | None = None
    direction: int | None = None
    remedies: tuple[str, ...] = ()
    reason: str = ""
    values: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ModuleReport:
    """Per-timestep hidden-state gradients of one recurrent module call.

    Every per-step tensor is float32 on the CPU with shape ``[num_layers, num_directions, T]``
    and holds, at step ``t``, the per-sample L2 norm over hidden units averaged over the
    samples whose sequence covers ``t``. Non-finite values are kept as they are.

    Attributes:
        name: Key in the `Report`: the qualified module name as in
            ``model.named_modules()``, with ``#k`` appended for the k-th extra call
            (``"encoder.rnn"``, ``"encoder.rnn#1"``, ...), or the name given to
            `gradwatch.mark_state`.
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
        seq_len: The longest valid sequence length of the call (the T it trained on).
        propagation: ``[L, D, T]`` log10 of the attenuation ``a(k)`` of a unit cotangent
            injected on the full state at each sequence's last step and carried back ``k``
            steps through the recurrence only (``a(0) = 1``); NaN where no sample reaches k.
        gain: ``[L, D]`` per-step factor: geometric-mean slope of ``a(k)``.
        horizon: ``[L, D]`` steps until ``a(k)`` falls below 1% (``inf``: never).
        efold: ``[L, D]`` steps for a factor ``e`` of decay or growth, ``1 / |ln gain|``.
        log10_attenuation: ``[L, D]`` log10 ``a`` over each whole sequence.
        actual_gain: ``[L, D]`` loss-weighted view: geometric mean over steps of
            ``carried[t] / total[t+1]`` (the actual gradient's per-step factor).
        causes: The ingredients of the per-step factor, see `Causes`.
        verdicts: ``[L][D]`` verdicts (see `gradwatch._base.vocabulary.Verdict`).
        verdict: The worst of ``verdicts``.
        nonfinite_at: Where the first non-finite gradient appeared in backward order.
        explanation: The verdict's dominant cause, see `Explanation`.
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
    # -- diagnostics (see docs/diagnostics.md); None where they could not be computed --
    seq_len: int = 0
    propagation: Tensor | None = None
    gain: Tensor | None = None
    horizon: Tensor | None = None
    efold: Tensor | None = None
    log10_attenuation: Tensor | None = None
    actual_gain: Tensor | None = None
    causes: Causes | None = None
    verdicts: tuple[tuple[Verdict, ...], ...] = ()
    verdict: Verdict = "healthy"
    nonfinite_at: NonfiniteLocation | None = None
    explanation: Explanation | None = None

    def explain(self) -> str:
        """Human-readable verdict and its dominant cause."""
        if self.explanation is None:
            return f"{self.name}: {self.verdict} (no diagnostics available)"
        return self.explanation.text

    @property
    def steps(self) -> int:
        """Number of timesteps T (the longest sequence for variable lengths)."""
        return int(self.total.shape[-1])


@dataclass(frozen=True)
class Report(Mapping[str, ModuleReport]):
    """Read-only mapping from call name to `ModuleReport`, in call order.

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

    @property
    def first_nonfinite(self) -> NonfiniteLocation | None:
        """Where the first non-finite gradient appeared in backward order over all calls.

        Backward visits calls in reverse order of the forward pass (a later call feeds the
        loss through the earlier ones), so the latest call with a non-finite value is where
        it entered; within a call, see `ModuleReport.nonfinite_at`.
        """
        for m in reversed(list(self.modules.values())):
            if m.nonfinite_at is not None:
                return m.nonfinite_at
        return None

    def raise_failures(self) -> None:
        """Raise `CaptureError` listing every failure, if there is any."""
        if self.failures:
            lines = "\n".join(f"  {name}: {why}" for name, why in self.failures.items())
            raise CaptureError(f"gradwatch could not measure some recurrent modules:\n{lines}")
