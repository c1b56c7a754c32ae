"""The adapters' shared surface: the lazy public namespace, WatchOptions, the report history,
Monitor's panels, GradWatch's checkpoint key, pickling, and reuse across Trainers."""

from __future__ import annotations

import dataclasses
import io
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._engine.options import WatchArgs, WatchOptions

L = pytest.importorskip("lightning.pytorch")
EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


# ------------------------------------------------------------------------ public surface
def test_import_gradwatch_imports_neither_torch_nor_lightning():
    code = (
        "import sys, gradwatch; "
        "heavy = [m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_listed():
    for name in gradwatch.__all__:
        assert getattr(gradwatch, name) is not None, name
    assert set(gradwatch.__all__) <= set(dir(gradwatch))
    assert gradwatch.GradWatch.__name__ == "GradWatch" and gradwatch.Clipper.__name__ == "Clipper"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gradwatch.nope  # noqa: B018


# ------------------------------------------------------------------------ options
def test_watch_args_and_options_name_the_same_fields():
    fields = [f.name for f in dataclasses.fields(WatchOptions)]
    assert list(WatchArgs.__annotations__) == fields


def test_both_adapters_take_the_same_options_and_expose_them():
    kw = dict(every_n_steps=7, include=nn.GRU, exclude="head*", spike_factor=5.0, history=3)
    gw = gradwatch.GradWatch(**kw)
    with gradwatch.Monitor(nn.GRU(2, 3), **kw) as mon:
        assert gw.options == mon.options
        for f in dataclasses.fields(WatchOptions):
            assert getattr(gw, f.name) == getattr(mon, f.name) == getattr(gw.options, f.name)
    assert gw.include == (nn.GRU,) and gw.exclude == ("head*",)  # one selector: a tuple
    with pytest.raises(AttributeError, match="read-only"):
        gw.every_n_steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        gw.options.every_n_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"history": 1.5}, "history"),
        ({"spike_factor": 1}, "spike_factor"),
        ({"figures": "yes"}, "figures"),
        ({"async_flags": 1}, "async_flags"),
        ({"thresholds": {"gain": 1}}, "thresholds"),
        ({"include": 123}, "include"),
        ({"clip": "nrm"}, "clip='nrm'"),
    ],
)
def test_bad_options_fail_at_construction_naming_the_argument(kwargs, match):
    for make in (
        lambda: gradwatch.GradWatch(**kwargs),
        lambda: gradwatch.Monitor(nn.GRU(2, 3), **kwargs),
    ):
        with pytest.raises(ValueError, match=match):
            make()


def test_removed_clip_arguments_say_how_to_migrate():
    with pytest.raises(TypeError, match=r"clip_mode=\.\.\.\) was removed.*Clipper\('norm', mode="):
        gradwatch.GradWatch(clip="norm", clip_mode="reactive")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'every_n_step'"):
        gradwatch.Monitor(nn.GRU(2, 3), every_n_step=3)
    gw = gradwatch.GradWatch(clip=gradwatch.Clipper("norm", mode="reactive", scope="recurrent"))
    assert (gw.clipper.mode, gw.clipper.scope, gw.clipper.nonfinite) == (
        "reactive",
        "recurrent",
        "skip",
    )


def test_options_round_trip_through_plain_data():
    opts = WatchOptions(
        include=[nn.LSTM, "enc.*"], thresholds=gradwatch.Thresholds(patience=3), clip="agc"
    )
    plain = opts.to_plain()
    assert plain["include"] == [{"type": "torch.nn.modules.rnn:LSTM"}, "enc.*"]
    assert WatchOptions.from_plain(plain) == opts


