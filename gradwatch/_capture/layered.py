"""Bounded replay memory: one layer's trajectory at a time, recomputed where needed.

A replayed trajectory holds about as much as the module's own training step saved for that
layer (an LSTM keeps ~11 values per hidden unit and step). Holding every layer at once, plus
the backward walk's buffers, is what made a capture of a large module cost more memory than
the training step itself. So, past `RECOMPUTE_ABOVE` bytes per layer:

* a layer below the top keeps only its outputs in the forward replay, and is replayed again,
  from the same inputs with the same operations (so bit for bit the same), just before its
  own backward walk;
* after its walk every layer is compacted into a `LazyRecurrence`: the weights and the
  trajectory at the sampled steps the causes read; the full trajectory is recomputed only if
  something walks it again.

Small modules keep every layer (no recomputation: the cheap default).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradwatch._capture.recurrences import Recurrence
from gradwatch._capture.stats import sampled_steps

__all__ = ["RECOMPUTE_ABOVE", "LazyRecurrence", "recomputes", "trajectory_bytes"]

# Above this size of one layer's replayed trajectory (bytes, all directions), lower layers are
# replayed twice and walked layers compacted (docs/capture.md#memory).
RECOMPUTE_ABOVE = 32 * 2**20

# values the replay keeps per hidden unit and step, by mode (trajectory and coefficients)
_VALUES_PER_UNIT = {"LSTM": 11, "GRU": 6}


def trajectory_bytes(mod: nn.RNNBase, steps: int, batch: int, element_size: int) -> int:
    """About what one layer's replayed trajectory holds, all directions."""
    per_unit = _VALUES_PER_UNIT.get(mod.mode, 2)
    dirs = 2 if mod.bidirectional else 1
    return per_unit * mod.hidden_size * dirs * batch * steps * element_size


def recomputes(mod: nn.RNNBase, steps: int, batch: int, element_size: int) -> bool:
    """Whether a replay of this call holds one layer at a time (large calls only)."""
    return trajectory_bytes(mod, steps, batch, element_size) > RECOMPUTE_ABOVE


class LazyRecurrence:
    """A walked layer without its trajectory: a `gradwatch._capture.raw.Walkable` that
    answers from the weights and the sampled steps it kept, and replays the layer again
    (``rebuild``) only when asked for more (`step_back`, other steps of `trajectory`)."""

    def __init__(self, rec: Recurrence, rebuild: Callable[[], Recurrence]) -> None:
        self.reverse = rec.reverse
        self.steps = rec.steps
        self._weights_of = rec  # its trajectory is dropped below: weights only
        device = rec.weight.device
        self._sample = sampled_steps(self.steps, device) if self.steps else None
        self._sample_host = None if self._sample is None else self._sample.cpu()
        self._kept = None if self._sample is None else rec.trajectory(self._sample)
        rec.drop_trajectory()
        self._rebuild: Callable[[], Recurrence] | None = rebuild
        self._full: Recurrence | None = None

    def _recurrence(self) -> Recurrence:
        if self._full is None:
            assert self._rebuild is not None
            self._full = self._rebuild()
        return self._full

    # -- weights only ---------------------------------------------------------------------
    @property
    def state_sizes(self) -> tuple[int, ...]:
        return self._weights_of.state_sizes

    @property
    def gated(self) -> bool:
        return self._weights_of.gated

    @property
    def weight(self) -> Tensor:
        return self._weights_of.weight

    def order(self, steps: int) -> range:
        return self._weights_of.order(steps)

    def recurrent_matrix(self) -> Tensor:
        return self._weights_of.recurrent_matrix()

    def candidate_block(self) -> Tensor:
        return self._weights_of.candidate_block()

    def forget_bias(self) -> Tensor | None:
        return self._weights_of.forget_bias()

    # -- the trajectory -------------------------------------------------------------------
    def trajectory(self, steps: Tensor) -> dict[str, Tensor]:
        kept, sample = self._kept, self._sample_host
        same = kept is not None and sample is not None and steps.shape == sample.shape
        if same and torch.equal(steps.cpu(), sample):  # the sampled steps the causes read
            return dict(kept)
        return self._recurrence().trajectory(steps)

    def step_back(self, t, dh, dc, valid):
        return self._recurrence().step_back(t, dh, dc, valid)
