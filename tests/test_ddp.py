"""GradWatch under DDP: 2 CPU processes (gloo, ddp_spawn). Statistics are reduced over ranks
before any decision, so every rank captures the same steps and holds the same reports and
verdicts; only rank zero speaks."""

from __future__ import annotations

import logging
import time
import warnings

import pytest
import torch

import gradwatch

L = pytest.importorskip("lightning.pytorch")
from ddp_models import RankLM  # noqa: E402


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class Probe(L.Callback):
    """Saves what this rank's GradWatch holds at the end of training."""

    def __init__(self, gw: gradwatch.GradWatch, out: str) -> None:
        self.gw, self.out = gw, out

    def setup(self, trainer, pl_module, stage):
        self.handler = _Count()  # created in the worker: handlers hold locks, not picklable
        logging.getLogger("gradwatch").addHandler(self.handler)
        warnings.simplefilter("ignore")

    def on_train_end(self, trainer, pl_module):
        logging.getLogger("gradwatch").removeHandler(self.handler)
        reports = {
            step: {n: (m.total.clone(), m.valid_samples.clone()) for n, m in rep.items()}
            for step, rep in self.gw.reports.items()
        }
        self.gw._core.flush_signals()
        signals = [s.as_dict() for s in self.gw._core.signals]
        torch.save(
            {
                "reports": reports,
                "signals": signals,
                "verdicts": self.gw.verdicts,
                "warnings": self.handler.count,
                "weights": [p.detach().clone() for p in pl_module.parameters()],
                "overhead": self.gw.overhead,
            },
            f"{self.out}/rank{trainer.global_rank}.pt",
        )
        # leave together: a rank that exits while the other still talks to it can abort in
        # gloo's teardown ("terminate called without an active exception")
        trainer.strategy.barrier()


@pytest.mark.slow
def test_ddp_spawn_reduces_before_deciding_and_only_rank_zero_warns(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(0, 20, (64, 10), generator=g)), batch_size=4
    )
    gw = gradwatch.GradWatch(every_n_steps=4, warmup_steps=2, log_every_n_steps=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=8,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[gw, Probe(gw, str(tmp_path))],
    )
    trainer.fit(RankLM(), data)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)

    # identical decisions: the spike on rank 1 only (step 5) is flagged by both ranks and
    # captured at the next step, 6, whose NaN (rank 1) is then in the capture itself
    assert list(r0["reports"]) == list(r1["reports"]) == [0, 4, 6]
    assert [s["captured"] for s in r0["signals"]][4:8] == ["scheduled", None, "spike", None]
    assert [s["spike"] for s in r0["signals"]][5] and [s["nonfinite"] for s in r0["signals"]][6]
    assert repr(r0["signals"]) == repr(r1["signals"])  # (NaN != NaN in ==)
    assert r0["verdicts"] == r1["verdicts"] == {"rnn": "nonfinite"}
    for step, rep in r0["reports"].items():
        for name, (total, valid) in rep.items():
            total1, _ = r1["reports"][step][name]
            torch.testing.assert_close(total, total1, rtol=0, atol=0, equal_nan=True)
            assert valid.tolist() == [8] * 10  # both ranks' samples merged (4 each)
    # logs and warnings from rank zero only (the non-finite verdict is announced there)
    assert r1["warnings"] == 0 and r0["warnings"] >= 1
    for a, b in zip(r0["weights"], r1["weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


class SlowRankLM(RankLM):
    """Rank 1 trains slower: the ranks measure different times."""

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1:
            time.sleep(0.003)
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_ddp_ranks_agree_on_the_budgets_schedule(tmp_path):
    """Each rank measures its own times, but captures and signal steps run collectives: the
    ranks average their measurements on logging steps and decide from the same numbers
    in between, so they capture the same steps (a mismatch would hang or fail)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(0, 20, (64, 10), generator=g)), batch_size=4
    )
    gw = gradwatch.GradWatch(overhead_budget=1.0, log_every_n_steps=5)  # frequent captures
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=30,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[gw, Probe(gw, str(tmp_path))],
    )
    trainer.fit(SlowRankLM(spike_step=10**9, nan_step=10**9), data)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert list(r0["reports"]) == list(r1["reports"])
    assert len(r0["reports"]) >= 1 and 0 not in r0["reports"]  # none before a measurement
    assert [s["step"] for s in r0["signals"]] == [s["step"] for s in r1["signals"]]
    assert r0["overhead"] == r1["overhead"]  # the agreed (averaged) accounting
