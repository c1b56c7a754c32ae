"""Thresholds that turn measured quantities into verdicts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["Thresholds"]


@dataclass(frozen=True)
class Thresholds:
    """When a layer/direction is called vanishing or exploding.

    Attributes:
        vanishing_horizon: Vanishing when the horizon (steps until a propagated gradient
            falls below 1%) is shorter than this fraction of the sequence length the module
            is trained on. The default 0.5 means: a gradient from the end of a sequence no
            longer reaches its first half with 1% of its size, so dependencies spanning half
            the sequence are out of reach. Use a smaller value for models that only need
            short-range memory (e.g. language models trained on long windows).
        exploding_growth: Exploding when a gradient carried back over the whole sequence
            grows by more than this factor (100, the mirror image of the 1% horizon).
        min_steps: Sequences shorter than this get no vanishing/exploding verdict (there is
            no depth through time to speak of).
        patience: Consecutive reports a new verdict must persist before the verdict changes
            (hysteresis against single noisy steps; non-finite values are flagged at once).
        margin: Hysteresis band: to leave a verdict, the measurement must clear the
            threshold by this relative margin (horizon above ``(1 + margin)`` times the
            vanishing threshold; growth below ``exploding_growth ** (1 / (1 + margin))``).
    """

    vanishing_horizon: float = 0.5
    exploding_growth: float = 100.0
    min_steps: int = 4
    patience: int = 2
    margin: float = 0.25

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            value = getattr(self, name)
            raise ValueError(f"Thresholds.{name}={value!r}: {why}")

        if not (self.vanishing_horizon > 0 and math.isfinite(self.vanishing_horizon)):
            bad("vanishing_horizon", "must be a positive fraction of the sequence length")
        if not (self.exploding_growth > 1 and math.isfinite(self.exploding_growth)):
            bad("exploding_growth", "must be a finite growth factor > 1")
        if not (isinstance(self.min_steps, int) and self.min_steps >= 2):
            bad("min_steps", "must be an integer >= 2")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            bad("patience", "must be an integer >= 1")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            bad("margin", "must be a finite non-negative number")

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)
