"""Bounded replay memory (`gradwatch._capture.layered`): large calls are replayed one layer at a
time, lower layers recomputed before their walk, walked layers compacted. The statistics are
bit for bit those of the replay that holds every layer, and the bytes held are counted with
the C allocator's own statistics (``mallinfo2``), not timed."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from gradwatch._analysis import analyze
from gradwatch._analysis.quantities import causes
from gradwatch._capture import fused, layered, lstm
from gradwatch._capture.families.fused import capture_call


def _call(module: nn.RNNBase, packed: bool, steps: int = 9, batch: int = 3):
    torch.manual_seed(4)
    x = torch.randn(steps, batch, module.input_size)
    lengths = torch.linspace(steps, 2, batch).round().long()
    inp = pack_padded_sequence(x, lengths) if packed else x
    out, state = module(inp)
    out_t = out.data if packed else out
    call = fused.record_fused_call("m", "m", module, (inp,), {}, (out, state))
    assert call is not None
    slots = {"out": out_t, "h_n": state[0] if isinstance(state, tuple) else state}
    if isinstance(state, tuple):
        slots["c_n"] = state[1]
    loss = out_t.pow(2).sum() + slots["h_n"].sum() + slots.get("c_n", out_t).mean()
    grads = torch.autograd.grad(loss, list(slots.values()))
    call.grads = dict(zip(slots, grads, strict=True))
    return call


def _report(call, monkeypatch, large: bool):
    """The report with the large-call paths forced on (or off) at a small size."""
    monkeypatch.setattr(layered, "RECOMPUTE_ABOVE", 0 if large else 2**62)
    monkeypatch.setattr(lstm, "BUFFERED_ABOVE", 0 if large else 2**62)
    causes._warm.clear()  # the power iterations start from the same vector both times
    return analyze(capture_call(call))


CONFIGS = [
    (lambda: nn.LSTM(5, 8, num_layers=3), False),
    (lambda: nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=4), True),
    (lambda: nn.GRU(5, 8, num_layers=2, bidirectional=True), False),
    (lambda: nn.RNN(5, 8, num_layers=2, nonlinearity="relu"), True),
]


@pytest.mark.parametrize(("factory", "packed"), CONFIGS)
def test_layer_at_a_time_replay_gives_the_same_report(factory, packed, monkeypatch):
    call = _call(factory(), packed)
    held = _report(call, monkeypatch, large=False)
    again = _report(call, monkeypatch, large=True)
    assert held.exact and again.exact and held.gain is not None and held.causes is not None
    # the statistics: equal up to float32 rounding (a walk with probe rows alongside runs
    # its products over more rows); the causes: bit for bit (the same forward replay)
    for name in ("total", "carried", "direct", "cell_total", "valid_samples"):
        a, b = getattr(held, name), getattr(again, name)
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-6, atol=0), name
    for f in dataclasses.fields(held.causes):
        a, b = getattr(held.causes, f.name), getattr(again.causes, f.name)
        if isinstance(a, dict):
            assert all(torch.equal(a[k], b[k]) for k in a), f.name
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), f.name
    # the propagation: probes walked alongside the replay (held) or step by step (large),
    # equal up to float32 rounding
    torch.testing.assert_close(held.propagation, again.propagation, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(held.gain, again.gain, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("factory", "packed"), CONFIGS)
def test_recomputed_lower_layers_give_bit_identical_statistics(factory, packed, monkeypatch):
    call = _call(factory(), packed)
    with torch.no_grad():
        held = fused.replay(call, recompute=False)
        again = fused.replay(call, recompute=True)
    assert held.stats.keys() == again.stats.keys()
    for name, value in held.stats.items():
        assert torch.equal(value, again.stats[name]), name
    assert torch.equal(held.fidelity, again.fidelity)


def test_only_large_calls_are_replayed_a_layer_at_a_time():
    assert layered.recomputes(nn.LSTM(512, 512, num_layers=2), 1000, 32, 4)
    assert not layered.recomputes(nn.LSTM(1, 25), 48, 32, 4)  # the darts RNNModel shape
    assert not layered.recomputes(nn.LSTM(64, 256, num_layers=2), 64, 32, 4)  # reference LM
    lstm_layer = 11 * 512 * 32 * 1000 * 4  # values per unit and step x H x B x T x bytes
    assert layered.trajectory_bytes(nn.LSTM(512, 512, 2), 1000, 32, 4) == lstm_layer


def test_walked_layers_are_compacted_and_rebuilt_only_when_walked_again(monkeypatch):
    call = _call(nn.LSTM(5, 8, num_layers=3), packed=False)
    rep = fused.replay(call, probes=True, recompute=True)
    held = fused.replay(call, probes=True, recompute=False)
    assert sorted(rep.recurrences) == [(0, 0), (1, 0), (2, 0)] == sorted(rep.walked)
    for key, lazy in rep.recurrences.items():
        assert isinstance(lazy, layered.LazyRecurrence)
        inner = lazy._weights_of
        assert all(not isinstance(v, torch.Tensor) for k, v in vars(inner).items() if k != "w")
        assert lazy._full is None  # nothing replayed again yet
        dh = torch.randn(3, 8, dtype=torch.float32)
        dc = torch.randn(3, 8, dtype=torch.float32)
        got = lazy.step_back(4, dh, dc, None)
        want = held.recurrences[key].step_back(4, dh, dc, None)
        assert lazy._full is not None  # replayed again, from the layer's inputs
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _allocated_bytes():
    """Bytes the C allocator holds for the program now (glibc), or None elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2

    def held() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return held


