"""Clipping strategies: each decides a threshold from the total gradient norm and its own state.

A strategy is used in two steps, so that reactive clipping can keep adaptive statistics current
on steps where nothing is clipped:

1. `ClipStrategy.observe` takes the finite pre-clip total norm of one step, updates the
   strategy's state and returns the threshold in force for that step;
2. `ClipStrategy.apply_` clips the gradients in place against that threshold.

Non-finite norms never reach a strategy (the `Clipper`
handles them), so no state is ever updated with ``nan`` or ``inf``. Defaults are the published
ones; see ``docs/clipping.md`` for the reasons and for what enters the adaptive histories.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, get_args

from torch import Tensor

from gradwatch._clipping import functional as F

__all__ = [
    "AGC",
    "STRATEGY_NAMES",
    "AutoClip",
    "ClipStrategy",
    "NormClip",
    "StrategyName",
    "ValueClip",
    "ZScoreClip",
    "resolve_strategy",
]

#: The strategy names `resolve_strategy` accepts (each with its published defaults).
StrategyName = Literal["norm", "value", "autoclip", "zscore", "agc"]


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not (value > 0) or math.isnan(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


class ClipStrategy(ABC):
    """Base class: a threshold rule plus the in-place operation that enforces it."""

    name: ClassVar[str]
    #: The norm the Clipper computes once per step and hands to `observe`.
    norm_type: float = 2.0

    @property
    def warming_up(self) -> bool:
        """Whether the next `observe` falls in the warm-up period (adaptive strategies)."""
        return False

    @abstractmethod
    def observe(self, total_norm: float) -> float:
        """Record this step's finite pre-clip total norm; return the threshold for this step."""

    def apply_(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        total_norm: float,
        threshold: float,
    ) -> tuple[bool, float]:
        """Clip ``grads`` in place; return (clipped, post-clip norm / pre-clip norm).

        The default is norm clipping (Pascanu et al. 2013) of the total norm to ``threshold``.
        """
        coefficient = F.norm_clip_coefficient(total_norm, threshold)
        if coefficient < 1.0:
            F.scale_(grads, coefficient)
        return coefficient < 1.0, coefficient

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only, so that ``torch.load(weights_only=True)`` accepts them."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; stateless strategies accept ``{}``."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def _config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


class NormClip(ClipStrategy):
    """Rescale the whole gradient to norm ``max_norm`` when it is larger (Pascanu et al. 2013).

    ``max_norm=1.0`` is the threshold Pascanu, Mikolov & Bengio ("On the difficulty of training
    recurrent neural networks", ICML 2013, §4) used on their synthetic RNN tasks; they advise
    0.5-10 times the average norm seen over many updates.
    """

    name = "norm"

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        _positive("max_norm", max_norm)
        _positive("norm_type", norm_type)
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def observe(self, total_norm: float) -> float:
        return self.max_norm

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}


