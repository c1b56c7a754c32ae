"""Checks shared by the integration tests (imported as ``integration_checks``: pytest puts
this folder on ``sys.path`` when it imports a test module from it)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def check_module_report(
    mr,
    *,
    kind: str,
    layers: int,
    steps: int,
    batch: int | None = None,
    exact: bool = True,
) -> None:
    """What every per-timestep report of a library's RNN must satisfy."""
    from gradwatch._analysis.report import VERDICTS

    assert mr.kind == kind, (mr.name, mr.kind)
    assert mr.num_layers == layers and mr.num_directions == 1
    for field in ("total", "carried", "direct"):
        t = getattr(mr, field)
        assert tuple(t.shape) == (layers, 1, steps), (mr.name, field, tuple(t.shape))
        assert torch.isfinite(t).all(), (mr.name, field)
        assert (t >= 0).all(), (mr.name, field)
    if kind == "LSTM":
        assert mr.cell_total is not None and tuple(mr.cell_total.shape) == (layers, 1, steps)
    assert mr.received_gradient
    assert mr.seq_len == steps
    assert tuple(mr.valid_samples.shape) == (steps,)
    if batch is not None:
        assert mr.valid_samples.tolist() == [batch] * steps
    # The gradient reaching h_t is carried back from h_{t+1} at every step but the last
    # (no library here uses the final state of the last call in its loss).
    assert (mr.carried[..., :-1] > 0).all(), (mr.name, mr.carried)
    assert (mr.total > 0).all(), (mr.name, mr.total)
    assert mr.verdict in VERDICTS and mr.verdict != "nonfinite"
    assert len(mr.verdicts) == layers and all(len(v) == 1 for v in mr.verdicts)
    assert mr.gain is not None and torch.isfinite(mr.gain).all()
    assert mr.horizon is not None and not torch.isnan(mr.horizon).any()
    assert mr.explanation is not None and mr.explain()
    if exact:
        assert mr.exact, (mr.name, mr.approximate_reason)
        assert mr.fidelity < 1e-4, (mr.name, mr.fidelity)
        assert mr.approximate_reason is None


def check_reports(cb, *, steps: int, names: set[str]) -> None:
    """One report per optimizer step (``every_n_steps=1``), each with the expected calls."""
    assert list(cb.reports) == list(range(steps)), list(cb.reports)
    for step, report in cb.reports.items():
        assert set(report) == names, (step, set(report), report.failures)
        assert not report.failures, (step, report.failures)
    assert set(cb.verdicts) == names
    assert all(v in ("healthy", "vanishing", "exploding") for v in cb.verdicts.values())
    sig = cb.signals
    assert sig, "no cheap signals were recorded"
    for s in sig:
        assert not s.nonfinite and not s.skipped
        assert all(math.isfinite(v) and v > 0 for v in s.grad_norm.values()), s


def gradwatch_scalar_tags(log_dir: Path) -> set[str]:
    """The ``gradwatch/...`` scalar tags written under a TensorBoard log folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent)).Reload()
        tags |= {t for t in acc.Tags()["scalars"] if t.startswith("gradwatch/")}
    return tags


def lstm_forget_bias_(lstm: torch.nn.LSTM, value: float) -> None:
    """Set the forget-gate bias of every layer of an ``nn.LSTM`` (gate order i, f, g, o)."""
    h = lstm.hidden_size
    with torch.no_grad():
        for layer in range(lstm.num_layers):
            getattr(lstm, f"bias_ih_l{layer}")[h : 2 * h].fill_(value)
            getattr(lstm, f"bias_hh_l{layer}")[h : 2 * h].fill_(0.0)


def assert_all_carried(mr, total, carried) -> None:
    """At positions without a direct gradient, everything reaching ``h_t`` was carried.

    For GRU and RNN the carried part *is* ``dL/dh_t``; for an LSTM ``carried`` is measured
    over the whole state, ``sqrt(|dL/dh_t|^2 + |dL/dc_t|^2)``, so it bounds ``total`` from
    above sample by sample (and so in the mean).
    """
    if mr.kind == "LSTM":
        assert (carried >= total * (1 - 1e-5)).all(), (total, carried)
    else:
        assert torch.allclose(total, carried, rtol=1e-5, atol=0), (total, carried)
