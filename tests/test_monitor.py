"""gradwatch.Monitor and the shared core: schedule, cheap signals, merging, AMP, safety, state."""

from __future__ import annotations

import copy
import gc
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import gradwatch
from gradwatch._capture import recorder as tracing
from gradwatch._capture.families import fused as fused_family
from gradwatch._engine.merge import merge_module_reports
from gradwatch._engine.monitor import MonitorCore
from gradwatch._engine.options import WatchOptions


class LM(nn.Module):
    def __init__(self, kind: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = kind(8, 16, num_layers=2)
        self.head = nn.Linear(16, 20)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out)


class CellLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.cell = nn.GRUCell(8, 16)
        self.head = nn.Linear(16, 20)

    def forward(self, x):
        h = torch.zeros(x.shape[1], 16)
        outs = []
        for t in range(x.shape[0]):
            h = self.cell(self.emb(x[t]), h)
            outs.append(h)
        return self.head(torch.stack(outs))


class TwoRNNs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.a = nn.GRU(8, 8)
        self.b = nn.LSTM(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, x):
        out, _ = self.a(self.emb(x))
        out, _ = self.b(out)
        return self.head(out)


def _batches(n: int, seed: int = 1, t: int = 10, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 20, (t, b), generator=g) for _ in range(n)]


def _loss(model, x, scale: float = 1.0):
    return nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()) * scale


