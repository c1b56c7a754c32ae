"""An out-of-memory error inside a capture skips that capture with one warning: training
goes on bit-identically and the module stays watched (the next capture works)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._capture.families import fused
from gradwatch._capture.oom import is_out_of_memory


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 16, num_layers=2)
        self.head = nn.Linear(16, 20)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 20, (10, 4), generator=g) for _ in range(n)]


def _train(model, mon=None, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in _batches(steps):
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        if mon is not None:
            mon.step(opt)
        opt.step()
        opt.zero_grad()


@pytest.fixture
def oom_on_first_replay(monkeypatch):
    """The first capture fails as an allocation would; later ones run normally."""
    real = fused.capture_call
    calls = []

    def flaky(call, *args, **kwargs):
        calls.append(call.name)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(call, *args, **kwargs)

    monkeypatch.setattr(fused, "capture_call", flaky)
    return calls


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 8 GB"), True),
        (MemoryError(), True),
        (RuntimeError("size mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_errors_are_recognised(error, expected):
    assert is_out_of_memory(error) is expected


def test_monitor_skips_a_capture_that_runs_out_of_memory(oom_on_first_replay):
    torch.manual_seed(0)
    model = LM()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.Monitor(model, every_n_steps=1) as mon:
            _train(model, mon)
    messages = [str(w.message) for w in caught]
    _train(twin)
    assert len(oom_on_first_replay) == 4  # a replay was tried at every step
    skipped = [m for m in messages if "skipped the capture" in m]
    assert len(skipped) == 1 and "'rnn'" in skipped[0] and "out of memory" in skipped[0]
    assert not any("stopped watching" in m for m in messages)
    assert list(mon.reports) == [1, 2, 3]  # step 0 skipped, the module still watched
    assert mon.reports[3]["rnn"].exact and not mon._core.disabled
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_plain_trace_lists_the_skipped_call_as_a_failure(oom_on_first_replay):
    model = LM()
    with gradwatch.trace(model) as tr:
        x = _batches(1)[0]
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    rep = tr.report(strict=False)
    assert "rnn" not in rep.modules and "out of memory" in rep.failures["rnn"]


def test_lightning_skips_a_capture_that_runs_out_of_memory(oom_on_first_replay):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lm = LM()

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return nn.functional.cross_entropy(self.lm(x.t()).flatten(0, 1), x.t().flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.stack(_batches(8)).flatten(0, 1)[:16])
    cb = gradwatch.GradWatch(every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[cb],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    texts = [str(w.message) for w in caught]
    assert trainer.global_step == 4
    assert sum("skipped the capture" in t for t in texts) == 1
    assert not any("stopped watching" in t for t in texts)
    assert sorted(cb.reports) == [1, 2, 3] and "lm.rnn" in cb.reports[3].modules
