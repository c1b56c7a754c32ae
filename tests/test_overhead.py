"""The overhead budget wired into the monitor: options, schedule, reporting, figures.

No test here depends on real timing: the monitor's clock is replaced by a fake one that
only moves when a test says so. A training step advances it by ``TRAIN`` (outside
gradwatch), a capture by ``CAPTURE`` (inside gradwatch's analysis, so it is gradwatch's
own time), everything else of gradwatch's takes no time. The expected schedules follow from
the budget's rule (docs/overhead.md): step ``j`` is captured when what was spent plus the
expected cost of a capture is at most ``budget`` times the training time up to and
including step ``j``; before any capture the expected cost is 4 training steps.
"""

from __future__ import annotations

import itertools
import logging
import math
import pickle

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._engine import monitor as monitor_module
from gradwatch._engine.options import WatchOptions
from gradwatch._engine.signals import CheapSignals

L = pytest.importorskip("lightning.pytorch")

TRAIN = 10e-3  # seconds of training per step
CAPTURE = 45e-3  # seconds of gradwatch's own time per capture
BUDGET = 0.07
# first capture: 4 * 10 ms <= 0.07 * 10 ms * j  ->  j = 58 (57.1 rounded up); as an
# estimate it counts for at most the prior (it may hold one-time work): 45 ms spent + 40 ms
# expected: 85 ms <= 0.07 * 10 ms * j  ->  j = 122 (121.4); then the running average
# (40 + 45) / 2 ms: 90 + 42.5 = 132.5 ms  ->  j = 190 (189.3)
EXPECTED = [58, 122, 190]


class FakeClock:
    """A clock in nanoseconds that moves only when `advance` is called."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * 1e9)


@pytest.fixture
def clock(monkeypatch):
    """A fake clock, charged ``CAPTURE`` by every capture's analysis."""
    fake = FakeClock()
    real = monitor_module.analyze

    def analyze(raw, **kw):
        fake.advance(CAPTURE)
        return real(raw, **kw)

    monkeypatch.setattr(monitor_module, "analyze", analyze)
    return fake


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overhead_budget": 0}, "overhead_budget must be a fraction"),
        ({"overhead_budget": -0.01}, "overhead_budget must be a fraction"),
        ({"overhead_budget": 2}, r"overhead_budget .*0\.02 means 2%"),
        ({"overhead_budget": math.nan}, "overhead_budget"),
        ({"overhead_budget": "2%"}, "overhead_budget"),
        ({"overhead_budget": True}, "overhead_budget"),
        ({"overhead_budget": None}, "overhead_budget=None .*every_n_steps"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"figures": "yes"}, "figures must be 'auto', True or False"),
    ],
)
def test_invalid_budget_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradwatch.GradWatch(**kwargs)
    with pytest.raises(ValueError, match=match):
        gradwatch.Monitor(nn.GRU(2, 3), **kwargs)


def test_defaults_are_the_budget_and_auto_figures():
    o = WatchOptions()
    assert (o.overhead_budget, o.every_n_steps, o.figures) == (0.02, None, "auto")
    gw = gradwatch.GradWatch(overhead_budget=None, every_n_steps=5)
    assert (gw.overhead_budget, gw.every_n_steps) == (None, 5)
    assert WatchOptions.from_plain(gw.options.to_plain()) == gw.options


def test_options_pickled_before_the_budget_still_load():
    """A GradWatch pickled when every_n_steps defaulted to 100 (no overhead_budget, figures
    a bool) keeps that fixed schedule; the budget is measured alongside."""
    old = {
        "options": {
            "every_n_steps": 100,
            "include": None,
            "exclude": None,
            "spike_factor": 10.0,
            "warmup_steps": 10,
            "history": 100,
            "log_every_n_steps": None,
            "thresholds": None,
            "clip": None,
            "figures": True,
            "async_flags": None,
        },
        "state": gradwatch.GradWatch().state_dict(),
    }
    gw = gradwatch.GradWatch.__new__(gradwatch.GradWatch)
    gw.__setstate__(old)
    assert (gw.every_n_steps, gw.overhead_budget, gw.figures) == (100, 0.02, True)
    again = pickle.loads(pickle.dumps(gw))
    assert again.options == gw.options


