"""Short real training runs whose event files `gradwatch report` reads in the tests.

- ``vanishing``: a tanh ``nn.RNN`` with a small recurrent weight on 60-step sequences,
  ``GradWatch`` with a real Lightning ``Trainer`` and ``TensorBoardLogger`` (figures on).
- ``healthy``: an ``nn.LSTM`` with forget bias 3 on the same task, ``GradWatch`` with norm
  clipping at a tiny threshold (every step is clipped), a logger with a prefix.
- ``monitor``: a ``nn.GRU`` trained in a plain loop with ``Monitor`` and ``PanelWriter``
  around a ``SummaryWriter``; a scheduled capture step gets a NaN loss (a non-finite
  capture), the run recovers after it (the next scheduled capture is healthy).

Each returns the in-memory reports the monitor produced, the independent truth the tests
compare the report's reading with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch._clipping import NormClip
from gradwatch._outputs.panels import PanelWriter


class Run(NamedTuple):
    logdir: Path
    reports: dict  # {step: Report} as the monitor produced them
    clipped_steps: list[int]


SEQ_LEN = 60
STEPS = 8
EVERY = 2


def _batches(n_batches: int = STEPS, batch: int = 8, seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, SEQ_LEN, 2, generator=g)
    y = (x[:, 0, 0] > 0).long()  # the label is in the first step: long memory needed
    return list(zip(x.split(batch), y.split(batch), strict=True))


class Seq(L.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        if kind == "RNN":
            self.rnn = nn.RNN(2, 8, batch_first=True)
            with torch.no_grad():
                self.rnn.weight_hh_l0.mul_(0.2)
        else:
            self.rnn = nn.LSTM(2, 8, batch_first=True)
            with torch.no_grad():  # forget-gate biases b_if + b_hf = 3 (Jozefowicz et al.)
                self.rnn.bias_ih_l0[8:16].fill_(1.5)
                self.rnn.bias_hh_l0[8:16].fill_(1.5)
        self.head = nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.rnn(x)
        return nn.functional.cross_entropy(self.head(out[:, -1]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def lightning_run(root: Path, kind: str, *, clip: bool, prefix: str = "") -> Run:
    name = "vanishing" if kind == "RNN" else "healthy"
    logger = TensorBoardLogger(str(root), name=name, prefix=prefix)
    gw = gradwatch.GradWatch(
        every_n_steps=EVERY,
        log_every_n_steps=1,
        figures=kind == "RNN",
        clip=NormClip(max_norm=1e-6) if clip else None,
    )
    trainer = L.Trainer(
        max_steps=STEPS,
        logger=logger,
        callbacks=[gw],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
    )
    x = torch.cat([b[0] for b in _batches()])
    y = torch.cat([b[1] for b in _batches()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer.fit(Seq(kind), train_dataloaders=loader)
    clipped = [e.step for e in gw.clip_events if e.clipped]
    return Run(Path(logger.log_dir), dict(gw.reports), clipped)


def monitor_run(root: Path, nan_step: int = 2) -> Run:
    """Plain loop with Monitor + PanelWriter; the loss of step ``nan_step`` is NaN."""
    torch.manual_seed(0)
    model = nn.GRU(2, 6, batch_first=True)
    with torch.no_grad():  # update-gate biases toward keeping the state: a long memory
        model.bias_ih_l0[6:12].fill_(2.0)
        model.bias_hh_l0[6:12].fill_(2.0)
    head = nn.Linear(6, 2)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05)
    logdir = root / "monitor"
    writer = SummaryWriter(str(logdir))
    panels = PanelWriter(writer, figures=False)
    reports = {}
    with gradwatch.Monitor(model, every_n_steps=EVERY, log_every_n_steps=1) as mon:
        for step, (x, y) in enumerate(_batches(seed=1)):
            out, _ = model(x)
            loss = nn.functional.cross_entropy(head(out[:, -1]), y)
            if step == nan_step:
                loss = loss * math.nan
            opt.zero_grad()
            loss.backward()
            report = mon.step(opt)
            if report is not None:
                reports[step] = report
                panels.write(step, report)
            if step != nan_step:
                opt.step()
    writer.close()
    return Run(logdir, reports, [])


def make_runs(root: Path) -> dict[str, Run]:
    return {
        "vanishing": lightning_run(root / "lightning", "RNN", clip=False),
        "healthy": lightning_run(root / "lightning", "LSTM", clip=True, prefix="lstm"),
        "monitor": monitor_run(root / "plain"),
    }


def truncate_copy(source: Path, target: Path, keep: float = 0.6) -> Path:
    """A copy of the event files of ``source`` with the last one cut at ``keep`` of its size
    (mid-record, as a crash or a copy of a file still being written leaves it)."""
    target.mkdir(parents=True)
    files = sorted(p for p in source.iterdir() if "tfevents" in p.name)
    for f in files:
        data = f.read_bytes()
        if f == files[-1]:
            data = data[: int(len(data) * keep)]
        (target / f.name).write_bytes(data)
    return target / files[-1].name


_CACHE: dict[str, Run] = {}


def shared_runs(tmp_path_factory) -> dict[str, Run]:
    """`make_runs` once per test session (the report test modules share it)."""
    if not _CACHE:
        _CACHE.update(make_runs(tmp_path_factory.mktemp("report_runs")))
    return _CACHE
