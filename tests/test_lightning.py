"""GradWatch in real Lightning Trainers (both namespaces): schedule, accumulation, manual
optimization, AMP, checkpoints, safety."""

from __future__ import annotations

import copy
import gc
import importlib
import logging
import pickle
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._capture import recorder as tracing
from gradwatch._capture.families import fused as fused_family

L = pytest.importorskip("lightning.pytorch")


def _data(n=32, t=10, seed=0, batch_size=4):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randint(0, 20, (n, t), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def _make_module(pl):
    """A tiny language model for the namespace ``pl``; its RNN is built in configure_model."""

    class LM(pl.LightningModule):
        def __init__(self, kind: str = "LSTM", lr: float = 0.1, fused_opt: bool = False) -> None:
            super().__init__()
            self.kind, self.lr, self.fused_opt = kind, lr, fused_opt
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(16, 20)
            self.hooks_in_validation: list[int] = []

        def configure_model(self) -> None:
            if hasattr(self, "rnn"):
                return
            if self.kind == "cell":
                self.rnn = nn.LSTMCell(8, 16)
            else:
                self.rnn = getattr(nn, self.kind)(8, 16, num_layers=2)

        def forward(self, x):
            e = self.emb(x).transpose(0, 1)  # [T, B, 8]
            if self.kind == "cell":
                h = c = torch.zeros(e.shape[1], 16, dtype=e.dtype, device=e.device)
                outs = []
                for t in range(e.shape[0]):
                    h, c = self.rnn(e[t], (h, c))
                    outs.append(h)
                out = torch.stack(outs)
            else:
                out, _ = self.rnn(e)
            return self.head(out)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return nn.functional.cross_entropy(self(x).flatten(0, 1).float(), x.t().flatten())

        def validation_step(self, batch, batch_idx):
            self.hooks_in_validation.append(len(self.rnn._forward_hooks))
            self(batch[0])

        def configure_optimizers(self):
            if self.fused_opt:
                return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return LM


LM = _make_module(L)


def _trainer(pl=L, **kw):
    args = dict(
        max_steps=6,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        deterministic=True,
    )
    args.update(kw)
    return pl.Trainer(**args)


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_works_in_both_lightning_namespaces(namespace):
    pl = importlib.import_module(namespace)
    assert isinstance(gradwatch.GradWatch(), pl.Callback)
    module_cls = LM if namespace == "lightning.pytorch" else _make_module(pl)
    cb = gradwatch.GradWatch(every_n_steps=2)
    trainer = _trainer(pl, callbacks=cb)  # a single callback, not in a list: isinstance check
    trainer.fit(module_cls(), _data())
    assert list(cb.reports) == [0, 2, 4]
    assert cb.names == ["rnn"]  # created lazily in configure_model, found at train start
    assert cb.verdicts.keys() == {"rnn"}
    assert cb.reports[4]["rnn"].total.shape == (2, 1, 10)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "cell"])
def test_trained_weights_are_bit_identical_with_the_callback(kind):
    def run(callbacks):
        torch.manual_seed(0)
        model = LM(kind)
        _trainer(callbacks=callbacks, max_steps=5).fit(model, _data())
        return model

    watched = run([gradwatch.GradWatch(every_n_steps=2)])
    plain = run([])
    for (name, p), q in zip(watched.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_accumulation_gives_one_report_per_optimizer_step_merging_micro_batches():
    """accumulate_grad_batches=2 with batches of 4 must report what one batch of 8 reports:
    Lightning divides each micro-batch loss by 2, so per-sample gradients are equal."""
    torch.manual_seed(0)
    model = LM("GRU")
    model.configure_model()  # the same recurrent weights in both runs
    twin = copy.deepcopy(model)
    acc = gradwatch.GradWatch(every_n_steps=1)
    _trainer(callbacks=[acc], max_steps=2, accumulate_grad_batches=2).fit(model, _data())
    big = gradwatch.GradWatch(every_n_steps=1)
    _trainer(callbacks=[big], max_steps=2).fit(twin, _data(batch_size=8))
    assert list(acc.reports) == [0, 1]
    a, b = acc.reports[0]["rnn"], big.reports[0]["rnn"]
    assert a.valid_samples.tolist() == [8] * 10
    for f in ("total", "carried", "direct"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-4, atol=1e-9)
    assert acc.signals[0].grad_norm["rnn"] == pytest.approx(big.signals[0].grad_norm["rnn"], 1e-4)


class TBPTT(L.LightningModule):
    """Manual optimization, truncated BPTT: three chunks per batch, each backward + step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.rnn = nn.LSTM(3, 8)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt = self.optimizers()
        state = None
        for chunk in x.transpose(0, 1).split(4):
            out, state = self.rnn(chunk, state)
            loss = self.head(out).pow(2).mean()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            state = tuple(s.detach() for s in state)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_manual_optimization_truncated_bptt_reports_every_optimizer_step():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 12, 3, generator=g)), batch_size=4
    )
    cb = gradwatch.GradWatch(every_n_steps=1)
    _trainer(callbacks=[cb], max_steps=6).fit(TBPTT(), data)
    assert list(cb.reports) == list(range(6))  # 2 batches x 3 chunks
    for rep in cb.reports.values():
        assert list(rep) == ["rnn"] and rep["rnn"].steps == 4  # one chunk each


class GAN(L.LightningModule):
    """Two optimizers, each owning one recurrent module."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.GRU(3, 3)
        self.disc = nn.LSTM(3, 4)
        self.head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        fake, _ = self.gen(x)
        out, _ = self.disc(fake)
        opt_g.zero_grad()
        self.manual_backward(-self.head(out).mean())
        opt_g.step()
        out_real, _ = self.disc(x)
        out_fake, _ = self.disc(fake.detach())
        opt_d.zero_grad()
        self.manual_backward(self.head(out_fake).mean() - self.head(out_real).mean())
        opt_d.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.gen.parameters(), lr=0.01),
            torch.optim.SGD([*self.disc.parameters(), *self.head.parameters()], lr=0.01),
        )