# ------------------------------------------------------------------------ Monitor, core
def _gru_loop(mon, model, clock, steps, nan_steps=()):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        clock.advance(TRAIN)  # the training step's own time, outside gradwatch
        out, _ = model(torch.randn(6, 2, 3, generator=g))
        loss = out.pow(2).sum()
        if step in nan_steps:
            loss = loss * math.nan
        loss.backward()
        mon.step(opt)
        if step not in nan_steps:  # a NaN step is not applied: later steps are finite
            opt.step()
        opt.zero_grad()


def _monitor(clock, **kw):
    model = nn.GRU(3, 4)
    mon = gradwatch.Monitor(model, log_every_n_steps=10**6, **kw)
    mon._core._set_clock(clock)
    return mon, model


def test_monitor_captures_on_the_budgets_schedule(clock):
    mon, model = _monitor(clock, overhead_budget=BUDGET)
    with mon:
        _gru_loop(mon, model, clock, 200)
    assert list(mon.reports) == EXPECTED  # not at step 0: the first capture is paid for too
    o = mon.overhead
    assert isinstance(o, gradwatch.Overhead)
    assert o.captures == 3 and o.budget == BUDGET and o.signal_stride == 1
    assert o.spent_s == pytest.approx(3 * CAPTURE)
    assert o.training_s == pytest.approx(199 * TRAIN)  # the first interval has no start
    assert o.fraction == pytest.approx(3 * CAPTURE / (199 * TRAIN))
    assert o.fraction <= BUDGET


def test_a_forced_capture_happens_at_once_and_is_paid_from_the_budget(clock):
    mon, model = _monitor(clock, overhead_budget=BUDGET)
    with mon:
        _gru_loop(mon, model, clock, 200, nan_steps={20})
    # the non-finite step is flagged at once and the next step captured (on the CPU cheap
    # steps record nothing to replay), and its 45 ms are spent: the capture the budget
    # would have scheduled at 58 waits until 85 ms are affordable (122), as if the forced
    # one had been the first scheduled one (EXPECTED's arithmetic)
    assert list(mon.reports) == [21, *EXPECTED[1:]]
    signals = {s.step: s for s in mon.signals}
    assert signals[20].nonfinite and signals[20].captured is None
    assert signals[21].captured == "nonfinite"
    assert mon.overhead.captures == 3


def test_every_n_steps_overrides_the_captures_and_the_budget_is_still_measured(clock):
    mon, model = _monitor(clock, overhead_budget=BUDGET, every_n_steps=50)
    with mon:
        _gru_loop(mon, model, clock, 120)
    assert list(mon.reports) == [0, 50, 100]
    o = mon.overhead
    assert o.captures == 3 and o.spent_s == pytest.approx(3 * CAPTURE)
    assert o.training_s == pytest.approx(119 * TRAIN)


def test_hooks_step_work_and_outputs_count_as_gradwatchs_time(clock, monkeypatch, tmp_path):
    """Each piece of gradwatch's own work is on its clock: the forward hook (2 ms here),
    the gradient hook (1 ms; the GRU's outputs share one node), the step's signals
    (0.5 ms) and the panels written (3 ms); the rest of each interval is training."""
    from gradwatch._capture.families.fused import FusedFamily
    from gradwatch._capture.injected import InjectedGradients
    from gradwatch._outputs.panels import PanelWriter

    def costing(fn, seconds):
        def wrapper(*args, **kwargs):
            clock.advance(seconds)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(FusedFamily, "_on_call", costing(FusedFamily._on_call, 2e-3))
    monkeypatch.setattr(InjectedGradients, "_keep", costing(InjectedGradients._keep, 1e-3))
    monkeypatch.setattr(CheapSignals, "host_signals", costing(CheapSignals.host_signals, 0.5e-3))
    monkeypatch.setattr(PanelWriter, "write_scalars", costing(PanelWriter.write_scalars, 3e-3))
    model = nn.GRU(3, 4)
    mon = gradwatch.Monitor(
        model, every_n_steps=10**6, overhead_budget=None, log_every_n_steps=2, log_dir=tmp_path
    )
    mon._core._set_clock(clock)
    with mon:
        _gru_loop(mon, model, clock, 20)  # a capture at step 0 only (every 10**6 steps)
    o = mon.overhead
    per_step = 2e-3 + 0.5e-3
    light_hooks = 19 * 1e-3  # step 0, captured, takes its gradient through its recorded call
    # 10 logging steps
    assert o.spent_s == pytest.approx(20 * per_step + light_hooks + 10 * 3e-3 + CAPTURE)
    assert o.training_s == pytest.approx(19 * TRAIN)
    assert (o.budget, o.captures, o.signal_stride) == (None, 1, 1)


