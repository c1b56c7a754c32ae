"""Clipping through GradWatch(clip=...) and Monitor(clip=...): every strategy rescues an
exploding RNN, reactive mode, AMP (unscaled gradients), manual optimization, refusals,
resume, DDP, skip semantics."""

from __future__ import annotations

import copy
import math
import types
import warnings

import pytest
import torch
from test_lightning import LM, TBPTT, _data, _trainer
from torch import nn

import gradwatch
from gradwatch._adapters.lightning import _check_clipping_setup
from gradwatch._clipping import STRATEGY_NAMES, AutoClip, Clipper, NormClip, ZScoreClip

L = pytest.importorskip("lightning.pytorch")
from ddp_models import RankLM  # noqa: E402

HIDDEN, T, BATCH = 32, 50, 16


class ExplodingRNN(L.LightningModule):
    """A ReLU nn.RNN with W_hh = scale·I (an IRNN) on fixed data; ``jump_at`` resets W_hh to
    1.5·I at that optimizer step: the gradient norm jumps ~1e17-fold."""

    def __init__(self, scale=1.5, lr=0.01, loss_scale=1.0, jump_at=None, nan_at=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(1, HIDDEN, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(scale * torch.eye(HIDDEN))
        self.lr, self.loss_scale, self.jump_at, self.nan_at = lr, loss_scale, jump_at, nan_at
        self.losses: list[float] = []

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == self.jump_at:
            with torch.no_grad():
                self.rnn.weight_hh_l0.copy_(1.5 * torch.eye(HIDDEN))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.rnn(x)
        loss = self.loss_scale * ((self.head(out[:, -1]) - y) ** 2).mean()
        if self.global_step == self.nan_at:
            loss = loss * float("nan")
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fixed_batches(steps: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, T, 1, generator=gen)
    y = x[:, -5:].sum(dim=1)
    ds = torch.utils.data.TensorDataset(x.repeat(steps, 1, 1), y.repeat(steps, 1))
    return torch.utils.data.DataLoader(ds, batch_size=BATCH)


def _fit(model, cb, steps, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(callbacks=[cb, *kw.pop("extra", [])], max_steps=steps, **kw).fit(
            model, _fixed_batches(steps)
        )
    return model


def _finite(model) -> bool:
    return all(math.isfinite(v) for v in model.losses) and all(
        bool(p.isfinite().all()) for p in model.parameters()
    )


# ----------------------------------------------------------------------- (a) every strategy
def test_without_clipping_the_exploding_rnn_becomes_nonfinite():
    model = _fit(ExplodingRNN(), gradwatch.GradWatch(), 30)
    assert not _finite(model)
    assert not all(math.isfinite(v) for v in model.losses[:4])


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_each_strategy_keeps_the_exploding_rnn_finite(strategy):
    cb = gradwatch.GradWatch(clip=strategy)
    model = _fit(ExplodingRNN(), cb, 30)
    assert _finite(model)
    events = cb.clip_events
    assert [e.step for e in events] == list(range(30))
    assert events[0].clipped and events[0].total_norm > 1e15 and events[0].strategy == strategy
    assert not any(e.skip_step for e in events)
    assert isinstance(cb.clipper, Clipper) and cb.clipper.strategy.name == strategy


# ----------------------------------------------------------------------- (b) reactive mode
class FlagProbe(L.Callback):
    """After GradWatch: what the detector said at this step (flags and verdicts)."""

    def __init__(self, gw) -> None:
        self.gw, self.flagged = gw, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        s = self.gw.signals[-1]  # log_every_n_steps=1: this step's signals
        assert s.step == trainer.global_step
        bad = {"exploding", "nonfinite"} & set(self.gw.verdicts.values())
        if s.spike or s.nonfinite or bad:
            self.flagged.append(s.step)


def test_reactive_mode_clips_only_flagged_steps_and_rescues_a_sudden_explosion():
    jump = 15
    make = dict(scale=0.5, lr=0.05, loss_scale=0.05, jump_at=jump)
    gw = gradwatch.GradWatch(
        clip=Clipper("norm", mode="reactive"), warmup_steps=5, log_every_n_steps=1
    )
    probe = FlagProbe(gw)
    model = _fit(ExplodingRNN(**make), gw, 30, extra=[probe])
    assert _finite(model)
    steps = [e.step for e in gw.clip_events]
    assert steps == probe.flagged  # exactly the flagged steps
    assert steps[0] == jump and gw.clip_events[0].reason == "reactive: spike"
    assert gw.clip_events[0].clipped and gw.clip_events[0].total_norm > 1e10
    assert all(e.reason.startswith("reactive: ") for e in gw.clip_events)
    # the same run clipping always: an event every step; without clipping: non-finite
    always = gradwatch.GradWatch(clip="norm", warmup_steps=5)
    _fit(ExplodingRNN(**make), always, 30)
    assert [e.step for e in always.clip_events] == list(range(30))
    assert not _finite(_fit(ExplodingRNN(**make), gradwatch.GradWatch(warmup_steps=5), 30))


# ------------------------------------------------------------------------- (c) AMP 16-mixed
class ScaledNorm(L.Callback):
    """Before GradWatch: the norm of the still-scaled gradients after backward, divided by
    the scale of that backward: an independent unscaled norm."""

    def __init__(self) -> None:
        self.expected: dict[int, float] = {}
        self.scaled: dict[int, float] = {}

    def on_after_backward(self, trainer, pl_module):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
        ).item()
        self.scaled[trainer.global_step] = norm
        self.expected[trainer.global_step] = norm / trainer.scaler.get_scale()


class PostClipNorm(L.Callback):
    """After GradWatch: the gradient norm the optimizer will use."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms[trainer.global_step] = (
            torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
            ).item()
            if grads
            else math.nan
        )


def test_amp_16_mixed_clips_unscaled_gradients():
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    before, after = ScaledNorm(), PostClipNorm()
    gw = gradwatch.GradWatch(clip=NormClip(max_norm=0.05), log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(
            callbacks=[before, gw, after],
            plugins=[MixedPrecision("16-mixed", "cpu")],
            deterministic=False,
            max_steps=6,
        )
        trainer.fit(LM("cell", lr=0.1), _data())
    events = gw.clip_events
    assert [e.step for e in events] == list(range(6))
    finite = [e for e in events if e.threshold is not None]
    assert len(finite) >= 4
    for e in finite:
        assert e.total_norm == pytest.approx(before.expected[e.step], rel=1e-9)
        assert before.scaled[e.step] > 1000 * e.total_norm  # the clipper saw no loss scale
        assert e.clipped and after.norms[e.step] == pytest.approx(0.05, rel=1e-4)
    for e in events:
        if e.threshold is None:  # an fp16 overflow: the GradScaler's skip, reported once
            assert e.skip_step and "GradScaler" in e.reason
            assert gw.signals[e.step].skipped


# -------------------------------------------------------------- (d) manual optimization
def test_manual_optimization_clips_every_optimizer_step():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 12, 3, generator=g)), batch_size=4
    )
    after = PostClipNorm()
    gw = gradwatch.GradWatch(clip=NormClip(max_norm=1e-3), every_n_steps=1)
    _trainer(callbacks=[gw, after], max_steps=6).fit(TBPTT(), data)
    events = gw.clip_events
    assert [e.step for e in events] == list(range(6))  # 2 batches x 3 chunks
    assert all(e.clipped and e.total_norm > 1e-3 for e in events)
    assert list(after.norms) == list(range(6))
    assert all(n == pytest.approx(1e-3, rel=1e-4) for n in after.norms.values())


# -------------------------------------------------------------------------- (e) refusals
def test_refuses_to_clip_together_with_the_trainer():
    gw = gradwatch.GradWatch(clip="norm")
    trainer = _trainer(callbacks=[gw], gradient_clip_val=1.0, max_steps=2)
    with pytest.raises(
        ValueError, match=r"GradWatch\(clip='norm'\).*Trainer\(gradient_clip_val=1.0\)"
    ):
        trainer.fit(LM("GRU"), _data())


def test_refuses_a_fused_optimizer_under_a_grad_scaler():
    from lightning.pytorch.plugins.precision import MixedPrecision

    gw = gradwatch.GradWatch(clip="autoclip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(
            callbacks=[gw], plugins=[MixedPrecision("16-mixed", "cpu")], deterministic=False
        )
    with pytest.raises(ValueError, match=r"Adam\(fused=True\).*GradScaler"):
        trainer.fit(LM("cell", fused_opt=True), _data())


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_refuses_sharding_strategies(name):
    strategy = type(name, (), {})()
    fake = types.SimpleNamespace(gradient_clip_val=None, strategy=strategy, scaler=None)
    with pytest.raises(ValueError, match=rf"clip='norm'.*{name}"):
        _check_clipping_setup("clip='norm'", fake)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip": "bogus"}, r"clip='bogus'.*unknown clipping strategy"),
        ({"clip": NormClip}, r"pass an instance, NormClip\(...\), not the class"),
        ({"clip": 1.0}, r"clip=1.0: unknown clipping strategy"),
    ],
)
def test_invalid_clip_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradwatch.GradWatch(**kwargs)
    with pytest.raises(ValueError, match=match):
        gradwatch.Monitor(nn.GRU(2, 3), **kwargs)


# ---------------------------------------------------------------------------- (f) resume
@pytest.mark.parametrize(
    "strategy", [lambda: AutoClip(warmup=3), lambda: ZScoreClip(warmup_steps=3)], ids=["auto", "z"]
)
def test_resume_continues_the_adaptive_threshold_exactly(tmp_path, strategy):
    def gw():
        return gradwatch.GradWatch(clip=strategy(), every_n_steps=5)

    # One batch per epoch: a resume from a checkpoint taken at an epoch's end replays the
    # epoch's first batch (Lightning, non-stateful loaders), which must be the batch the
    # uninterrupted run sees next.
    def fit(cb, steps, model, **kw):
        ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
        _trainer(callbacks=[cb, ckpt], max_steps=steps, enable_checkpointing=True).fit(
            model, _data(n=4), **kw
        )

    torch.manual_seed(0)
    first_model = LM("GRU")
    first_model.configure_model()
    straight_model = copy.deepcopy(first_model)
    straight = gw()
    _trainer(callbacks=[straight], max_steps=16).fit(straight_model, _data(n=4))

    first = gw()
    fit(first, 8, first_model)  # last.ckpt at step 8
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert raw["callbacks"][first.state_key]["clip"]["clipper"]["step"] == 8
    resumed = gw()
    fit(resumed, 16, LM("GRU"), ckpt_path=tmp_path / "last.ckpt")

    expected = [(e.step, e.total_norm, e.threshold) for e in straight.clip_events]
    got = [(e.step, e.total_norm, e.threshold) for e in resumed.clip_events]
    assert got == expected  # the 8 restored events, then 8 new ones, ==
    adaptive = straight.clip_events[3:]
    assert not any(e.warmup for e in adaptive) and len({e.threshold for e in adaptive}) > 1


# ------------------------------------------------------------------------------ (g) DDP
class SaveRank(L.Callback):
    """ddp_spawn returns no callback state: each rank saves what its GradWatch holds."""

    def __init__(self, gw, out: str) -> None:
        self.gw, self.out = gw, out

    def setup(self, trainer, pl_module, stage):
        warnings.simplefilter("ignore")

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "events": [repr(e) for e in self.gw.clip_events],  # repr: NaN-safe equality
                "steps": [e.step for e in self.gw.clip_events],
                "reasons": [e.reason for e in self.gw.clip_events],
                "weights": [p.detach().clone() for p in pl_module.parameters()],
            },
            f"{self.out}/rank{trainer.global_rank}.pt",
        )
        # leave together: a rank that exits while the other still talks to it can abort in
        # gloo's teardown ("terminate called without an active exception")
        trainer.strategy.barrier()


@pytest.mark.slow
def test_ddp_reactive_clipping_decides_identically_on_every_rank(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(0, 20, (80, 10), generator=g)), batch_size=4
    )
    gw = gradwatch.GradWatch(
        every_n_steps=4, warmup_steps=2, clip=Clipper("autoclip", mode="reactive")
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[gw, SaveRank(gw, str(tmp_path))],
    )
    trainer.fit(RankLM(nan_step=7, lr=0.1, momentum=0.9), data)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["events"] == r1["events"]
    assert r0["steps"][0] == 5 and r0["reasons"][0] == "reactive: spike"  # rank 1's spike
    assert 7 in r0["steps"] and r0["reasons"][r0["steps"].index(7)] == "nonfinite: skip"
    for a, b in zip(r0["weights"], r1["weights"], strict=True):
        assert torch.equal(a, b) and a.isfinite().all()  # the NaN step was skipped on both


# -------------------------------------------------------------------- Monitor (plain loop)
def _momentum(opt, params):
    bufs = [opt.state[p].get("momentum_buffer") for p in params]
    return [None if b is None else b.clone() for b in bufs]


def _plain(monitor_kw, steps=20, nan_at=None, momentum=0.0, weight_decay=0.0):
    model = ExplodingRNN()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=momentum, weight_decay=weight_decay)
    batch = next(iter(_fixed_batches(1)))
    snapshots = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = gradwatch.Monitor(model, **monitor_kw)
        for step in range(steps):
            model.nan_at = nan_at if step == nan_at else None
            opt.zero_grad()
            model.global_step_ = step
            x, y = batch
            out, _ = model.rnn(x)
            loss = ((model.head(out[:, -1]) - y) ** 2).mean()
            if step == nan_at:
                loss = loss * float("nan")
            else:
                model.losses.append(loss.item())
            loss.backward()
            mon.step(opt)
            before = ([p.detach().clone() for p in params], _momentum(opt, params))
            opt.step()
            after = ([p.detach().clone() for p in params], _momentum(opt, params))
            snapshots.append((before, after))
        mon.close()
    return model, mon, opt, snapshots


def test_monitor_clips_and_keeps_the_exploding_rnn_finite():
    model, mon, _, _ = _plain({"clip": "autoclip"})
    assert _finite(model) and len(mon.clip_events) == 20 and mon.clip_events[0].clipped
    state = mon.state_dict()
    assert state["clip"]["clipper"]["step"] == 20


def test_skip_leaves_parameters_and_optimizer_state_untouched():
    """nonfinite='skip' sets every gradient to None: SGD with momentum and weight decay
    then skips every parameter, and its momentum buffers stay as they were."""
    model, mon, _, snaps = _plain(
        {"clip": "norm"}, steps=6, nan_at=3, momentum=0.9, weight_decay=0.1
    )
    (event,) = [e for e in mon.clip_events if e.step == 3]
    assert event.skip_step and event.reason == "nonfinite: skip" and not event.clipped
    (params, bufs), (params_after, bufs_after) = snaps[3]
    assert all(torch.equal(a, b) for a, b in zip(params, params_after, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(bufs, bufs_after, strict=True))
    (params, bufs), (params_after, bufs_after) = snaps[4]  # the next step trains again
    assert not any(torch.equal(a, b) for a, b in zip(params, params_after, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(bufs, bufs_after, strict=True))
    assert _finite(model)


def test_monitor_scope_recurrent_clips_only_the_rnn():
    model = ExplodingRNN()
    mon = gradwatch.Monitor(model, clip=Clipper(NormClip(max_norm=1e-6), scope="recurrent"))
    x, y = next(iter(_fixed_batches(1)))
    out, _ = model.rnn(x)
    ((model.head(out[:, -1]) - y) ** 2).mean().backward()
    head = [p.grad.clone() for p in model.head.parameters()]
    mon.step()
    mon.close()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.head.parameters(), head, strict=True))
    rnn_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.rnn.parameters()])
    )
    assert rnn_norm.item() == pytest.approx(1e-6, rel=1e-3)


def test_monitor_unscales_once_under_a_grad_scaler():
    torch.manual_seed(0)
    cell, head = nn.LSTMCell(4, 8), nn.Linear(8, 1)
    params = [*cell.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mon = gradwatch.Monitor(cell, scaler=scaler, clip=NormClip(max_norm=1e-3))
    x = torch.randn(5, 3, 4)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            h = c = torch.zeros(3, 8)
            for t in range(5):
                h, c = cell(x[t], (h, c))
            loss = head(h).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaled = torch.linalg.vector_norm(
            torch.stack([p.grad.double().norm() for p in params])
        ).item()
        expected = scaled / scaler.get_scale()
        mon.step(opt)  # unscales (the opt's gradients), then clips
        scaler.step(opt)  # must not unscale again
        scaler.update()
        e = mon.clip_events[-1]
        # the model of this Monitor is the cell: scope "all" = the optimizer's parameters
        assert e.total_norm == pytest.approx(expected, rel=1e-9) and e.clipped
    mon.close()


def test_reactive_flag_comes_from_this_steps_flags_or_the_latest_verdict():
    from gradwatch._engine.clip_control import ClipControl
    from gradwatch._engine.detector import StepFlags
    from gradwatch._engine.signals import StepOutcome

    flagged = ClipControl.flagged
    healthy = {"rnn": "healthy"}
    assert flagged(StepOutcome(3, flags=StepFlags(False, False, False)), healthy) is None
    assert flagged(StepOutcome(3, flags=StepFlags(True, False, False)), healthy) == "spike"
    assert (
        flagged(StepOutcome(3, flags=StepFlags(True, True, False)), healthy) == "non-finite signal"
    )
    assert flagged(StepOutcome(3), {"a": "exploding", "b": "vanishing"}) == "exploding verdict: a"
    assert flagged(None, {"rnn": "nonfinite"}) == "nonfinite verdict: rnn"


def test_clip_scalars_reach_the_logger_and_the_callback_pickles(tmp_path):
    import pickle

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = L.loggers.TensorBoardLogger(tmp_path, name="", version=0)
    gw = gradwatch.GradWatch(clip="zscore", log_every_n_steps=2, figures=False)
    assert pickle.loads(pickle.dumps(gw)).clipper.strategy.name == "zscore"  # ddp_spawn
    _fit(ExplodingRNN(), gw, 4, logger=logger)
    acc = EventAccumulator(str(tmp_path / "version_0")).Reload()
    pre = acc.Scalars("gradwatch/clip/pre_norm")
    assert [e.step for e in pre] == [0, 1, 2, 3]  # every step is clipped (warm-up at 1.0)
    assert pre[0].value == pytest.approx(gw.clip_events[0].total_norm, rel=1e-6)
    coefficient = acc.Scalars("gradwatch/clip/coefficient")
    assert coefficient[0].value == pytest.approx(gw.clip_events[0].coefficient, rel=1e-5)
    assert {"gradwatch/clip/threshold", "gradwatch/clip/clipped"} <= set(acc.Tags()["scalars"])
    assert pickle.loads(pickle.dumps(gw)).clip_events == gw.clip_events
