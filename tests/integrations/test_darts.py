"""GradWatch inside darts: RNNModel and BlockRNNModel.

darts passes Trainer callbacks through ``pl_trainer_kwargs={"callbacks": [...]}`` and builds its
LightningModule (``_RNNModule`` / ``_BlockRNNModule``, an ``nn.LSTM``/``GRU``/``RNN`` named
``rnn``, ``batch_first=True``) lazily inside ``fit``, from the first training sample. darts
uses the ``pytorch_lightning`` namespace.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("darts")
pl = pytest.importorskip("pytorch_lightning")

from darts import TimeSeries  # noqa: E402
from darts.models import BlockRNNModel, RNNModel  # noqa: E402
from integration_checks import (  # noqa: E402
    assert_all_carried,
    check_module_report,
    check_reports,
    gradwatch_scalar_tags,
    lstm_forget_bias_,
)

import gradwatch  # noqa: E402

pytestmark = pytest.mark.integrations

KINDS = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN_TANH"}
STEPS = 3
BATCH = 16
LAYERS = 2


def _series(n: int = 160) -> TimeSeries:
    t = np.arange(n, dtype=np.float32)
    return TimeSeries.from_values(np.sin(0.2 * t).astype(np.float32))


def _trainer_kwargs(tmp_path, callbacks, logger=False):
    return {
        "callbacks": callbacks,
        "accelerator": "cpu",
        "max_steps": STEPS,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": logger,
        "default_root_dir": str(tmp_path),
    }


def _common(tmp_path, callbacks, logger=False):
    return dict(
        input_chunk_length=12,
        hidden_dim=8,
        n_rnn_layers=LAYERS,
        dropout=0.0,
        n_epochs=1,
        batch_size=BATCH,
        random_state=0,
        work_dir=str(tmp_path),
        pl_trainer_kwargs=_trainer_kwargs(tmp_path, callbacks, logger),
    )


def _watchers(model) -> list:
    return [c for c in model.trainer.callbacks if isinstance(c, gradwatch.GradWatch)]


@pytest.mark.parametrize("rnn", ["LSTM", "GRU", "RNN"])
def test_rnnmodel_reports_every_timestep_of_the_training_length(tmp_path, rnn):
    cb = gradwatch.GradWatch(every_n_steps=1)
    logger = pl.loggers.TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    model = RNNModel(model=rnn, training_length=24, **_common(tmp_path, [cb], logger))
    assert model.model is None  # the LightningModule does not exist before fit
    model.fit(_series())

    # darts hands the user's callback object itself to the Trainer: no copy.
    assert _watchers(model) == [cb] and _watchers(model)[0] is cb
    assert cb.names == ["rnn"]  # found in the module darts built inside fit
    assert isinstance(model.model.rnn, getattr(torch.nn, rnn)) and model.model.rnn.batch_first
    check_reports(cb, steps=STEPS, names={"rnn"})
    for report in cb.reports.values():
        mr = report["rnn"]
        # RNNModel trains on `training_length` steps and has a loss at every one of them:
        # every position of the top layer gets a direct gradient.
        check_module_report(mr, kind=KINDS[rnn], layers=LAYERS, steps=24, batch=BATCH)
        assert (mr.direct > 0).all()
        assert (mr.carried[..., -1] == 0).all()  # the final state is not used in the loss
    # The panels went to the Trainer's logger (figures included: the default).
    assert {"gradwatch/rnn/param_grad_norm", "gradwatch/rnn/injected_grad_norm"} <= (
        gradwatch_scalar_tags(tmp_path / "tb")
    )
    model.predict(n=3)  # predict after fit is untouched by the callback


class _ChronoForgetBias(pl.Callback):
    """A user callback that initialises the LSTM darts built: forget-gate bias 4, so that the
    recurrence carries the gradient over the whole input chunk (healthy by construction)."""

    def on_fit_start(self, trainer, pl_module):
        lstm_forget_bias_(pl_module.rnn, 4.0)


@pytest.mark.parametrize("rnn", ["LSTM", "GRU"])
def test_blockrnn_encoder_positions_without_output_get_carried_gradient(tmp_path, rnn):
    cb = gradwatch.GradWatch(every_n_steps=1, figures=False)
    callbacks = [_ChronoForgetBias(), cb] if rnn == "LSTM" else [cb]
    model = BlockRNNModel(model=rnn, output_chunk_length=4, **_common(tmp_path, callbacks))
    model.fit(_series())

    assert _watchers(model) == [cb]
    assert cb.names == ["rnn"]
    check_reports(cb, steps=STEPS, names={"rnn"})
    for report in cb.reports.values():
        mr = report["rnn"]
        check_module_report(mr, kind=KINDS[rnn], layers=LAYERS, steps=12, batch=BATCH)
        # BlockRNNModel feeds only the last `output_chunk_length` outputs of the top layer to
        # its head: the 8 positions before get no direct gradient by design...
        top = mr.direct[-1, 0]
        assert (top[:-4] == 0).all() and (top[-4:] > 0).all()
        assert (mr.direct[0] > 0).all()  # (the lower layer feeds the top one at every step)
        # ...but the gradient carried back through the recurrence reaches all of them.
        assert (mr.carried[-1, 0, :-1] > 0).all()
        assert_all_carried(mr, mr.total[-1, 0, :-4], mr.carried[-1, 0, :-4])
        if rnn == "LSTM":
            # Healthy by construction: positions without a direct gradient are no reason to
            # call the recurrence vanishing.
            assert mr.verdict == "healthy", mr.explain()
            assert (mr.horizon > 12).all()
    if rnn == "LSTM":
        assert cb.verdicts == {"rnn": "healthy"}


def test_untrained_model_deep_copies_the_callback(tmp_path):
    """darts deep-copies the creation parameters, callbacks included, whenever it makes a new
    model from an old one (``untrained_model()``, ``historical_forecasts(retrain=True)``,
    ``load``): the copy that runs is in ``model.trainer.callbacks``, not the user's object."""
    cb = gradwatch.GradWatch(every_n_steps=1, figures=False)
    first = RNNModel(model="GRU", training_length=16, **_common(tmp_path, [cb]))
    first.fit(_series())
    assert list(cb.reports) == [0, 1, 2]
    before = {s: r["rnn"].total.clone() for s, r in cb.reports.items()}

    second = first.untrained_model()
    second.fit(_series(120))
    (copy,) = _watchers(second)
    assert copy is not cb
    check_reports(copy, steps=STEPS, names={"rnn"})
    for report in copy.reports.values():
        check_module_report(report["rnn"], kind="GRU", layers=LAYERS, steps=16, batch=BATCH)
    # The user's object kept the results of the first fit only.
    assert {s: r["rnn"].total for s, r in cb.reports.items()}.keys() == before.keys()
    for s, t in before.items():
        assert torch.equal(cb.reports[s]["rnn"].total, t)