def test_expensive_signals_are_computed_on_a_stride(clock, monkeypatch):
    """Signals of 1 ms against a 10 ms step: with a 2% budget (half of it for the signals,
    0.1 ms a step) they are computed about every 10th step; the detector only sees those."""
    real = CheapSignals.host_signals

    def host_signals(self, *args, **kwargs):
        clock.advance(1e-3)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CheapSignals, "host_signals", host_signals)
    mon, model = _monitor(clock, overhead_budget=0.02, every_n_steps=10**6)
    with mon:
        _gru_loop(mon, model, clock, 60)
        updates = int(mon._core.detector.count.max())
    stride = mon.overhead.signal_stride
    assert 9 <= stride <= 11  # ceil(1 ms / 0.1 ms), up to rounding of the running averages
    steps = [s.step for s in mon.signals]
    assert steps[:2] == [0, 1]  # before the cost is known: every step
    assert {b - a for a, b in itertools.pairwise(steps[1:])} == {stride}
    assert updates == len(steps)  # the running levels only took the measured steps
    assert all(s.injected["GRU"] > 0 for s in mon.signals)  # never a partial accumulation


def test_a_nonfinite_step_while_the_budget_is_overdrawn_is_counted_not_captured(clock):
    mon, model = _monitor(clock, overhead_budget=BUDGET)
    with mon:
        _gru_loop(mon, model, clock, 200, nan_steps={20, 22})
    # 21 (the run's first non-finite step: always captured) spends 45 ms against 14.7 ms
    # allowed; 22's capture would overdraw further: counted, not captured
    assert 21 in mon.reports and 23 not in mon.reports
    signals = {s.step: s for s in mon.signals}
    assert signals[22].nonfinite and signals[23].captured is None
    assert mon.overhead.uncaptured == 1
    assert "1 spikes not captured" in mon.overhead.describe()


def test_quiet_steps_take_the_short_path_and_leave_the_same_history(clock, monkeypatch):
    """A step planned to record nothing closes in a few operations, and runs of them are
    planned at once; the signals, reports and budget are those of the full path."""
    from gradwatch._engine.signals import CheapSignals

    real_signals = CheapSignals.host_signals

    def host_signals(self, *args, **kwargs):  # 1 ms: more than their share, hence a stride
        clock.advance(1e-3)
        return real_signals(self, *args, **kwargs)

    monkeypatch.setattr(CheapSignals, "host_signals", host_signals)
    real = monitor_module.MonitorCore._finish_quiet
    runs = []
    for short in (True, False):
        torch.manual_seed(0)
        calls = []

        def finish_quiet(self, session, step, short=short, calls=calls, real=real):
            calls.append(step)
            return real(self, session, step) if short else None

        monkeypatch.setattr(monitor_module.MonitorCore, "_finish_quiet", finish_quiet)
        if not short:  # and every step planned on its own
            monkeypatch.setattr(monitor_module.MonitorCore, "_quiet_ahead", lambda self, step: 0)
        mon, model = _monitor(clock, overhead_budget=0.02)
        mon._core.meter.scheduler.max_stride = 7
        with mon:
            _gru_loop(mon, model, clock, 120)
        runs.append((mon, calls))
    (short, calls), (full, _) = runs
    assert len(calls) > 60  # most steps were quiet (signals every few steps)
    assert [(s.step, s.grad_norm, s.spike) for s in short.signals] == [
        (s.step, s.grad_norm, s.spike) for s in full.signals
    ]
    assert list(short.reports) == list(full.reports)
    a, b = short.overhead, full.overhead
    assert (a.captures, a.signal_stride, a.uncaptured) == (b.captures, b.signal_stride, 0)
    assert (a.spent_s, a.training_s) == pytest.approx((b.spent_s, b.training_s))
    assert short._core.meter.steps == full._core.meter.steps == 120