def test_several_optimizers_each_step_is_reported_with_its_own_parameters():
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 5, 3)), batch_size=4
    )
    cb = gradwatch.GradWatch(every_n_steps=1, log_every_n_steps=1)
    _trainer(callbacks=[cb], max_steps=4).fit(GAN(), data)
    assert list(cb.reports) == [0, 1, 2, 3]
    steps = {s.step: s for s in cb.signals}
    assert set(steps[0].grad_norm) == {"gen"} and set(steps[1].grad_norm) == {"disc"}
    assert list(cb.reports[0]) == ["gen", "disc"]  # generator step: both calls
    assert list(cb.reports[1]) == ["disc", "disc#1"]  # discriminator step: real, fake


def test_validation_is_not_hooked_and_hooks_are_gone_after_fit():
    model = LM("LSTM")
    cb = gradwatch.GradWatch(every_n_steps=2)
    trainer = _trainer(callbacks=[cb], limit_val_batches=2, val_check_interval=3)
    trainer.fit(model, _data(), _data())
    assert model.hooks_in_validation and set(model.hooks_in_validation) == {0}
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    gc.collect()  # recorders of monitors other tests dropped unclosed go with them
    assert not tracing.active_recorders()
    # standalone validation never hooks anything either
    model.hooks_in_validation.clear()
    trainer.validate(model, _data(), verbose=False)
    assert set(model.hooks_in_validation) == {0}


def test_internal_error_disables_one_module_and_training_continues(monkeypatch):
    real = fused_family.capture_call

    def failing(call, *args, **kwargs):
        if call.module_name == "rnn":
            raise RuntimeError("injected failure")
        return real(call, *args, **kwargs)

    monkeypatch.setattr(fused_family, "capture_call", failing)
    model = LM("GRU")
    cb = gradwatch.GradWatch(every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="stopped watching 'rnn'.*injected failure") as rec:
        trainer = _trainer(callbacks=[cb])
        trainer.fit(model, _data())
    assert trainer.global_step == 6
    assert sum("injected failure" in str(w.message) for w in rec) == 1
    assert "rnn" in cb._core.disabled and not model.rnn._forward_hooks
    assert list(cb.reports) == [0]  # the failing step's report (with its failure), then none
    assert "rnn" in cb.reports[0].failures


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"clip": "bogus"}, "clip"),
        ({"figures": "yes"}, "figures"),
        ({"spike_factor": 0.5}, "spike_factor"),
        ({"include": [1.5]}, "include"),
        ({"history": -1}, "history"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gradwatch.GradWatch(**kwargs)


class NoRNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_no_recurrent_module_warns_naming_what_was_searched():
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)))
    cb = gradwatch.GradWatch()
    with pytest.warns(RuntimeWarning, match=r"no recurrent module found in NoRNN .*2 modules"):
        _trainer(callbacks=[cb], max_steps=2).fit(NoRNN(), data)
    assert cb.reports == {} and cb.verdicts == {}