class _PeakBytes(TorchDispatchMode):
    """Peak of the bytes allocated (and not yet freed) since entering, sampled after every
    tensor operation."""

    def __init__(self, held) -> None:
        super().__init__()
        self.held, self.base, self.peak = held, held(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.held() - self.base)
        return out


def _peak(held, fn) -> int:
    # Garbage left by earlier tests, freed while ``fn`` runs, would lower the count below
    # the base: collect it first and keep the collector off while measuring.
    gc.collect()
    gc.disable()
    try:
        with _PeakBytes(held) as mode:
            fn()
    finally:
        gc.enable()
    return mode.peak


def test_a_large_capture_holds_less_than_the_training_step(monkeypatch):
    held = _allocated_bytes()
    if held is None:
        pytest.skip("needs glibc's mallinfo2 to count allocated bytes")
    torch.manual_seed(0)
    module = nn.LSTM(64, 64, num_layers=3)
    x, r = torch.randn(200, 16, 64), torch.randn(200, 16, 64)

    def step() -> None:
        out, (h_n, _) = module(x)
        ((out * r).sum() + h_n.sum()).backward()

    step()  # warm-up: first calls allocate workspaces once
    module.zero_grad(set_to_none=True)
    step_peak = _peak(held, step)
    out, state = module(x)
    call = fused.record_fused_call("m", "m", module, (x,), {}, (out, state))
    assert call is not None
    grads = torch.autograd.grad((out * r).sum() + state[0].sum(), [out, state[0]])
    call.grads = {"out": grads[0], "h_n": grads[1]}
    monkeypatch.setattr(lstm, "BUFFERED_ABOVE", 0)  # as for a large call
    with torch.no_grad():
        all_held = _peak(held, lambda: fused.replay(call, probes=True, recompute=False))
        one_layer = _peak(held, lambda: fused.replay(call, probes=True, recompute=True))
    layer = layered.trajectory_bytes(module, 200, 16, 4)
    # every layer held at once holds the three trajectories; one layer at a time, about one
    # layer's trajectory and the walk's buffers, so at least 1.5 of the two other layers'
    # trajectories are saved (measured: 2.3 to 4 of them, depending on the allocator's state)
    assert all_held > 3 * layer
    assert all_held - one_layer > 1.5 * layer
    assert one_layer <= 0.5 * step_peak  # the bound (measured: 0.25 to 0.29)
    assert one_layer < 2.5 * layer


@pytest.mark.parametrize("bidirectional", [False, True])
def test_stacked_lstm_walk_gives_the_same_report_as_the_in_place_walk(bidirectional, monkeypatch):
    """Mid-sized LSTM calls stack fresh per-step results (`lstm.IN_PLACE_UP_TO`); small ones
    write into whole-sequence buffers. Both walks are the same arithmetic: the statistics, the
    propagation and dL/dx agree up to float32 rounding (products into differently aligned
    memory may round differently), and both are exact."""
    module = nn.LSTM(5, 8, num_layers=2, bidirectional=bidirectional)
    call = _call(module, packed=False, steps=40, batch=3)  # past one probe block (16 steps)
    reports, grads = [], []
    for limit in (2**62, 0):
        monkeypatch.setattr(lstm, "IN_PLACE_UP_TO", limit)
        causes._warm.clear()
        reports.append(analyze(capture_call(call)))
        grads.append(fused.replay(call, input_grad=True).grad_input)
    held, stacked = reports
    assert held.exact and stacked.exact and held.gain is not None
    for name in ("total", "carried", "direct", "cell_total"):
        torch.testing.assert_close(getattr(held, name), getattr(stacked, name), rtol=1e-6, atol=0)
    torch.testing.assert_close(held.propagation, stacked.propagation, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