def test_a_budget_that_the_per_step_work_alone_exceeds_is_reported_once(clock, monkeypatch):
    """Per-step work of 0.5 ms against 10 ms steps is 5%, over a 2% budget: no capture can
    fit, and after 500 steps one warning says so and what to do."""
    core = monitor_module.MonitorCore
    for name in ("_measure", "_finish_quiet"):  # every step takes one of the two
        real = getattr(core, name)

        def costly(self, *args, real=real, **kwargs):
            clock.advance(0.5e-3)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(core, name, costly)
    mon, model = _monitor(clock, overhead_budget=0.02)
    with mon, pytest.warns(RuntimeWarning, match=r"5\.0% .*overhead_budget=0\.02") as caught:
        _gru_loop(mon, model, clock, 520)
    assert len([w for w in caught if "overhead_budget" in str(w.message)]) == 1
    assert mon.reports == {} and mon.overhead.fraction > 0.02


def test_monitor_close_logs_the_overhead_line(clock, caplog):
    mon, model = _monitor(clock, overhead_budget=BUDGET)
    _gru_loop(mon, model, clock, 60)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        mon.close()
        mon.close()  # idempotent: one line
    lines = [r.getMessage() for r in caplog.records if "gradwatch overhead" in r.getMessage()]
    expected = f"{100 * CAPTURE / (59 * TRAIN):.2f}% of training time"
    assert len(lines) == 1 and expected in lines[0] and "1 captures" in lines[0]
    assert "budget 7.0%" in lines[0]


# ------------------------------------------------------------------------------ Lightning
class LM(L.LightningModule):
    """A GRU language model whose training step takes ``TRAIN`` on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.GRU(8, 16)
        self.head = nn.Linear(16, 20)

    def training_step(self, batch, batch_idx):
        self.clock.advance(TRAIN)
        (x,) = batch
        out, _ = self.rnn(self.emb(x).transpose(0, 1))
        return nn.functional.cross_entropy(self.head(out).flatten(0, 1), x.T.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randint(0, 20, (64, 10), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4)


def test_lightning_with_its_default_tensorboard_logger(clock, tmp_path, caplog):
    """A real Trainer with its default TensorBoardLogger: the budget's schedule, the
    ``gradwatch/overhead`` scalar on logging steps, the tab's tensors and no figure (auto),
    and the overhead line in the end-of-training summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gw = gradwatch.GradWatch(overhead_budget=BUDGET)
    gw._core._set_clock(clock)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=200,
        callbacks=[gw],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.gradwatch"):
        trainer.fit(LM(clock), _data())
    assert list(gw.reports) == EXPECTED
    assert gw.overhead.captures == 3

    logdir = tmp_path / "lightning_logs" / "version_0"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    overhead = {e.step: e.value for e in acc.Scalars("gradwatch/overhead")}
    assert sorted(overhead) == [0, 50, 100, 150]  # the Trainer's log_every_n_steps
    # written before the step's own accounting: what was spent over steps 1..s-1
    assert overhead[0] == 0.0 and overhead[50] == 0.0
    assert overhead[100] == pytest.approx(CAPTURE / (99 * TRAIN), rel=1e-6)
    assert overhead[150] == pytest.approx(2 * CAPTURE / (149 * TRAIN), rel=1e-6)
    assert max(overhead.values()) <= BUDGET
    assert acc.Tags()["images"] == []  # figures="auto": the gradwatch tab draws them
    tensors = set(acc.Tags()["tensors"])
    assert {"gradwatch/rnn/profiles", "gradwatch/rnn/diagnosis"} <= tensors
    assert [e.step for e in acc.Tensors("gradwatch/rnn/profiles")] == EXPECTED

    summary = [r.getMessage() for r in caplog.records if r.name == "lightning.pytorch.gradwatch"]
    assert len(summary) == 1
    assert "gradwatch overhead" in summary[0] and "3 captures" in summary[0]
    assert f"{100 * 3 * CAPTURE / (199 * TRAIN):.2f}% of training time" in summary[0]


