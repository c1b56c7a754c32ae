"""GradWatch inside pytorch-forecasting: DeepAR and RecurrentNetwork.

pytorch-forecasting models are ``lightning.pytorch`` LightningModules; the callback goes into
``lightning.pytorch.Trainer(callbacks=[...])`` and the model into ``trainer.fit(model,
train_dataloaders=...)``. Both models own one recurrent module, ``rnn``: pytorch-forecasting's
own subclass of ``nn.LSTM``/``nn.GRU`` (``pytorch_forecasting.models.nn.rnn``) whose forward
takes ``lengths=`` and runs the kernel on a packed sequence, ``batch_first=True``. Each
training step calls it twice: ``rnn`` encodes the history (its outputs are discarded: only the
final state goes on) and ``rnn#1`` decodes the prediction window from that state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_forecasting")
L = pytest.importorskip("lightning.pytorch")

import pandas as pd  # noqa: E402
from integration_checks import (  # noqa: E402
    assert_all_carried,
    check_module_report,
    check_reports,
    gradwatch_scalar_tags,
)
from pytorch_forecasting import DeepAR, RecurrentNetwork, TimeSeriesDataSet  # noqa: E402
from pytorch_forecasting.models.nn.rnn import RNN as PFRNN  # noqa: E402

import gradwatch  # noqa: E402

pytestmark = pytest.mark.integrations

STEPS = 3
BATCH = 16
LAYERS = 2
ENCODER = 16  # max_encoder_length
HORIZON = 4  # max_prediction_length
MODELS = {"DeepAR": DeepAR, "RecurrentNetwork": RecurrentNetwork}


def _dataset(variable_lengths: bool = False) -> TimeSeriesDataSet:
    rows = []
    for g, n in enumerate([120, 90]):
        t = np.arange(n)
        y = (np.sin(0.2 * t + g) + 2.0).astype(np.float32)
        rows.append(pd.DataFrame({"series": str(g), "time_idx": t, "value": y}))
    df = pd.concat(rows, ignore_index=True)
    return TimeSeriesDataSet(
        df,
        time_idx="time_idx",
        target="value",
        group_ids=["series"],
        time_varying_unknown_reals=["value"],
        max_encoder_length=ENCODER,
        min_encoder_length=4 if variable_lengths else ENCODER,
        max_prediction_length=HORIZON,
        min_prediction_length=1 if variable_lengths else HORIZON,
    )


def _fit(tmp_path, name, cell, *, dropout=0.0, variable_lengths=False, logger=False, **cb_kw):
    L.seed_everything(0, verbose=False)
    ds = _dataset(variable_lengths)
    model = MODELS[name].from_dataset(
        ds, cell_type=cell, hidden_size=8, rnn_layers=LAYERS, dropout=dropout, learning_rate=1e-2
    )
    cb = gradwatch.GradWatch(every_n_steps=1, **cb_kw)
    trainer = L.Trainer(
        max_steps=STEPS,
        callbacks=[cb],
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    dl = ds.to_dataloader(train=True, batch_size=BATCH, num_workers=0)
    trainer.fit(model, train_dataloaders=dl)
    assert trainer.callbacks.count(cb) == 1  # the user's object itself runs
    return model, cb


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("name", ["DeepAR", "RecurrentNetwork"])
def test_encoder_and_decoder_calls_are_reported_per_timestep(tmp_path, name, cell):
    logger = L.loggers.TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    model, cb = _fit(tmp_path, name, cell, logger=logger, figures=(cell == "LSTM"))
    assert isinstance(model.rnn, PFRNN) and isinstance(model.rnn, getattr(torch.nn, cell))
    assert model.rnn.batch_first
    assert cb.names == ["rnn"]
    check_reports(cb, steps=STEPS, names={"rnn", "rnn#1"})
    for report in cb.reports.values():
        enc, dec = report["rnn"], report["rnn#1"]
        assert enc.module_name == dec.module_name == "rnn"
        # The encoder runs over encoder_length - 1 steps (the last known value is the
        # decoder's first input); lengths are all equal here, so packing changes nothing.
        check_module_report(enc, kind=cell, layers=LAYERS, steps=ENCODER - 1, batch=BATCH)
        check_module_report(dec, kind=cell, layers=LAYERS, steps=HORIZON, batch=BATCH)
        # The encoder's outputs are discarded by design: its top layer gets a direct gradient
        # only at its last step (the final state handed to the decoder) and everything before
        # arrives through the recurrence.
        top = enc.direct[-1, 0]
        assert (top[:-1] == 0).all() and top[-1] > 0
        assert_all_carried(enc, enc.total[-1, 0, :-1], enc.carried[-1, 0, :-1])
        assert (enc.carried[..., -1] == 0).all() and (enc.direct[..., -1] > 0).all()
        # The decoder's outputs all feed the distribution head / the output layer.
        assert (dec.direct > 0).all()
    tags = gradwatch_scalar_tags(tmp_path / "tb")
    assert {"gradwatch/rnn/param_grad_norm", "gradwatch/rnn/injected_grad_norm"} <= tags


def test_default_inter_layer_dropout_is_reported_as_approximate(tmp_path):
    """pytorch-forecasting's default ``dropout=0.1`` with 2 layers is inter-layer dropout
    inside the fused kernel: its masks are not visible, so the reports are approximate
    (flagged, with the reason), never silently wrong."""
    _, cb = _fit(tmp_path, "DeepAR", "LSTM", dropout=0.1, figures=False)
    check_reports(cb, steps=STEPS, names={"rnn", "rnn#1"})
    for report in cb.reports.values():
        for call, steps in (("rnn", ENCODER - 1), ("rnn#1", HORIZON)):
            mr = report[call]
            check_module_report(mr, kind="LSTM", layers=LAYERS, steps=steps, exact=False)
            assert not mr.exact and "dropout" in mr.approximate_reason


@pytest.mark.parametrize("name", ["DeepAR", "RecurrentNetwork"])
def test_variable_encoder_lengths_are_measured_on_valid_steps_only(tmp_path, name):
    _, cb = _fit(tmp_path, name, "LSTM", variable_lengths=True, figures=False)
    check_reports(cb, steps=STEPS, names={"rnn", "rnn#1"})
    for report in cb.reports.values():
        enc = report["rnn"]
        # Exact replay on the packed sequences the kernel really ran...
        assert enc.exact and enc.fidelity < 1e-4, (enc.fidelity, enc.approximate_reason)
        # ...and padded positions are not samples (and so no zero gradient to average in).
        valid = enc.valid_samples
        assert valid[0] == BATCH and valid[-1] < BATCH, valid.tolist()
        assert (valid[:-1] >= valid[1:]).all()
        check_module_report(enc, kind="LSTM", layers=LAYERS, steps=enc.steps)


def test_rnn_subclass_packing_inside_forward_agrees_with_caller_packing():
    """pytorch-forecasting's pattern without pytorch-forecasting: the same LSTM measured when
    the subclass packs (``rnn(x, lengths=...)``) and when the caller packs must agree."""
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class LengthsLSTM(nn.LSTM):
        def forward(self, x, hx=None, lengths=None, enforce_sorted=True):
            if lengths is None:
                return super().forward(x, hx)
            packed = pack_padded_sequence(
                x, lengths.cpu(), batch_first=self.batch_first, enforce_sorted=enforce_sorted
            )
            out, state = super().forward(packed, hx)
            return pad_packed_sequence(out, batch_first=self.batch_first)[0], state

    rnn = LengthsLSTM(3, 8, num_layers=2, batch_first=True)
    x = torch.randn(4, 10, 3)
    lengths = torch.tensor([10, 7, 5, 3])

    def measure(call):
        with gradwatch.trace(rnn) as tr:
            out, (h, _) = call()
            (out.sum() + h[-1].pow(2).sum()).backward()
        return tr.report()["LengthsLSTM"]

    def caller_packs():
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, state = rnn(packed)
        return pad_packed_sequence(out, batch_first=True)[0], state

    reference = measure(caller_packs)
    assert reference.exact and reference.valid_samples.tolist() == [4, 4, 4, 3, 3, 2, 2, 1, 1, 1]
    inside = measure(lambda: rnn(x, lengths=lengths, enforce_sorted=False))
    assert inside.exact, (inside.fidelity, inside.approximate_reason)
    assert torch.equal(inside.valid_samples, reference.valid_samples)
    assert torch.allclose(inside.total, reference.total, rtol=1e-4)