def _train(model, mon=None, steps=6, lr=0.1, scales=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for i, x in enumerate(_batches(steps)):
        _loss(model, x, 1.0 if scales is None else scales.get(i, 1.0)).backward()
        if mon is not None:
            mon.step(opt)
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("factory", [lambda: LM(nn.LSTM), lambda: LM(nn.GRU), CellLoop])
def test_weights_bit_identical_with_monitor(factory):
    """Capturing every other step (cheap signals in between) must not change one bit."""
    torch.manual_seed(0)
    model = factory()
    twin = copy.deepcopy(model)
    with gradwatch.Monitor(model, every_n_steps=2, log_every_n_steps=1) as mon:
        _train(model, mon)
    _train(twin)
    assert list(mon.reports) == [0, 2, 4]
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_schedule_and_cheap_signals():
    torch.manual_seed(0)
    model = LM()
    with gradwatch.Monitor(
        model, every_n_steps=3, overhead_budget=None, log_every_n_steps=2
    ) as mon:
        _train(model, mon, steps=7)
        assert len(mon._core._pending) == 0  # step 6 was a logging and a capture step
    assert list(mon.reports) == [0, 3, 6]
    sig = mon.signals
    assert [s.step for s in sig] == list(range(7))
    scheduled = [None if i % 3 else "scheduled" for i in range(7)]
    assert [s.captured for s in sig] == scheduled
    for s in sig:
        assert s.injected["rnn"] > 0 and s.grad_norm["rnn"] > 0
        assert not (s.spike or s.nonfinite or s.skipped)
    m = mon.reports[3]["rnn"]
    assert m.total.shape == (2, 1, 10) and m.gain is not None
    assert m.verdict in gradwatch._analysis.report.VERDICTS


def test_grad_norm_signal_is_the_module_parameter_gradient_norm():
    torch.manual_seed(0)
    model = LM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.Monitor(model, every_n_steps=100, log_every_n_steps=1) as mon:
        x = _batches(1)[0]
        out, _ = model.rnn(model.emb(x))
        r = torch.randn_like(out)
        (out * r).sum().backward()
        mon.step(opt)
    expected = torch.linalg.vector_norm(
        torch.stack([p.grad.double().norm() for p in model.rnn.parameters()])
    )
    s = mon.signals[0]
    # on the CPU each tensor's norm is accumulated in float32 (float64 out of its safe range)
    assert s.grad_norm["rnn"] == pytest.approx(float(expected), rel=1e-6)
    assert s.injected["rnn"] == pytest.approx(float(r.double().norm()), rel=1e-6)


def test_captured_report_equals_a_trace_of_the_same_step():
    torch.manual_seed(0)
    model = LM(nn.GRU)
    twin = copy.deepcopy(model)
    x = _batches(1)[0]
    with gradwatch.Monitor(model, every_n_steps=1) as mon:
        _loss(model, x).backward()
        rep = mon.step()
    with gradwatch.trace(twin) as tr:
        _loss(twin, x).backward()
    a, b = rep["rnn"], tr.report()["rnn"]
    for f in ("total", "carried", "direct", "gain", "horizon"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_accumulation_merges_micro_batches_like_one_batch():
    """Two micro-batches of different lengths (packed) merge into exactly the profile of one
    batch holding all their samples: per-step means weighted by the valid samples."""
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 5)
    seqs = [torch.randn(n, 3) for n in (7, 3, 5, 2, 6)]
    r = torch.randn(7, 5)

    def loss(batch):
        out, _ = rnn(pack_sequence(batch, enforce_sorted=False))
        return sum((o * r[: o.shape[0]]).sum() for o in _unpack(out, len(batch)))

    with gradwatch.Monitor(rnn, every_n_steps=1) as mon:
        loss(seqs[:2]).backward()
        loss(seqs[2:]).backward()
        merged = mon.step()["LSTM"]
    with gradwatch.trace(rnn) as tr:
        loss(seqs).backward()
    whole = tr.report()["LSTM"]
    assert torch.equal(merged.valid_samples, whole.valid_samples)
    for f in ("total", "carried", "direct", "cell_total"):
        torch.testing.assert_close(getattr(merged, f), getattr(whole, f), rtol=1e-5, atol=1e-7)


def _unpack(packed, n):
    from torch.nn.utils.rnn import unpack_sequence

    return unpack_sequence(packed)[:n]


def test_merge_keeps_nonfinite_and_worst_diagnostics():
    torch.manual_seed(0)
    rnn = nn.RNN(2, 3)
    x = torch.randn(4, 2, 2)
    with gradwatch.trace(rnn) as tr:
        out, _ = rnn(x)
        out.sum().backward()
    good = tr.report()["RNN"]
    bad = good.__class__(**{**good.__dict__, "verdict": "exploding", "name": "x"})
    bad = type(good)(**{**bad.__dict__, "total": good.total * float("nan")})
    merged = merge_module_reports([good, bad], "RNN")
    assert merged.name == "RNN" and merged.verdict == "exploding"
    assert merged.total.isnan().all()
    assert merged.valid_samples.tolist() == [4, 4, 4, 4]


def test_spike_is_flagged_at_once_and_captured_at_the_next_step_on_cpu():
    torch.manual_seed(0)
    model = LM()
    with gradwatch.Monitor(model, every_n_steps=1000, overhead_budget=None, warmup_steps=3) as mon:
        _train(model, mon, steps=9, lr=0.0, scales={6: 1e4})
    # cheap steps record nothing: the flag read at step 6 plans the capture of step 7
    assert list(mon.reports) == [0, 7]
    s = {x.step: x for x in mon.signals}
    assert s[6].spike and s[6].captured is None
    assert s[7].captured == "spike"
    assert not any(s[i].spike for i in range(6))
    # the spike does not poison the running level: step 7 (normal again) is no spike
    assert not s[7].spike and not s[8].spike and s[8].captured is None


def test_spike_with_async_flags_is_captured_two_steps_later():
    torch.manual_seed(0)
    model = LM()
    with gradwatch.Monitor(
        model, every_n_steps=1000, overhead_budget=None, warmup_steps=3, async_flags=True
    ) as mon:
        _train(model, mon, steps=9, lr=0.0, scales={5: 1e4})
    assert list(mon.reports) == [0, 7]
    assert {s.step: s.captured for s in mon.signals}[7] == "spike"


def test_nonfinite_gradient_is_captured_and_flagged():
    torch.manual_seed(0)
    model = LM(nn.GRU)
    with gradwatch.Monitor(model, every_n_steps=1000, overhead_budget=None) as mon:
        _train(model, mon, steps=4, lr=0.0, scales={2: float("nan")})
    # flagged at step 2, captured at step 3 (lr=0 with momentum still turns the weights to
    # NaN after step 2, so step 3 is non-finite too)
    assert list(mon.reports) == [0, 3]
    assert mon.reports[3]["rnn"].verdict == "nonfinite"
    assert mon.verdicts["rnn"] == "nonfinite"
    s = {x.step: x for x in mon.signals}
    assert s[2].nonfinite and s[2].captured is None and not s[2].skipped
    assert s[3].captured == "nonfinite"


def test_internal_error_disables_only_that_module(monkeypatch):
    real = fused_family.capture_call

    def failing(call, *args, **kwargs):
        if call.module_name == "b":
            raise RuntimeError("boom")
        return real(call, *args, **kwargs)

    monkeypatch.setattr(fused_family, "capture_call", failing)
    torch.manual_seed(0)
    model = TwoRNNs()
    twin = copy.deepcopy(model)
    with (
        pytest.warns(RuntimeWarning, match=r"'b'.*boom") as rec,
        gradwatch.Monitor(model, every_n_steps=1) as mon,
    ):
        _train(model, mon, steps=4)
    assert sum("boom" in str(w.message) for w in rec) == 1  # warned once
    assert "b" in mon.reports[0].failures
    assert list(mon.reports[3]) == ["a"]  # still watching a, no longer b
    assert "b" in mon._core.disabled
    _train(twin, steps=4)
    pairs = zip(model.parameters(), twin.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"spike_factor": 1.0}, "spike_factor"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"history": 0}, "history"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"include": [3]}, "include"),
        ({"exclude": 3}, "exclude"),
        ({"thresholds": {"patience": 2}}, "thresholds"),
        ({"scaler": object()}, "scaler"),
        ({"async_flags": "yes"}, "async_flags"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gradwatch.Monitor(LM(), **kwargs)


def test_no_recurrent_module_warns_with_what_was_searched():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.warns(RuntimeWarning, match=r"no recurrent module found in Sequential.*3 modules"):
        mon = gradwatch.Monitor(model)
    with mon:
        model(torch.randn(2, 3)).sum().backward()
        assert mon.step() is None  # nothing to do, nothing breaks


def test_close_removes_every_hook_and_history_is_bounded():
    torch.manual_seed(0)
    model = TwoRNNs()
    mon = gradwatch.Monitor(model, every_n_steps=1, history=2, log_every_n_steps=1)
    assert model.a._forward_hooks and model._forward_pre_hooks
    _train(model, mon, steps=25)
    assert list(mon.reports) == [23, 24]
    assert len(mon.signals) == 20
    mon.close()
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    gc.collect()  # recorders of monitors other tests dropped unclosed go with them
    assert not tracing.active_recorders()
    assert mon._core.session is None


def test_state_dict_is_weights_only_loadable_and_restores_the_detector():
    torch.manual_seed(0)
    model = LM()
    with gradwatch.Monitor(model, every_n_steps=2, overhead_budget=None, warmup_steps=1) as mon:
        _train(model, mon, steps=5)
        state = mon.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    with gradwatch.Monitor(model, every_n_steps=2, overhead_budget=None) as fresh:
        fresh.load_state_dict(loaded)
        assert fresh.global_step == 5
        assert torch.equal(fresh._core.detector.ema, mon._core.detector.ema)
        assert torch.equal(fresh._core.detector.count, mon._core.detector.count)
        assert fresh.verdicts == mon.verdicts
        assert [s.step for s in fresh.signals] == list(range(5))
        _train(model, fresh, steps=2)
        assert list(fresh.reports) == [6]  # the schedule continues from step 5
    with pytest.raises(ValueError, match="monitor state"):
        fresh.load_state_dict({"foo": 1})


def test_grad_scaler_gradients_are_unscaled_and_skipped_steps_reported():
    """fp32 with a power-of-two GradScaler: the scaled gradients are exact multiples, so the
    captured profiles must equal the unscaled run's exactly after division."""
    torch.manual_seed(0)
    model = CellLoop()
    twin = copy.deepcopy(model)
    x = _batches(1)[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.Monitor(model, every_n_steps=1, scaler=scaler, log_every_n_steps=1) as mon:
        scaler.scale(_loss(model, x)).backward()
        scaler.unscale_(opt)
        rep = mon.step(opt)
        scaler.step(opt)
        scaler.update()
    with gradwatch.Monitor(twin, every_n_steps=1, log_every_n_steps=1) as ref_mon:
        _loss(twin, x).backward()
        ref = ref_mon.step()
    for f in ("total", "carried", "direct"):
        assert torch.equal(getattr(rep["cell"], f), getattr(ref["cell"], f)), f
    assert mon.signals[0].grad_norm["cell"] == pytest.approx(ref_mon.signals[0].grad_norm["cell"])
    assert mon.signals[0].injected == {} and not mon.signals[0].skipped

    # a scale so large the scaled gradients overflow: the scaler skips, gradwatch says so
    model2 = LM(nn.GRU)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    opt = torch.optim.SGD(model2.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model2.parameters()]
    with gradwatch.Monitor(model2, every_n_steps=1, scaler=scaler, log_every_n_steps=1) as mon:
        scaler.scale(_loss(model2, x, 1e30)).backward()
        scaler.unscale_(opt)
        mon.step(opt)
        scaler.step(opt)
        scaler.update()
    pairs = zip(before, model2.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)  # the scaler skipped the step
    s = mon.signals[0]
    assert s.skipped and not s.nonfinite and s.captured == "scheduled"
    assert mon.verdicts == {}  # a skipped step does not feed the verdicts
    assert not math.isfinite(s.grad_norm["rnn"])


def test_core_is_picklable_before_and_after_use():
    import pickle

    core = MonitorCore(WatchOptions(every_n_steps=3))
    model = LM()
    core.bind(model)
    core.attach()
    clone = pickle.loads(pickle.dumps(core))
    assert clone.session is None and clone.every_n_steps == 3
    core.close()


def _random_signals(steps: int, m: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        values = 10 ** (torch.randn(2, m, generator=g, dtype=torch.float64) * 0.3)
        values[:, 0] *= 100.0 if s in (15, 16) else 1.0  # a spike, then a second one
        present = (torch.rand(2, m, generator=g) > 0.2).double()
        if s == 20:
            values[1, 1] = math.inf
        if s == 21:
            values[0, 2] = math.nan
        if s == 22:
            values[0, 1] = 0.0  # log10 = -inf: neither a spike nor an update
        out.append(torch.cat([values * present, present]))
    return out


@pytest.mark.parametrize("amp", [False, True])
def test_host_and_device_detectors_take_the_same_decisions(amp):
    """The CPU path (Python floats) and the device path (tensor ops) of the spike detector
    implement the same arithmetic: same flags at every step, same running levels."""
    from gradwatch._engine.detector import SpikeDetector

    host, device = SpikeDetector(10.0, 5), SpikeDetector(10.0, 5)
    found = torch.tensor(0.0)
    for sig in _random_signals(30, 3, seed=1):
        a = host.update_host(sig.tolist(), amp, found)
        b = device.update(sig, amp, found).tolist()
        assert list(a) == [bool(v) for v in b]
    assert torch.equal(host.count, device.count)
    torch.testing.assert_close(host.ema, device.ema, rtol=1e-14, atol=1e-14)
    # levels loaded into either path carry over
    other = SpikeDetector(10.0, 5)
    other.load(device.ema, device.count, torch.device("cpu"), host=True)
    assert torch.equal(other.count, device.count)


def test_cpu_parameter_norm_survives_float32_overflow_and_underflow():
    """CPU norms are accumulated in float32 and redone in float64 out of float32's range."""
    from gradwatch._capture.norms import host_norms

    g = torch.full((1000,), 1e20)
    tiny = torch.full((1000,), 1e-25)
    normal = torch.randn(1000)
    got = host_norms([g, tiny, normal, normal.double()])
    want = [float(torch.linalg.vector_norm(t, dtype=torch.float64)) for t in (g, tiny, normal)]
    assert got[:3] == pytest.approx(want, rel=1e-6)
    assert got[3] == float(torch.linalg.vector_norm(normal.double()))
    with gradwatch.Monitor(nn.GRU(4, 4), every_n_steps=100, log_every_n_steps=1) as mon:
        rnn = mon.model
        out, _ = rnn(torch.randn(3, 2, 4))
        (out.sum() * 1e22).backward()
        mon.step()
    ref = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in rnn.parameters()]))
    assert mon.signals[0].grad_norm["GRU"] == pytest.approx(float(ref), rel=1e-6)
    assert math.isfinite(mon.signals[0].injected["GRU"])
