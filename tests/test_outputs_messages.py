"""Warnings: one per state change, with place, measurements, cause and remedies."""

from __future__ import annotations

import logging

import pytest
import torch
from test_outputs_scalars import make_module
from torch import nn

import gradwatch
from gradwatch._outputs import messages
from gradwatch._outputs.messages import (
    change_message,
    remedies_for,
    summary_table,
    warn_change,
)


def gradwatch_records(caplog):
    return [r for r in caplog.records if r.name == "gradwatch"]


def test_vanishing_message_names_place_measurement_cause_and_remedies():
    m = make_module("enc.rnn", kind="LSTM", layers=2, directions=2, gain=0.6, steps=50)
    text = change_message(m, "healthy", "vanishing", seq_len=50)
    first = text.splitlines()[0]
    assert first.startswith("gradwatch: enc.rnn (LSTM) is now VANISHING (was healthy)")
    assert "layer 1, forward direction" in first  # the explanation's layer and direction
    assert "also vanishing: layer 0, forward direction" in text
    assert "per-step gain 0.6" in text
    assert "horizon 10 steps versus sequence length 50" in text
    assert "shrinks by a factor 10^10.9" in text  # 49 * log10(0.6)
    assert "cause: enc.rnn: vanishing; the forget gate" in text
    assert "a remedy from the diagnostics" in text  # the explanation's remedies come first
    assert "forget-gate bias to about 1-2" in text
    assert "gated cell" not in text  # it already is one


def test_plain_rnn_vanishing_suggests_gated_cells_and_init_not_forget_bias():
    m = make_module("rnn", kind="RNN_TANH", layers=1, gain=0.5, cause="small_recurrent_weight")
    text = change_message(m, None)
    assert "is now VANISHING at layer 0, direction 0." in text
    assert "(was" not in text
    assert "orthogonal" in text and "gated cell (nn.LSTM or nn.GRU)" in text
    assert "forget-gate" not in text
    assert len(remedies_for(m)) <= 4


def test_exploding_message_mentions_growth_and_clipping():
    m = make_module("rnn", kind="RNN_RELU", layers=1, gain=1.3, cause="large_recurrent_weight")
    text = change_message(m, "healthy", seq_len=20)
    assert "EXPLODING" in text and "per-step gain 1.3" in text
    assert "stays above 1% over the whole 20-step sequence" in text
    assert "grows by a factor 10^" in text
    tries = text.split("try:")[1]
    assert "clip gradients by norm" in tries
    assert "lower the learning rate" in tries
    assert "spectral norm near 1" in tries


def test_nonfinite_message_locates_the_first_nonfinite_value():
    m = make_module("dec", kind="GRU", layers=1, verdict="nonfinite", nonfinite_t=7,
                    cause="nonfinite")  # fmt: skip
    text = change_message(m, "exploding")
    assert "NONFINITE (was exploding)" in text
    assert "dec layer 0 direction 0 timestep 7" in text
    assert "inf/NaN in the inputs" in text
    assert "clip gradients by norm" in text


def test_recovery_is_a_single_info_line():
    m = make_module("rnn", kind="GRU", layers=1, gain=0.999, steps=30)
    text = change_message(m, "vanishing")
    assert text.startswith("gradwatch: rnn (GRU) is healthy again (was vanishing)")
    assert "\n" not in text
    assert "stays above 1% over the whole 30-step sequence" in text


def test_messages_without_diagnostics_do_not_fail():
    m = make_module("rnn", layers=1, diagnostics=False)
    assert change_message(m, None, "vanishing", seq_len=20).startswith(
        "gradwatch: rnn (LSTM) is now VANISHING"
    )
    assert "rnn" in summary_table({"rnn": m})


def test_warn_change_logs_once_per_change_with_levels(caplog):
    caplog.set_level(logging.DEBUG, logger="gradwatch")
    bad = make_module("rnn", layers=1, gain=0.5)
    assert warn_change(bad, "vanishing", "vanishing") is None  # no change, no message
    assert warn_change(make_module("rnn", layers=1, gain=0.999), None) is None  # healthy start
    text = warn_change(bad, "healthy")
    assert text and "VANISHING" in text
    back = warn_change(make_module("rnn", layers=1, gain=0.999), "vanishing")
    records = gradwatch_records(caplog)
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert [r.getMessage() for r in records] == [text, back]


def test_explanation_of_another_verdict_is_not_quoted():
    # a tracker with hysteresis may announce "vanishing" while the latest report's own
    # explanation is about something else: then neither its cause nor its remedies are used
    m = make_module("rnn", kind="RNN_TANH", layers=1, gain=1.3, cause="large_recurrent_weight")
    text = change_message(m, "healthy", "vanishing", layer=0, direction=0)
    assert "cause:" not in text
    assert "a remedy from the diagnostics" not in text
    assert "gated cell" in text