def test_figures_true_still_renders_for_tensorboard(clock, tmp_path):
    gw = gradwatch.GradWatch(every_n_steps=2, figures=True)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        callbacks=[gw],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LM(clock), _data())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    acc.Reload()
    assert "gradwatch/rnn/profile" in acc.Tags()["images"]


def test_checkpoint_of_the_old_default_schedule_loads_into_the_budget_default(tmp_path):
    """Checkpoints written when every_n_steps defaulted to 100 keep their state under that
    configuration's state_key; GradWatch() (budget) still finds it."""
    clock = FakeClock()
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    old = gradwatch.GradWatch(every_n_steps=100)
    kw = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)
    L.Trainer(max_steps=4, callbacks=[old, ckpt], **kw).fit(LM(clock), _data())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][old.state_key]

    new = gradwatch.GradWatch()
    assert new.state_key != old.state_key
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["ema"] = new._core.detector.ema.clone()

    trainer = L.Trainer(max_steps=6, callbacks=[new, Probe(), ckpt], **kw)
    trainer.fit(LM(clock), _data(), ckpt_path=tmp_path / "last.ckpt")
    assert torch.equal(seen["ema"], saved["ema"])


# -------------------------------------------------------------------------------- panels
def test_auto_figures_are_rendered_less_often_without_tensorboard():
    from test_outputs_panels import ImageLogger, small_reports

    logger = ImageLogger()
    panels = gradwatch.PanelWriter(logger, figures="auto")
    assert not panels.tab_draws_profiles
    for step, report in small_reports(range(0, 120, 10)):
        panels.write(step, report)
    assert sorted({s for _, _, s in logger.images}) == [0, 50, 100]  # every 5th write
    always = ImageLogger()
    panels = gradwatch.PanelWriter(always, figures=True)
    for step, report in small_reports(range(0, 30, 10)):
        panels.write(step, report)
    assert sorted({s for _, _, s in always.images}) == [0, 10, 20]


# ------------------------------------------------------------------------------------ DDP
def test_ranks_that_measure_differently_decide_alike():
    """Two ranks' meters (the all_reduce done by hand): they measure different times, yet
    after agreeing on logging steps they decide the same captures and signal steps."""
    from gradwatch._engine.accounting import BudgetMeter

    ranks = [BudgetMeter(0.1, None), BudgetMeter(0.1, None)]
    clocks = [FakeClock(), FakeClock()]
    for meter, c in zip(ranks, clocks, strict=True):
        meter.set_distributed(True)
        meter.clock = c
    costs = [(10e-3, 0.2e-3, 30e-3), (14e-3, 0.5e-3, 50e-3)]  # train, signals, capture
    decided: list[list[tuple[bool, bool]]] = [[], []]
    plan = [(False, True), (False, True)]
    for step in range(300):
        for r, (meter, c) in enumerate(zip(ranks, clocks, strict=True)):
            captured, signals = plan[r]
            train, signal, capture = costs[r]
            c.advance(train)
            meter.add(round((capture if captured else signal if signals else 0.0) * 1e9))
            c.advance(capture if captured else signal if signals else 0.0)
            meter.end_step(0, captured=captured, signals=signals, sync=False)
        if step % 20 == 0:  # a logging step: the ranks' all_reduce
            summed = [
                [a + b for a, b in zip(ra, rb, strict=True)]
                for ra, rb in zip(*(m.local_measurements() for m in ranks), strict=True)
            ]
            for meter in ranks:
                meter.agree(summed)
        for r, meter in enumerate(ranks):
            s = meter.scheduler
            plan[r] = (s.capture_next(step + 1), s.signals_next())
            decided[r].append(plan[r])
    assert decided[0] == decided[1]
    assert any(c for c, _ in decided[0])  # captures were scheduled
    assert ranks[0].overhead() == ranks[1].overhead()
    # the agreed account sits between the two ranks' own
    local = [m._local.overhead().fraction for m in ranks]
    assert min(local) <= ranks[0].overhead().fraction <= max(local) * 1.2