def _checkpointed(tmp_path, cb):
    """One epoch of 9 optimizer steps (no ``max_steps``), checkpointed by darts."""
    kw = _common(tmp_path, [cb])
    del kw["pl_trainer_kwargs"]["max_steps"]
    return RNNModel(model="LSTM", training_length=16, model_name="gw", save_checkpoints=True, **kw)


def test_checkpoint_load_and_resume_with_the_callback(tmp_path):
    """``save_checkpoints=True`` then ``load_from_checkpoint`` and more training: the
    Lightning checkpoint (callback state: plain types and tensors) loads with darts' safe
    loader; the pickled model needs only `gradwatch.GradWatch` allow-listed."""
    from darts.utils.serialization import safe_globals

    cb = gradwatch.GradWatch(every_n_steps=3, figures=False)
    _checkpointed(tmp_path, cb).fit(_series())
    assert list(cb.reports) == [0, 3, 6]
    with safe_globals([gradwatch.GradWatch]):
        loaded = RNNModel.load_from_checkpoint("gw", work_dir=str(tmp_path), best=False)
    loaded.fit(_series(), epochs=2)  # one more epoch from the checkpoint
    (resumed,) = _watchers(loaded)
    assert resumed is not cb  # unpickled from the saved creation parameters
    # The optimizer steps go on from the checkpoint's global step (9).
    assert list(resumed.reports) == [9, 12, 15]
    for report in resumed.reports.values():
        check_module_report(report["rnn"], kind="LSTM", layers=LAYERS, steps=16, batch=BATCH)


def test_checkpoint_loads_with_only_gradwatch_allow_listed(tmp_path):
    from darts.utils.serialization import safe_globals

    cb = gradwatch.GradWatch(every_n_steps=3, figures=False)
    _checkpointed(tmp_path, cb).fit(_series())
    with safe_globals([gradwatch.GradWatch]):
        RNNModel.load_from_checkpoint("gw", work_dir=str(tmp_path), best=False)