# ------------------------------------------------------------------------ results
def _gru_run(mon: gradwatch.Monitor, model: nn.Module, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        out, _ = model(torch.randn(6, 2, 3, generator=g))
        out.pow(2).sum().backward()
        mon.step(opt)
        opt.step()
        opt.zero_grad()


def test_latest_report_and_negative_keys_reach_the_newest_capture():
    model = nn.GRU(3, 4)
    with gradwatch.Monitor(model, every_n_steps=2) as mon:
        assert mon.latest_report is None and mon.reports.latest is None
        with pytest.raises(KeyError, match="holds 0 report"):
            mon.reports[-1]
        _gru_run(mon, model, 5)
    reports = mon.reports
    assert reports.steps == [0, 2, 4] and reports.latest_step == 4
    assert reports[-1] is reports[4] is mon.latest_report is reports.latest
    assert reports[-3] is reports[0]
    with pytest.raises(KeyError):
        reports[-4]
    with pytest.raises(KeyError):
        reports[1]  # not captured
    assert reports == {0: reports[0], 2: reports[2], 4: reports[4]}  # a Mapping
    assert reports[-1][mon.names[0]].steps == 6


# ------------------------------------------------------------------------ Monitor panels
@pytest.mark.parametrize("how", ["log_dir", "writer"])
def test_monitor_writes_the_same_panels(tmp_path, how):
    from torch.utils.tensorboard import SummaryWriter

    model = nn.GRU(3, 4)
    writer = SummaryWriter(str(tmp_path)) if how == "writer" else None
    target = {"writer": writer} if writer is not None else {"log_dir": tmp_path}
    mon = gradwatch.Monitor(model, every_n_steps=2, log_every_n_steps=1, figures=False, **target)
    _gru_run(mon, model, 4)
    mon.close()
    if writer is not None:
        writer.add_scalar("still/open", 1.0, 0)  # flushed, not closed, by Monitor.close
        writer.close()
    acc = EventAccumulator(str(tmp_path)).Reload()
    tags = set(acc.Tags()["scalars"])
    name = mon.names[0]
    assert [e.step for e in acc.Scalars(f"gradwatch/{name}/param_grad_norm")] == [0, 1, 2, 3]
    gain = acc.Scalars(f"gradwatch/{name}/l0d0/gain")
    assert [e.step for e in gain] == [0, 2]
    assert gain[-1].value == pytest.approx(float(mon.reports[2][name].gain[0, 0]), rel=1e-6)
    assert f"gradwatch/{name}/injected_grad_norm" in tags


def test_monitor_refuses_two_panel_targets(tmp_path):
    with pytest.raises(ValueError, match="log_dir and writer"):
        gradwatch.Monitor(nn.GRU(2, 3), log_dir=tmp_path, writer=object())


# ------------------------------------------------------------------------ Lightning
class TwoRNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.GRU(4, 6)
        self.b = nn.LSTM(6, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.b(self.a(x)[0])[0])

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x.transpose(0, 1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 5, 4, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4)


def _trainer(**kw):
    args = dict(
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    args.update(kw)
    return L.Trainer(**args)


class _Probe(L.Callback):
    """Records each GradWatch's restored detector levels when training starts."""

    def __init__(self, *watchers):
        self.watchers, self.seen = watchers, []

    def on_train_start(self, trainer, pl_module):
        self.seen = [w._core.detector.ema.clone() for w in self.watchers]


def _fit_with_checkpoint(tmp_path, callbacks, max_steps, **fit_kw):
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _trainer(callbacks=[*callbacks, ckpt], max_steps=max_steps, enable_checkpointing=True)
    trainer.fit(TwoRNN(), _data(), **fit_kw)
    return tmp_path / "last.ckpt"


def test_two_callbacks_in_one_trainer_keep_separate_checkpoint_state(tmp_path):
    # logging every step: signals at every step whatever the overhead budget decides
    a = gradwatch.GradWatch(include="a", log_every_n_steps=1)
    b = gradwatch.GradWatch(include="b", every_n_steps=2, log_every_n_steps=1)
    assert a.state_key != b.state_key
    assert a.state_key == gradwatch.GradWatch(include=["a"]).state_key  # same configuration
    path = _fit_with_checkpoint(tmp_path / "ckpt", [a, b], 3)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert states[a.state_key]["names"] == ["a"] and states[b.state_key]["names"] == ["b"]

    ra = gradwatch.GradWatch(include="a", log_every_n_steps=1)
    rb = gradwatch.GradWatch(include="b", every_n_steps=2, log_every_n_steps=1)
    assert (ra.state_key, rb.state_key) == (a.state_key, b.state_key)
    probe = _Probe(ra, rb)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "spike detection restarts" would fail
        _fit_with_checkpoint(tmp_path / "ckpt2", [ra, rb, probe], 5, ckpt_path=path)
    assert torch.equal(probe.seen[0], states[a.state_key]["ema"])
    assert torch.equal(probe.seen[1], states[b.state_key]["ema"])
    assert [s.step for s in ra.signals] == list(range(5))


def test_checkpoint_with_the_old_state_key_still_loads(tmp_path):
    cb = gradwatch.GradWatch(include="a", log_every_n_steps=1)  # signals every step
    path = _fit_with_checkpoint(tmp_path / "ckpt", [cb], 3)
    raw = torch.load(path, weights_only=False)
    raw["callbacks"] = {"GradWatch": raw["callbacks"].pop(cb.state_key)}  # written the old way
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    resumed = gradwatch.GradWatch(include="a", log_every_n_steps=1)  # signals every step
    probe = _Probe(resumed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint")
        _fit_with_checkpoint(tmp_path / "ckpt2", [resumed, probe], 5, ckpt_path=old)
    assert torch.equal(probe.seen[0], raw["callbacks"]["GradWatch"]["ema"])
    assert [s.step for s in resumed.signals] == list(range(5))


def test_pickles_as_plain_data_for_allow_list_loaders():
    cb = gradwatch.GradWatch(every_n_steps=3, include=nn.GRU, thresholds=gradwatch.Thresholds())
    _trainer(callbacks=[cb], max_steps=2).fit(TwoRNN(), _data())
    buf = io.BytesIO()
    torch.save(cb, buf)
    buf.seek(0)
    # what darts does: a weights-only load with only gradwatch.GradWatch allow-listed
    with torch.serialization.safe_globals([gradwatch.GradWatch]):
        clone = torch.load(buf, weights_only=True)
    assert clone.options == cb.options and clone.state_key == cb.state_key
    assert repr(clone.state_dict()) == repr(cb.state_dict())


def test_pickles_written_before_watch_options_still_load():
    state = gradwatch.GradWatch().state_dict()
    old = {
        "init": dict(
            every_n_steps=4,
            include=[{"type": "torch.nn.modules.rnn:GRU"}],
            exclude=None,
            spike_factor=10.0,
            warmup_steps=10,
            history=100,
            log_every_n_steps=None,
            thresholds=None,
            async_flags=None,
            clip="norm",
            clip_mode="reactive",
            clip_scope=None,
            clip_nonfinite="zero",
            figures=False,
        ),
        "state": state,
    }
    cb = gradwatch.GradWatch.__new__(gradwatch.GradWatch)
    cb.__setstate__(pickle.loads(pickle.dumps(old)))
    assert cb.every_n_steps == 4 and cb.include == (nn.GRU,) and not cb.figures
    assert (cb.clipper.mode, cb.clipper.scope, cb.clipper.nonfinite) == ("reactive", "all", "zero")


def test_one_callback_reused_writes_to_each_trainers_own_logger(tmp_path):
    cb = gradwatch.GradWatch(every_n_steps=2, log_every_n_steps=1, figures=False)
    runs = {}
    for run, steps in (("first", 2), ("second", 4)):
        logger = L.loggers.TensorBoardLogger(tmp_path, name=run, version=0)
        _trainer(callbacks=[cb], logger=logger, max_steps=steps).fit(TwoRNN(), _data())
        runs[run] = tmp_path / run / "version_0"
    first = EventAccumulator(str(runs["first"])).Reload()
    second = EventAccumulator(str(runs["second"])).Reload()
    tag = "gradwatch/a/param_grad_norm"
    assert [e.step for e in first.Scalars(tag)] == [0, 1]  # nothing of the second fit
    assert [e.step for e in second.Scalars(tag)] == [0, 1, 2, 3]
    assert [e.step for e in second.Scalars("gradwatch/b/l0d0/gain")] == [0, 2]
    assert cb._writer is None  # released at teardown: no logger of a finished fit kept
