"""A model for the 2-process DDP tests whose loss misbehaves on rank 1 only."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn


class RankLM(L.LightningModule):
    """A GRU language model whose loss is multiplied by 1e4 on rank 1 at global step
    ``spike_step`` and is NaN there at ``nan_step``; the other rank trains normally."""

    def __init__(
        self, spike_step: int = 5, nan_step: int = 6, lr: float = 0.0, momentum: float = 0.0
    ) -> None:
        super().__init__()
        self.spike_step, self.nan_step = spike_step, nan_step
        self.lr, self.momentum = lr, momentum
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.GRU(8, 16)
        self.head = nn.Linear(16, 20)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        out, _ = self.rnn(self.emb(x.t()))
        loss = nn.functional.cross_entropy(self.head(out).flatten(0, 1), x.t().flatten())
        if self.global_rank == 1 and self.global_step == self.spike_step:
            loss = loss * 1e4
        if self.global_rank == 1 and self.global_step == self.nan_step:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
