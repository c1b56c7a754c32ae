"""Verdict thresholds, hysteresis, checkpoint state and explanations."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._analysis.report import ModuleReport, Report
from gradwatch._analysis.verdicts import Thresholds, VerdictTracker, classify, diagnose


def _report(horizon: float, growth: float = -3.0, seq_len: int = 100, name: str = "rnn"):
    zeros = torch.zeros(1, 1, seq_len)
    base = ModuleReport(
        name=name,
        module_name=name,
        kind="RNN_TANH",
        num_layers=1,
        num_directions=1,
        total=zeros + 1,
        carried=zeros,
        direct=zeros,
        cell_total=None,
        valid_samples=torch.full((seq_len,), 4),
    )
    q = {
        "gain": torch.tensor([[0.9]]),
        "horizon": torch.tensor([[horizon]]),
        "efold": torch.tensor([[10.0]]),
        "log10_attenuation": torch.tensor([[growth]]),
        "actual_gain": torch.tensor([[0.9]]),
    }
    return diagnose(base, q, Thresholds(), [False])


def _run(tracker: VerdictTracker, horizons: list[float], **kw) -> list[str]:
    seen = []
    for h in horizons:
        tracker.update(Report({"rnn": _report(h, **kw)}))
        seen.append(tracker.verdicts["rnn"])
    return seen


def test_classify_relates_horizon_to_sequence_length():
    th = Thresholds()
    assert classify(40.0, -5.0, 100, False, th) == "vanishing"
    assert classify(60.0, -5.0, 100, False, th) == "healthy"
    assert classify(40.0, -5.0, 60, False, th) == "healthy"  # a shorter sequence needs less
    assert classify(math.inf, 2.5, 100, False, th) == "exploding"
    assert classify(math.inf, 1.5, 100, False, th) == "healthy"
    assert classify(1.0, 0.0, 3, False, th) == "healthy"  # shorter than min_steps
    assert classify(1.0, 0.0, 100, True, th) == "nonfinite"


def test_hysteresis_needs_patience_and_margin():
    tracker = VerdictTracker(Thresholds(patience=2, margin=0.25))
    # one vanishing report does not flip; two in a row do
    assert _run(tracker, [30, 80, 30, 30]) == ["healthy", "healthy", "healthy", "vanishing"]
    # 55 clears 50 but not 50 * 1.25: still vanishing; 70 twice leaves
    assert _run(tracker, [55, 55, 70, 70]) == ["vanishing"] * 3 + ["healthy"]


def test_nonfinite_is_flagged_at_once():
    tracker = VerdictTracker()
    tracker.update(Report({"rnn": _report(80)}))
    bad = _report(80)
    bad = diagnose(
        ModuleReport(**{**bad.__dict__, "total": bad.total * math.nan}),
        {"horizon": bad.horizon, "log10_attenuation": bad.log10_attenuation},
        Thresholds(),
        [False],
    )
    changes = tracker.update(Report({"rnn": bad}))
    assert tracker.verdicts["rnn"] == "nonfinite"
    assert [(c.name, c.old, c.new) for c in changes] == [("rnn", "healthy", "nonfinite")]


def test_tracker_state_round_trips_through_weights_only_checkpoint():
    tracker = VerdictTracker()
    _run(tracker, [30, 30, 30, 80])  # vanishing, with a pending healthy candidate
    buf = io.BytesIO()
    torch.save({"gradwatch": tracker.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["gradwatch"]
    resumed = VerdictTracker()
    resumed.load_state_dict(state)
    # the pending candidate survives: one more healthy report completes the change
    assert _run(resumed, [80]) == _run(tracker, [80]) == ["healthy"]
    with pytest.raises(ValueError, match="malformed"):
        VerdictTracker().load_state_dict({"parts": {"x|0|0": {"verdict": "healthy"}}})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vanishing_horizon": 0}, "vanishing_horizon"),
        ({"exploding_growth": 1.0}, "exploding_growth"),
        ({"min_steps": 1}, "min_steps"),
        ({"patience": 0}, "patience"),
        ({"margin": -0.1}, "margin"),
    ],
)
def test_invalid_thresholds_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Thresholds.{field}"):
        Thresholds(**kwargs)


def _trace(model, x):
    with gradwatch.trace(model) as tr:
        out, _ = model(x)
        out[-1].pow(2).sum().backward()
    return tr.report()[type(model).__name__]


def test_explanations_name_the_dominant_cause():
    torch.manual_seed(0)
    small = nn.RNN(4, 32)
    with torch.no_grad():
        small.weight_hh_l0.mul_(0.3)
    m = _trace(small, torch.randn(80, 4, 4))
    assert m.verdict == "vanishing"
    assert m.explanation.cause == "small_recurrent_weight"
    assert "Pascanu" in m.explain()

    saturated = nn.RNN(4, 32)
    with torch.no_grad():
        nn.init.orthogonal_(saturated.weight_hh_l0)
        saturated.weight_ih_l0.mul_(20)
    m = _trace(saturated, torch.randn(80, 4, 4))
    assert m.verdict == "vanishing"
    assert m.explanation.cause == "saturated_activation"
    assert m.causes.saturation[0, 0].item() > 0.5

    lstm = nn.LSTM(4, 32)
    m = _trace(lstm, torch.randn(120, 4, 4))
    assert m.verdict == "vanishing"
    assert m.explanation.cause == "forget_gate"
    assert any("forget-gate bias" in r for r in m.explanation.remedies)


def test_trace_report_exposes_per_layer_verdicts_and_shapes():
    torch.manual_seed(0)
    gru = nn.GRU(3, 16, num_layers=2, bidirectional=True)
    m = _trace(gru, torch.randn(30, 2, 3))
    assert m.gain.shape == m.horizon.shape == (2, 2)
    assert m.propagation.shape == (2, 2, 30)
    assert len(m.verdicts) == 2 and all(len(row) == 2 for row in m.verdicts)
    order = ("healthy", "vanishing", "exploding", "nonfinite")
    assert m.verdict == max((v for row in m.verdicts for v in row), key=order.index)
    assert set(m.causes.gate_mean) == {"update", "reset"}