def _trace(model: nn.Module, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(steps, 2, 4)
    with gradwatch.trace(model) as tr:
        out, _ = model(x)
        out[-1].pow(2).sum().backward()
    return tr.report()


def test_real_reports_through_the_verdict_tracker(caplog):
    """gradwatch.trace -> gradwatch._analysis.verdicts.VerdictTracker -> one warning per change."""
    from gradwatch._analysis.verdicts import VerdictTracker

    torch.manual_seed(0)
    rnn = nn.RNN(4, 8)  # default init, tanh, 120 steps: vanishing
    tracker = VerdictTracker()
    caplog.set_level(logging.INFO, logger="gradwatch")
    texts = []
    for seed in range(4):
        for change in tracker.update(_trace(rnn, 120, seed)):
            text = warn_change(
                change.report,
                change.old,
                change.new,
                layer=change.layer,
                direction=change.direction,
            )
            texts.append(text)
    assert len(texts) == 1  # reported once, not every step
    text = texts[0]
    assert "gradwatch: RNN (RNN_TANH) is now VANISHING (was healthy) at layer 0" in text
    assert "versus sequence length 120" in text
    assert "cause: " in text and "try:" in text
    assert [r.getMessage() for r in gradwatch_records(caplog)] == texts

    relu = nn.RNN(4, 8, nonlinearity="relu")
    with torch.no_grad():
        relu.weight_hh_l0.copy_(1.5 * torch.eye(8))
    report = _trace(relu, 30)
    m = report["RNN"]
    assert m.verdict == "exploding"
    text = change_message(m, "healthy")
    assert "EXPLODING" in text and "grows by a factor 10^" in text and "clip" in text
    table = summary_table(report)
    assert "exploding" in table and "large_recurrent_weight" in table


def test_summary_table_has_one_aligned_row_per_layer_and_direction():
    latest = {
        "enc.rnn": make_module("enc.rnn", layers=2, directions=2, gain=0.6),
        "dec#1": make_module("dec#1", kind="GRU", layers=1, verdict="nonfinite", nonfinite_t=2,
                             cause="nonfinite"),
        "ok": make_module("ok", kind="RNN_TANH", layers=1, gain=0.999),
    }  # fmt: skip
    table = summary_table(latest)
    lines = table.splitlines()
    assert lines[0] == "gradwatch summary (3 module calls: 1 healthy, 1 vanishing, 1 nonfinite)"
    header, rule, *rows = lines[1:]
    assert header.split() == ["module", "kind", "layer", "verdict", "gain", "horizon", "seq",
                              "log10", "att.", "carried", "cause"]  # fmt: skip
    assert set(rule.replace(" ", "")) == {"-"}
    body = rows[:6]
    assert [r.split()[2] for r in body] == ["l0d0", "l0d1", "l1d0", "l1d1", "l0d0", "l0d0"]
    assert body[2].split()[-1] == "forget_gate"  # the cause sits on the explained row
    assert body[5].split()[3:6] == ["healthy", "0.999", "never"]
    assert body[4].split()[3] == "nonfinite" and body[4].split()[-1] == "nonfinite"
    columns = {line.index("verdict") if "verdict" in line else None for line in [header]}
    assert columns == {header.index("verdict")}
    assert all(r[header.index("verdict")] != " " for r in body)  # aligned under the header
    assert "dec#1: first non-finite gradient at dec#1 layer 0 direction 0 timestep 2" in table
    assert summary_table({}) == "gradwatch: no recurrent module was measured."


@pytest.mark.parametrize("cause", sorted(messages.REMEDIES))
def test_every_cause_has_concrete_remedies(cause):
    m = make_module("m", kind="LSTM", layers=1, gain=0.5, cause=cause)
    remedies = remedies_for(m, "vanishing")
    assert 1 <= len(remedies) <= 4
    assert len(set(remedies)) == len(remedies)


@pytest.mark.parametrize(
    ("kind", "own", "diagnostics"),
    [
        ("CfC", "mixed_memory=True", False),
        ("sLSTM", "small_init", False),
        ("CfC", "mixed_memory=True", True),
        ("sLSTM", "small_init", True),
    ],
)
def test_package_recurrences_get_their_own_remedies_not_a_gated_cell(kind, own, diagnostics):
    # hooked per step: gradwatch measures the factor but cannot split it into causes, so the
    # remedies come from the verdict's list, filtered by kind
    m = make_module(
        "rnn", kind=kind, layers=1, gain=0.5, verdict="vanishing", diagnostics=diagnostics
    )
    remedies = remedies_for(m, "vanishing")
    assert not any("gated cell" in r for r in remedies)  # it already is one
    assert not any("weight_hh" in r or "forget-gate bias to about" in r for r in remedies)
    assert any(own in r for r in remedies)
    # and the other kind's remedy is not offered
    other = "small_init" if kind == "CfC" else "mixed_memory"
    assert not any(other in r for r in remedies)


def test_the_cell_state_row_is_drawn_for_the_slstm_too():
    from gradwatch._outputs.tb_plugin.metadata import profile_rows

    assert "cell_total" in profile_rows("sLSTM") and "cell_total" in profile_rows("LSTMCell")
    assert "cell_total" not in profile_rows("CfC") and "cell_total" not in profile_rows("GRU")
