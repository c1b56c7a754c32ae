"""Verdict of one layer/direction from its measured quantities (pure functions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradwatch._analysis.report import NonfiniteLocation
from gradwatch._analysis.verdicts.thresholds import Thresholds
from gradwatch._base.vocabulary import Verdict

__all__ = ["classify", "first_nonfinite"]


def classify(
    horizon: float,
    log10_growth: float,
    seq_len: int,
    nonfinite: bool,
    thresholds: Thresholds,
    previous: str = "healthy",
) -> Verdict:
    """``"healthy" | "vanishing" | "exploding" | "nonfinite"`` for one layer/direction.

    ``horizon`` is in steps, ``log10_growth`` the log10 attenuation over the whole sequence,
    ``previous`` the current verdict: leaving it requires clearing the threshold by the
    hysteresis margin.
    """
    if nonfinite:
        return "nonfinite"
    if seq_len < thresholds.min_steps:
        return "healthy"
    explode_at = math.log10(thresholds.exploding_growth)
    if previous == "exploding":
        explode_at /= 1 + thresholds.margin
    if log10_growth > explode_at:
        return "exploding"
    vanish_below = thresholds.vanishing_horizon * seq_len
    if previous == "vanishing":
        vanish_below *= 1 + thresholds.margin
    if horizon < vanish_below:
        return "vanishing"
    return "healthy"


def first_nonfinite(
    module: str, per_step: list[Tensor], reverse_of: list[bool]
) -> tuple[NonfiniteLocation | None, Tensor]:
    """The first non-finite value in backward order, and the ``[L, D]`` mask of non-finite
    layers/directions.

    ``per_step`` are ``[L, D, T]`` statistics (total, carried, direct, ...); ``reverse_of[d]``
    tells whether direction ``d`` runs backwards in time. Backward visits the top layer
    first, and within a layer the last processed step first.
    """
    bad = torch.zeros_like(per_step[0], dtype=torch.bool)
    for x in per_step:
        bad |= ~torch.isfinite(x)
    mask = bad.any(-1)
    if not bool(mask.any()):
        return None, mask
    layers, dirs, steps = bad.shape
    best: tuple[int, int, int] | None = None
    for layer in reversed(range(layers)):
        for d in range(dirs):
            times = bad[layer, d].nonzero().flatten().tolist()
            if not times:
                continue
            t = min(times) if reverse_of[d] else max(times)
            order = t if reverse_of[d] else steps - 1 - t  # how far into the backward walk
            if best is None or order < best[0]:
                best = (order, d, t)
        if best is not None:
            return NonfiniteLocation(module, layer, best[1], best[2]), mask
    return None, mask