def test_checkpoint_is_weights_only_loadable_and_resume_restores_the_detector(tmp_path):
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = gradwatch.GradWatch(every_n_steps=2, overhead_budget=None, warmup_steps=1)
    model = LM("GRU")
    _trainer(callbacks=[cb, ckpt], max_steps=5, enable_checkpointing=True).fit(model, _data())
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = raw["callbacks"][cb.state_key]
    assert [s["step"] for s in state["signals"]] == list(range(5))
    assert torch.equal(state["ema"], cb._core.detector.ema)

    resumed = gradwatch.GradWatch(every_n_steps=2, overhead_budget=None, warmup_steps=1)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["ema"] = resumed._core.detector.ema.clone()
            seen["verdicts"] = resumed.verdicts

    _trainer(callbacks=[resumed, Probe(), ckpt], max_steps=8, enable_checkpointing=True).fit(
        LM("GRU"), _data(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert torch.equal(seen["ema"], state["ema"])
    assert seen["verdicts"] == cb.verdicts
    assert list(resumed.reports) == [6]  # the schedule continues at global step 5
    assert [s.step for s in resumed.signals] == list(range(8))


def test_amp_16_mixed_unscales_captured_gradients_and_reports_skipped_steps():
    """CPU fp16 AMP through Lightning's MixedPrecision plugin (LSTMCell: CPU fp16 autocast
    has no fused LSTM). The first steps overflow at a huge initial scale: skipped, not
    exploding; later captures are unscaled (comparable to the fp32 run)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def run(plugins):
        torch.manual_seed(0)
        model = LM("cell", lr=0.0)
        cb = gradwatch.GradWatch(every_n_steps=1, log_every_n_steps=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _trainer(callbacks=[cb], plugins=plugins, deterministic=False, max_steps=8)
            trainer.fit(model, _data())
        return cb

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # fp16 overflow until 2**19
    amp = run([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    fp32 = run([])
    skipped = [s.skipped for s in amp.signals]
    assert skipped == [True] * 5 + [False] * 3
    assert not any(s.skipped for s in fp32.signals)
    assert not any(s.nonfinite for s in amp.signals)
    assert "nonfinite" not in amp.verdicts.values() and "exploding" not in amp.verdicts.values()
    last = max(amp.reports)
    a, b = amp.reports[last]["rnn"], fp32.reports[last]["rnn"]
    ratio = (a.total / b.total).flatten()
    assert ratio.isfinite().all() and (ratio - 1).abs().max() < 0.05  # fp16 vs fp32 rounding
    sa = amp.signals[-1].grad_norm["rnn"]
    assert sa == pytest.approx(fp32.signals[-1].grad_norm["rnn"], rel=0.05)


def test_bf16_mixed_with_fused_modules_and_a_fused_optimizer():
    torch.manual_seed(0)
    cb = gradwatch.GradWatch(every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(callbacks=[cb], precision="bf16-mixed", deterministic=False)
        trainer.fit(LM("LSTM", fused_opt=True), _data())
    m = cb.reports[4]["rnn"]
    assert m.exact and 1e-4 < m.fidelity <= 5e-2  # exact up to bf16 rounding
    assert m.total.isfinite().all() and (m.total > 0).all()
    assert all(s.grad_norm["rnn"] > 0 for s in cb.signals)


def test_callback_is_picklable_before_and_after_fit():
    cb = gradwatch.GradWatch(every_n_steps=3)
    assert pickle.loads(pickle.dumps(cb))._core.every_n_steps == 3
    _trainer(callbacks=[cb], max_steps=2).fit(LM("GRU"), _data())
    assert list(cb.reports) == [0]
    # pickled as plain data (arguments + checkpoint state), so libraries that save the
    # callback inside a model and load it with an allow-list unpickler need no gradwatch
    # internals; reports, like in a checkpoint, are not kept
    clone = pickle.loads(pickle.dumps(cb))
    assert clone._core.every_n_steps == 3 and clone.reports == {}
    assert repr(clone.state_dict()) == repr(cb.state_dict())
    payload = pickle.dumps(cb)
    assert b"MonitorCore" not in payload and b"VerdictTracker" not in payload


def test_tensorboard_logger_receives_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = L.loggers.TensorBoardLogger(tmp_path, name="", version=0)
    cb = gradwatch.GradWatch(every_n_steps=2, log_every_n_steps=1, figures=False)
    _trainer(callbacks=[cb], logger=logger, max_steps=4).fit(LM("GRU"), _data())
    acc = EventAccumulator(str(tmp_path / "version_0")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert "gradwatch/rnn/param_grad_norm" in tags
    assert "gradwatch/rnn/injected_grad_norm" in tags
    assert any(t.startswith("gradwatch/rnn/l0d0/gain") for t in tags)
    steps = [e.step for e in acc.Scalars("gradwatch/rnn/param_grad_norm")]
    assert steps == [0, 1, 2, 3]


def test_summary_table_is_shown_like_lightnings_own_messages(caplog):
    cb = gradwatch.GradWatch(every_n_steps=2)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.gradwatch"):
        _trainer(callbacks=[cb], max_steps=2).fit(LM("GRU"), _data())
    tables = [r.getMessage() for r in caplog.records if r.name == "lightning.pytorch.gradwatch"]
    assert len(tables) == 1 and "gradwatch summary" in tables[0] and "rnn" in tables[0]
