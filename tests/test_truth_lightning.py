"""Issue 12 in a real Lightning Trainer: passes that do not train, skipped batches, copies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from truth_support import gradwatch_hooks

import gradwatch

L = pytest.importorskip("lightning.pytorch")
from test_lightning import LM, _data, _trainer  # noqa: E402


class Saliency(LM):
    """Computes an input-gradient saliency map in every training step (does not train)."""

    def __init__(self, saliency: bool, skip: int | None = None) -> None:
        super().__init__("LSTM")
        self.saliency, self.skip = saliency, skip

    def training_step(self, batch, batch_idx):
        (x,) = batch
        e = self.emb(x).transpose(0, 1)
        logits = self.head(self.rnn(e)[0])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x.t().flatten())
        if self.saliency:
            torch.autograd.grad(loss, e, retain_graph=True)
        if batch_idx == self.skip:
            return None  # Lightning skips backward and the optimizer step for this batch
        return loss


def _fit(model, **kw):
    torch.manual_seed(0)
    cb = gradwatch.GradWatch(every_n_steps=1)
    _trainer(callbacks=[cb], max_steps=3, **kw).fit(model, _data())
    return cb


def test_saliency_passes_do_not_change_the_reports():
    torch.manual_seed(0)
    plain = _fit(Saliency(False))
    torch.manual_seed(0)
    with_saliency = _fit(Saliency(True))
    assert list(plain.reports) == list(with_saliency.reports) == [0, 1, 2]
    for step in plain.reports:
        a, b = plain.reports[step]["rnn"], with_saliency.reports[step]["rnn"]
        assert b.exact
        torch.testing.assert_close(a.total, b.total)


def test_a_skipped_batch_leaves_no_call_in_the_next_report():
    torch.manual_seed(0)
    cb = _fit(Saliency(False, skip=1))
    assert all(list(rep) == ["rnn"] for rep in cb.reports.values()), {
        s: list(r) for s, r in cb.reports.items()
    }


def test_an_ema_copy_made_during_fit_is_a_plain_model():
    copies = []

    class WithEMA(LM):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if not copies:
                copies.append(copy.deepcopy(self))

    torch.manual_seed(0)
    model = WithEMA("GRU")
    cb = _fit(model)
    assert copies and gradwatch_hooks(copies[0]) == 0
    assert list(cb.reports) == [0, 1, 2]
