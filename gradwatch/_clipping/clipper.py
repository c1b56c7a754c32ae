"""The framework-free clipper: a strategy, a mode, a non-finite policy and a step counter.

It sees exactly the gradients it is given. The caller passes gradients that are already
unscaled (AMP) and, under DDP, already all-reduced: every rank then computes the same total
norm bit for bit and takes the same decision, with no communication here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from gradwatch._clipping import functional as F
from gradwatch._clipping.strategies import ClipStrategy, resolve_strategy

__all__ = ["ClipEvent", "Clipper"]

Scope = Literal["all", "recurrent"]
Mode = Literal["always", "reactive"]
Nonfinite = Literal["skip", "zero", "leave"]

_SCOPES = ("all", "recurrent")
_MODES = ("always", "reactive")
_NONFINITE = ("skip", "zero", "leave")
_STATE_FORMAT = 1


@dataclass
class ClipEvent:
    """What one `Clipper.clip` call did, for logs and for the caller's step decision.

    ``reason`` is ``"always"``, ``"reactive: exploding"`` or, for a non-finite total norm,
    ``"nonfinite: skip"`` / ``"nonfinite: zero"`` / ``"nonfinite: leave"`` (the policy applied).
    ``threshold`` is the strategy's threshold for this step: a norm for norm-based strategies,
    the entry bound for ``"value"``, the ratio λ for ``"agc"``; ``None`` when the norm was not
    finite. ``coefficient`` is the post-clip over the pre-clip total norm (1.0: untouched,
    0.0: zeroed). ``skip_step`` tells the caller not to call ``optimizer.step()``.
    """

    step: int
    strategy: str
    total_norm: float
    threshold: float | None
    coefficient: float
    reason: str
    clipped: bool
    skip_step: bool = False
    warmup: bool = False


def _check(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        options = ", ".join(repr(v) for v in valid)
        raise ValueError(f"{what} must be one of {options}, got {value!r}")


class Clipper:
    """Applies a clipping strategy to the gradients it is given, step after step.

    Args:
        strategy: ``"norm"``, ``"value"``, ``"autoclip"``, ``"zscore"``, ``"agc"`` (published
            defaults) or a configured `ClipStrategy`. One instance per Clipper: the
            strategy holds the adaptive state.
        scope: which parameters the caller should pass: ``"all"`` or only those of the
            recurrent modules (``"recurrent"``). The Clipper does not select them itself.
        mode: ``"always"`` clips every step; ``"reactive"`` clips only when the caller says the
            gradients are exploding. Adaptive strategies observe every finite step in both
            modes, so their threshold is ready when a reactive clip is needed.
        nonfinite: what to do when the total norm is ``nan``/``inf``: ``"skip"`` leaves the
            gradients as they are and asks the caller to skip the optimizer step,
            ``"zero"`` zeroes them (the optimizer may still move parameters through momentum or
            weight decay), ``"leave"`` does nothing. All three return an event.
    """

    def __init__(
        self,
        strategy: str | ClipStrategy,
        *,
        scope: Scope = "all",
        mode: Mode = "always",
        nonfinite: Nonfinite = "skip",
    ) -> None:
        _check(scope, _SCOPES, "scope")
        _check(mode, _MODES, "mode")
        _check(nonfinite, _NONFINITE, "nonfinite")
        self.strategy = resolve_strategy(strategy)
        self.scope = scope
        self.mode = mode
        self.nonfinite = nonfinite
        self.step = 0

    def clip(self, parameters: Iterable[Tensor], *, exploding: bool = False) -> ClipEvent | None:
        """Clip the gradients of ``parameters`` in place and say what was done.

        Call it after gradients are unscaled and reduced across ranks, before
        ``optimizer.step()``. Returns ``None`` when there is nothing to report: no parameter has
        a gradient, or ``mode="reactive"`` and ``exploding`` is false with a finite norm.
        A non-finite norm always yields an event, whatever the mode.
        """
        step = self.step
        self.step += 1
        params = [p for p in parameters if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        strategy = self.strategy
        total = F.total_norm(grads, strategy.norm_type)
        if not math.isfinite(total):
            return self._nonfinite(step, total, grads)
        warmup = strategy.warming_up
        threshold = strategy.observe(total)
        if self.mode == "reactive" and not exploding:
            return None
        clipped, coefficient = strategy.apply_(params, grads, total, threshold)
        return ClipEvent(
            step=step,
            strategy=strategy.name,
            total_norm=total,
            threshold=threshold,
            coefficient=coefficient,
            reason="always" if self.mode == "always" else "reactive: exploding",
            clipped=clipped,
            warmup=warmup,
        )

    def _nonfinite(self, step: int, total: float, grads: list[Tensor]) -> ClipEvent:
        if self.nonfinite == "zero":
            F.zero_(grads)
        return ClipEvent(
            step=step,
            strategy=self.strategy.name,
            total_norm=total,
            threshold=None,
            coefficient=0.0 if self.nonfinite == "zero" else 1.0,
            reason=f"nonfinite: {self.nonfinite}",
            clipped=self.nonfinite == "zero",
            skip_step=self.nonfinite == "skip",
            warmup=self.strategy.warming_up,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only: ``torch.load(weights_only=True)`` restores it."""
        return {
            "format": _STATE_FORMAT,
            "strategy": self.strategy.name,
            "step": self.step,
            "strategy_state": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved Clipper stopped (same strategy configuration)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown clipping state format {state.get('format')!r}")
        if state["strategy"] != self.strategy.name:
            raise ValueError(
                f"the saved clipping state is for strategy {state['strategy']!r}, "
                f"this Clipper uses {self.strategy.name!r}"
            )
        self.step = int(state["step"])
        self.strategy.load_state_dict(state["strategy_state"])

    def __repr__(self) -> str:
        return (
            f"Clipper({self.strategy!r}, scope={self.scope!r}, mode={self.mode!r}, "
            f"nonfinite={self.nonfinite!r})"
        )