class ValueClip(ClipStrategy):
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` (Mikolov 2012).

    Changes the gradient's direction, unlike norm clipping. ``clip_value=1.0`` is what the
    unitary-RNN baselines (Arjovsky, Shah & Bengio, ICML 2016) used for LSTM, tanh-RNN and IRNN.
    """

    name = "value"

    def __init__(self, clip_value: float = 1.0) -> None:
        _positive("clip_value", clip_value)
        self.clip_value = float(clip_value)

    def observe(self, total_norm: float) -> float:
        return self.clip_value

    def _config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    def apply_(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        total_norm: float,
        threshold: float,
    ) -> tuple[bool, float]:
        if F.total_norm(grads, math.inf) <= threshold:
            return False, 1.0
        F.clamp_(grads, threshold)
        return True, F.total_norm(grads, self.norm_type) / total_norm


class AGC(ClipStrategy):
    """Unit-wise adaptive gradient clipping (Brock, De, Smith & Simonyan, ICML 2021, §4).

    Each unit's gradient is capped at ``clipping`` times its weight's norm,
    ``‖G_i‖ <= clipping · max(‖W_i‖, eps)``: a step may change a unit by at most a fixed
    fraction of its size, whatever the scale of the loss. Defaults ``clipping=0.01``,
    ``eps=1e-3`` are the paper's (λ = 0.01 for batch sizes 1024-4096; smaller batches tolerate a
    larger λ). The paper leaves the final classifier layer unclipped: pass only the parameters
    to clip (``scope="recurrent"`` does so for the recurrent modules).
    """

    name = "agc"

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        _positive("clipping", clipping)
        _positive("eps", eps)
        self.clipping = float(clipping)
        self.eps = float(eps)

    def observe(self, total_norm: float) -> float:
        return self.clipping  # a ratio, not a norm

    def apply_(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        total_norm: float,
        threshold: float,
    ) -> tuple[bool, float]:
        if not F.agc_(parameters, threshold, self.eps):
            return False, 1.0
        return True, F.total_norm(grads, self.norm_type) / total_norm

    def _config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps}


class AutoClip(ClipStrategy):
    """Norm clipping to the ``percentile``-th percentile of recent total norms.

    Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive gradient clipping for source
    separation networks" (MLSP 2020): the threshold at step t is the p-th percentile of the
    norms observed so far, the current one included; p = 10 is their "set and forget" value
    (about 90% of steps are clipped). Three additions keep the threshold from being poisoned
    by the spikes it is there to clip (see ``docs/clipping.md``):

    - ``history``: only the last ``history`` norms count (the paper keeps all of them);
    - ``spike_cap``: a norm enters the history capped at ``spike_cap`` times the threshold in
      force. At p = 10 this changes nothing while fewer than ~90% of the window are above the
      threshold, but a lasting explosion can raise the threshold at most ``spike_cap``-fold per
      turnover of the window instead of adopting 1e20 norms;
    - ``warmup``: the first ``warmup`` steps are norm-clipped at ``warmup_max_norm`` while the
      history fills, instead of trusting a percentile of a handful of norms (the first step
      would otherwise never be clipped). ``warmup_max_norm=None`` and ``spike_cap=None`` give
      the paper's rule.
    """

    name = "autoclip"

    def __init__(
        self,
        percentile: float = 10.0,
        history: int = 1000,
        warmup: int = 25,
        warmup_max_norm: float | None = 1.0,
        spike_cap: float | None = 10.0,
    ) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must lie in [0, 100], got {percentile!r}")
        if int(history) != history or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
        _positive("warmup_max_norm", warmup_max_norm, allow_none=True)
        if spike_cap is not None and not spike_cap >= 1.0:
            raise ValueError(f"spike_cap must be at least 1 (or None), got {spike_cap!r}")
        self.percentile = float(percentile)
        self.history = int(history)
        self.warmup = int(warmup)
        self.warmup_max_norm = None if warmup_max_norm is None else float(warmup_max_norm)
        self.spike_cap = None if spike_cap is None else float(spike_cap)
        self._norms: deque[float] = deque(maxlen=self.history)
        self._observed = 0
        self._threshold: float | None = self._initial_threshold()

    def _initial_threshold(self) -> float | None:
        return self.warmup_max_norm if self.warmup > 0 else None

    @property
    def warming_up(self) -> bool:
        return self._observed < self.warmup

    @property
    def norms(self) -> list[float]:
        """The history the percentile is taken over, oldest first (capped norms)."""
        return list(self._norms)

    def observe(self, total_norm: float) -> float:
        admitted = total_norm
        if self.spike_cap is not None and self._threshold is not None:
            admitted = min(total_norm, self.spike_cap * self._threshold)
        warming_up = self.warming_up
        self._norms.append(admitted)
        self._observed += 1
        if warming_up and self.warmup_max_norm is not None:
            threshold = self.warmup_max_norm
        else:
            threshold = F.percentile(self._norms, self.percentile)
        self._threshold = threshold
        return threshold

    def state_dict(self) -> dict[str, Any]:
        return {
            "norms": list(self._norms),
            "observed": self._observed,
            "threshold": self._threshold,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._norms = deque((float(x) for x in state["norms"]), maxlen=self.history)
        self._observed = int(state["observed"])
        t = state["threshold"]
        self._threshold = None if t is None else float(t)

    def _config(self) -> dict[str, Any]:
        return {
            "percentile": self.percentile,
            "history": self.history,
            "warmup": self.warmup,
            "warmup_max_norm": self.warmup_max_norm,
            "spike_cap": self.spike_cap,
        }


class ZScoreClip(ClipStrategy):
    """Clip norms that are outliers against an EMA of mean and variance, in the style of ZClip.

    Kumar, Owen, Roy Chowdhury & Güra, "ZClip: Adaptive spike mitigation for LLM pre-training"
    (2025), "zscore" mode with "adaptive_scaling": with EMA mean μ and standard deviation σ of
    past norms, z = (‖g‖ - μ) / (σ + eps). If z > ``z_threshold`` the gradient is rescaled to
    μ + z_threshold² σ / z (the larger the spike, the closer to μ). Then the EMAs take the
    *clipped* norm: μ ← αμ + (1-α)ĝ, σ² ← ασ² + (1-α)(ĝ - μ)², with the updated μ, as in ZClip.
    Defaults α = 0.97, z_threshold = 2.5, 25 warm-up steps, eps = 1e-6 are ZClip's.

    During warm-up μ and σ² are the mean and variance of the first ``warmup_steps`` norms, and
    the step is norm-clipped at ``warmup_max_norm``. Unlike ZClip, the warm-up records the
    *clipped* norm too: ZClip averages raw warm-up norms, so a network that explodes from the
    first step would start with μ ≈ 1e20. ``max_norm`` is ZClip's ``max_grad_norm``, a hard cap
    on every step; it defaults to ``None`` here (ZClip: 1.0, which turns it into fixed norm
    clipping at 1.0 plus the z-score rule).
    """

    name = "zscore"

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        warmup_max_norm: float | None = 1.0,
        max_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
        _positive("z_threshold", z_threshold)
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive integer, got {warmup_steps!r}")
        _positive("warmup_max_norm", warmup_max_norm, allow_none=True)
        _positive("max_norm", max_norm, allow_none=True)
        _positive("eps", eps)
        self.alpha = float(alpha)
        self.z_threshold = float(z_threshold)
        self.warmup_steps = int(warmup_steps)
        self.warmup_max_norm = None if warmup_max_norm is None else float(warmup_max_norm)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.eps = float(eps)
        self._warmup_norms: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    @property
    def warming_up(self) -> bool:
        return self.mean is None

    def observe(self, total_norm: float) -> float:
        if self.mean is None or self.var is None:
            return self._observe_warmup(total_norm)
        std = math.sqrt(self.var)
        z = (total_norm - self.mean) / (std + self.eps)
        if z > self.z_threshold:
            threshold = self.mean + self.z_threshold**2 * std / z
            recorded = threshold  # below total_norm whenever z > z_threshold
        else:
            threshold = self.mean + self.z_threshold * (std + self.eps)  # the trigger level
            recorded = total_norm
        self.mean = self.alpha * self.mean + (1.0 - self.alpha) * recorded
        self.var = self.alpha * self.var + (1.0 - self.alpha) * (recorded - self.mean) ** 2
        return threshold if self.max_norm is None else min(threshold, self.max_norm)

    def _observe_warmup(self, total_norm: float) -> float:
        cap = math.inf if self.warmup_max_norm is None else self.warmup_max_norm
        self._warmup_norms.append(min(total_norm, cap))
        if len(self._warmup_norms) >= self.warmup_steps:
            n = len(self._warmup_norms)
            mean = sum(self._warmup_norms) / n
            self.var = sum((x - mean) ** 2 for x in self._warmup_norms) / n
            self.mean = mean
            self._warmup_norms = []
        return cap if self.max_norm is None else min(cap, self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_norms": list(self._warmup_norms), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warmup_norms = [float(x) for x in state["warmup_norms"]]
        self.mean = None if state["mean"] is None else float(state["mean"])
        self.var = None if state["var"] is None else float(state["var"])

    def _config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "warmup_steps": self.warmup_steps,
            "warmup_max_norm": self.warmup_max_norm,
            "max_norm": self.max_norm,
            "eps": self.eps,
        }


_BY_NAME: dict[str, type[ClipStrategy]] = {
    cls.name: cls for cls in (NormClip, ValueClip, AutoClip, ZScoreClip, AGC)
}
STRATEGY_NAMES: tuple[StrategyName, ...] = get_args(StrategyName)
assert set(STRATEGY_NAMES) == set(_BY_NAME), "StrategyName and the strategy classes differ"


def resolve_strategy(spec: str | ClipStrategy) -> ClipStrategy:
    """A strategy from its name (with its published defaults) or a configured instance."""
    if isinstance(spec, ClipStrategy):
        return spec
    if isinstance(spec, str) and spec in _BY_NAME:
        return _BY_NAME[spec]()
    valid = ", ".join(repr(n) for n in STRATEGY_NAMES)
    hint = ""
    if isinstance(spec, type) and issubclass(spec, ClipStrategy):
        hint = f"; pass an instance, {spec.__name__}(), not the class"
    raise ValueError(
        f"unknown clipping strategy {spec!r}: use one of {valid}, or a configured strategy "
        f"such as AutoClip(percentile=5){hint}"
    )
