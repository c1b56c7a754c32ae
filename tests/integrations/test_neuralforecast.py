"""GradWatch inside neuralforecast: LSTM, GRU and RNN.

neuralforecast models take Trainer arguments as extra keyword arguments of the model
(``LSTM(..., callbacks=[cb], logger=...)``, stored in ``model.trainer_kwargs``) and use the
``pytorch_lightning`` namespace. Each owns one ``nn.LSTM``/``nn.GRU``/``nn.RNN`` named
``hist_encoder`` (``batch_first=True``) run over the ``input_size`` window. ``NeuralForecast``
deep-copies every model it is given (``NeuralForecast._reset_models``), callbacks included:
the callback that runs is ``nf.models[i].trainer_kwargs["callbacks"][j]``, not the user's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("neuralforecast")
pl = pytest.importorskip("pytorch_lightning")

import pandas as pd  # noqa: E402
from integration_checks import check_module_report, check_reports, gradwatch_scalar_tags  # noqa: E402
from neuralforecast import NeuralForecast  # noqa: E402
from neuralforecast.models import GRU, LSTM, RNN  # noqa: E402

import gradwatch  # noqa: E402

pytestmark = pytest.mark.integrations

STEPS = 3
WINDOWS = 16  # windows_batch_size: the RNN's batch
LAYERS = 2
INPUT = 12  # input_size: the RNN's sequence length
H = 4  # forecast horizon
MODELS = {"LSTM": (LSTM, "LSTM"), "GRU": (GRU, "GRU"), "RNN": (RNN, "RNN_TANH")}


def _df(n: int = 150) -> pd.DataFrame:
    t = np.arange(n)
    return pd.DataFrame(
        {
            "unique_id": "a",
            "ds": pd.date_range("2000-01-01", periods=n, freq="D"),
            "y": np.sin(0.2 * t).astype(np.float32),
        }
    )


def _model(name, tmp_path, callbacks, logger=False, **kw):
    cls, _ = MODELS[name]
    return cls(
        h=H,
        input_size=INPUT,
        encoder_n_layers=LAYERS,
        encoder_hidden_size=8,
        max_steps=STEPS,
        batch_size=8,
        windows_batch_size=WINDOWS,
        val_check_steps=100,
        random_seed=0,
        # Trainer arguments:
        callbacks=callbacks,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


def _running_watchers(nf: NeuralForecast) -> list:
    return [
        c
        for m in nf.models
        for c in (m.trainer_kwargs.get("callbacks") or [])
        if isinstance(c, gradwatch.GradWatch)
    ]


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_hist_encoder_reported_per_timestep_through_a_deep_copied_callback(tmp_path, name):
    cb = gradwatch.GradWatch(every_n_steps=1, figures=(name == "LSTM"))
    logger = pl.loggers.TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    model = _model(name, tmp_path, [cb], logger=logger)
    assert model.trainer_kwargs["callbacks"] == [cb]
    nf = NeuralForecast(models=[model], freq="D")
    nf.fit(_df())

    # NeuralForecast trained a deep copy: the user's callback never ran.
    assert nf.models[0] is not model
    assert cb.reports == {} and cb.names == []
    (ran,) = _running_watchers(nf)
    assert ran is not cb

    fitted = nf.models[0]
    assert isinstance(fitted.hist_encoder, getattr(torch.nn, name))
    assert fitted.hist_encoder.batch_first
    assert ran.names == ["hist_encoder"]
    check_reports(ran, steps=STEPS, names={"hist_encoder"})
    kind = MODELS[name][1]
    for report in ran.reports.values():
        mr = report["hist_encoder"]
        check_module_report(mr, kind=kind, layers=LAYERS, steps=INPUT, batch=WINDOWS)
        # Direct (non-recurrent) forecasting: only the last h outputs of the top layer go to
        # the MLP decoder; the positions before get no direct gradient by design but are
        # reached through the recurrence.
        top = mr.direct[-1, 0]
        assert (top[:-H] == 0).all() and (top[-H:] > 0).all()
        assert (mr.direct[0] > 0).all()
        assert (mr.carried[-1, 0, :-1] > 0).all()
    assert {"gradwatch/hist_encoder/param_grad_norm"} <= gradwatch_scalar_tags(tmp_path / "tb")
    # Predicting afterwards (a new Trainer with the same callbacks) is untouched.
    forecast = nf.predict()
    assert len(forecast) == H and np.isfinite(forecast[name].to_numpy()).all()


@pytest.mark.parametrize("h_train", [1, H])
def test_recurrent_mode_trains_on_the_last_h_train_outputs(tmp_path, h_train):
    """``recurrent=True``: the window is shifted by one (``input_size + 1`` inputs, plus the
    ``h_train - 1`` known targets) and only the last ``h_train`` outputs are in the training
    loss (``h_train=1`` by default): every earlier position of the top layer gets no direct
    gradient by design."""
    cb = gradwatch.GradWatch(every_n_steps=1, figures=False)
    model = _model("LSTM", tmp_path, [cb], recurrent=True, h_train=h_train)
    nf = NeuralForecast(models=[model], freq="D")
    nf.fit(_df())
    (ran,) = _running_watchers(nf)
    check_reports(ran, steps=STEPS, names={"hist_encoder"})
    steps = INPUT + h_train
    for report in ran.reports.values():
        mr = report["hist_encoder"]
        check_module_report(mr, kind="LSTM", layers=LAYERS, steps=steps, batch=WINDOWS)
        top = mr.direct[-1, 0]
        assert (top[:-h_train] == 0).all() and (top[-h_train:] > 0).all()
        assert (mr.carried[-1, 0, :-1] > 0).all()


def test_model_fit_without_the_neuralforecast_wrapper_uses_the_users_callback(tmp_path):
    """Fitting the model object itself (``model.fit(dataset)``, as neuralforecast's
    ``NeuralForecast.fit`` does internally) copies nothing: the user's callback runs."""
    from neuralforecast.tsdataset import TimeSeriesDataset

    cb = gradwatch.GradWatch(every_n_steps=1, figures=False)
    model = _model("GRU", tmp_path, [cb])
    dataset, *_ = TimeSeriesDataset.from_df(_df())
    model.fit(dataset)
    assert cb.names == ["hist_encoder"]
    check_reports(cb, steps=STEPS, names={"hist_encoder"})
    for report in cb.reports.values():
        check_module_report(
            report["hist_encoder"], kind="GRU", layers=LAYERS, steps=INPUT, batch=WINDOWS
        )
