"""Unit probes walked alongside the replay's backward walk (`gradwatch._capture.probes`):
the same log norms as the step-by-step walk, and a step-by-step walk where a block's range
is not safe for the dtype."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradwatch._capture import fused, probes
from gradwatch._capture import replay as replay_module
from tests.test_diagnostics import _linear_relu_rnn, _trace_last_step_loss


def _call(module: nn.RNNBase, packed: bool, steps: int = 40, batch: int = 5):
    torch.manual_seed(1)
    x = torch.randn(steps, batch, module.input_size, dtype=module.weight_ih_l0.dtype)
    lengths = torch.linspace(steps, 3, batch).round().long()
    inp = pack_padded_sequence(x, lengths) if packed else x
    out, state = module(inp)
    out_t = out.data if packed else out
    call = fused.record_fused_call("m", "m", module, (inp,), {}, (out, state))
    assert call is not None
    (g,) = torch.autograd.grad(out_t.pow(2).sum(), [out_t])
    call.grads = {"out": g}
    return call


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("factory", "packed"),
    [
        (lambda: nn.LSTM(3, 6, num_layers=2), False),  # the LSTM's own fast walk
        (lambda: nn.LSTM(3, 6, bidirectional=True), True),  # the generic walk, masked
        (lambda: nn.GRU(3, 6, bidirectional=True), False),
        (lambda: nn.RNN(3, 6), True),
    ],
)
def test_probes_walked_alongside_equal_the_step_by_step_walk(factory, packed, dtype):
    call = _call(factory().to(dtype), packed)
    with torch.no_grad():
        rep = fused.replay(call, probes=True, recompute=False)
    assert rep.walked.keys() == rep.recurrences.keys()
    for key, logs in rep.walked.items():
        rec = rep.recurrences[key]
        batch = rep.lengths.numel()
        unit = probes.unit_probes(batch, rec.state_sizes, rec.weight.device, rec.weight.dtype)
        last = probes.last_steps(rec.reverse, rep.lengths, rec.steps)
        with torch.no_grad():
            slow = probes.walk(rec, rep.valid, last, unit)
        valid = torch.ones_like(last) if rep.valid is None else rep.valid
        mask = valid.unsqueeze(0).expand_as(logs)
        tol = 1e-5 if dtype == torch.float32 else 1e-11
        torch.testing.assert_close(logs[mask], slow[mask], rtol=tol, atol=tol)
        assert torch.all(logs[last.unsqueeze(0).expand_as(logs)] == 0)  # probes start at 1


def test_a_walk_beyond_the_safe_range_of_a_block_is_redone_step_by_step(monkeypatch):
    # a linear ReLU RNN growing 100x per step: 1e32 over a block of 16 steps in float32
    # (short enough for its forward to stay finite)
    rho = 100.0
    rnn = _linear_relu_rnn(rho).float()
    steps_walked = []
    original = replay_module.walk_probes

    def counting(*args):
        steps_walked.append(args[0].steps)
        return original(*args)

    monkeypatch.setattr(replay_module, "walk_probes", counting)
    m = _trace_last_step_loss(rnn, torch.rand(18, 4, 3))["RNN"]
    assert steps_walked == [18]  # redone step by step
    k = torch.arange(18, dtype=torch.float64)
    assert torch.allclose(m.propagation[0, 0].double(), k * math.log10(rho), rtol=1e-5)
    assert m.gain[0, 0].item() == pytest.approx(rho, rel=1e-5)


def test_probes_on_a_few_samples_beyond_the_safe_range_are_redone_step_by_step(monkeypatch):
    rho = 100.0
    rnn = _linear_relu_rnn(rho).float()
    monkeypatch.setattr(probes, "SUBSET_FROM", 1)  # this state counts as large
    walked = []
    original = replay_module.walk_probes

    def counting(rec, valid, last, unit):
        walked.append((rec.steps, last.shape[1], unit[0].shape[1]))
        return original(rec, valid, last, unit)

    monkeypatch.setattr(replay_module, "walk_probes", counting)
    m = _trace_last_step_loss(rnn, torch.rand(18, 12, 3))["RNN"]
    assert walked == [(18, 8, 8)]  # 8 of the 12 samples, redone step by step
    assert m.gain[0, 0].item() == pytest.approx(rho, rel=1e-5)


def test_a_walk_within_range_is_not_redone(monkeypatch):
    rnn = _linear_relu_rnn(0.9).float()
    monkeypatch.setattr(replay_module, "walk_probes", lambda *a: pytest.fail("walked again"))
    m = _trace_last_step_loss(rnn, torch.rand(300, 4, 3))["RNN"]
    assert m.gain[0, 0].item() == pytest.approx(0.9, rel=1e-5)
    assert m.log10_attenuation[0, 0].item() == pytest.approx(299 * math.log10(0.9), rel=1e-4)


def test_the_probed_samples_are_all_for_small_states_and_few_for_large_ones():
    assert probes.probed_samples(32, probes.SUBSET_FROM - 1) == slice(None)
    assert probes.probed_samples(probes.MIN_PROBES, 4096) == slice(None)
    chosen = range(32)[probes.probed_samples(32, probes.SUBSET_FROM)]
    assert list(chosen) == [0, 4, 8, 12, 16, 20, 24, 28]  # MIN_PROBES, evenly spread
    assert list(range(20)[probes.sample_slice(20, 8)]) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert probes.sample_slice(5, 8) == slice(None)


def _sub_call(module: nn.RNNBase, packed: bool, select: slice, steps: int = 40, batch: int = 20):
    """The call of `_call` restricted to the samples ``select``: the same inputs."""
    torch.manual_seed(1)
    x = torch.randn(steps, batch, module.input_size, dtype=module.weight_ih_l0.dtype)
    lengths = torch.linspace(steps, 3, batch).round().long()
    x, lengths = x[:, select], lengths[select]
    inp = pack_padded_sequence(x, lengths) if packed else x
    out, state = module(inp)
    out_t = out.data if packed else out
    call = fused.record_fused_call("m", "m", module, (inp,), {}, (out, state))
    (g,) = torch.autograd.grad(out_t.pow(2).sum(), [out_t])
    call.grads = {"out": g}
    return call


@pytest.mark.parametrize(
    ("factory", "packed"),
    [
        (lambda: nn.LSTM(3, 6, num_layers=2), False),
        (lambda: nn.LSTM(3, 6, bidirectional=True), True),
        (lambda: nn.GRU(3, 6), True),
        (lambda: nn.RNN(3, 6, num_layers=2), False),
    ],
)
def test_probes_on_a_few_samples_equal_a_replay_of_those_samples_alone(
    factory, packed, monkeypatch
):
    """Large states walk their probes on `MIN_PROBES` samples of the batch only (views of
    the recorded trajectory): the log norms are those of a replay of the same inputs with
    only those samples in the batch, and the propagation reads those samples' lengths."""
    from gradwatch._analysis.quantities.propagation import from_walk

    module = factory().double()
    monkeypatch.setattr(probes, "SUBSET_FROM", 4)  # these small states count as large
    full = _call(module, packed, batch=20)
    with torch.no_grad():
        rep = fused.replay(full, probes=True, recompute=False)
    select = probes.probed_samples(20, 6)
    assert list(range(20)[select]) == [0, 2, 4, 6, 8, 10, 12, 14]
    monkeypatch.setattr(probes, "SUBSET_FROM", 10**9)  # the reference probes all its samples
    alone = _sub_call(module, packed, select)
    with torch.no_grad():
        ref = fused.replay(alone, probes=True, recompute=False)
    assert rep.walked.keys() == ref.walked.keys() == rep.recurrences.keys()
    for key, logs in rep.walked.items():
        assert logs.shape[-1] == 8
        expected = ref.walked[key]
        valid = torch.ones_like(expected[0], dtype=torch.bool)
        if ref.valid is not None:
            valid = ref.valid
        mask = valid.unsqueeze(0).expand_as(logs)
        torch.testing.assert_close(logs[mask], expected[mask], rtol=1e-11, atol=1e-11)
        reverse = rep.recurrences[key].reverse
        a = from_walk(logs, reverse, rep.lengths)  # finds the samples from the width
        b = from_walk(expected, reverse, ref.lengths)
        torch.testing.assert_close(a.gain, b.gain, rtol=1e-11, atol=0)
        torch.testing.assert_close(a.curve, b.curve, rtol=1e-11, atol=1e-11, equal_nan=True)
