"""The math mode of a fused call (TF32, autocast dtype) and how the replay follows it.

CUDA-only modes are simulated on the CPU: the selection logic takes the TF32 permission as an
argument, and a recorded call's mode can be set to what a GPU would have recorded.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwatch._analysis import analyze
from gradwatch._capture.families.fused import capture_call
from gradwatch._capture.fused import record_fused_call
from gradwatch._capture.math_mode import TOLERANCE, MathMode, cudnn_rnn_allows_tf32


@pytest.fixture
def restore_precision_flags():
    cudnn_rnn = torch.backends.cudnn.rnn.fp32_precision
    matmul = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cudnn.rnn.fp32_precision = cudnn_rnn
    torch.backends.cuda.matmul.fp32_precision = matmul


def test_tolerances_grow_with_the_unit_roundoff_of_the_mode():
    order = ["float64", "float32", "tf32", "float16", "bfloat16"]
    values = [TOLERANCE[p] for p in order]  # type: ignore[index]
    assert values == sorted(values) and values[0] < 1e-8 < values[1] < values[2]
    # at least a few units of roundoff of the mode (2^-11 for tf32 / fp16, 2^-8 for bf16)
    assert TOLERANCE["tf32"] > 4 * 2**-11 and TOLERANCE["bfloat16"] > 4 * 2**-8


@pytest.mark.parametrize(
    ("dtype", "allowed", "expected"),
    [
        (torch.float64, True, "float64"),
        (torch.float32, True, "tf32"),
        (torch.float32, False, "float32"),
        (torch.float16, True, "float16"),
        (torch.bfloat16, False, "bfloat16"),
    ],
)
def test_the_mode_of_a_call_comes_from_its_dtype_and_the_tf32_permission(dtype, allowed, expected):
    out = torch.zeros(2, dtype=dtype)
    assert MathMode.of_call(out, tf32_allowed=allowed).precision == expected


def test_a_cpu_float32_call_is_never_tf32_whatever_the_setting(restore_precision_flags):
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    assert cudnn_rnn_allows_tf32()
    assert MathMode.of_call(torch.zeros(2)).precision == "float32"


def test_the_tf32_permission_is_what_reaches_the_cudnn_rnn_descriptor(restore_precision_flags):
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    assert not cudnn_rnn_allows_tf32()
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    assert cudnn_rnn_allows_tf32()
    torch.backends.cudnn.rnn.fp32_precision = "none"  # falls back to cuDNN's, then generic
    assert cudnn_rnn_allows_tf32() == (torch.backends.cudnn.fp32_precision == "tf32")


def test_the_replay_context_sets_and_restores_tf32_matmuls(restore_precision_flags):
    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "tf32"  # a user's global setting must not leak into an IEEE replay
    with MathMode("float32").context():
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == "tf32"
    matmul.fp32_precision = "ieee"
    with MathMode("tf32").context():
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == "ieee"


def test_operands_are_rounded_as_the_kernel_read_them():
    x = torch.randn(50, dtype=torch.float32)
    half = MathMode("float16").operand(x, torch.float32)
    assert half.dtype == torch.float32 and torch.equal(half, x.half().float())
    assert not torch.equal(half, x)
    assert torch.equal(MathMode("tf32").operand(x, torch.float32), x)


def replay_fused_call(call):
    """The report of one recorded call: its capture, analysed."""
    return analyze(capture_call(call))


def _recorded_lstm_call():
    torch.manual_seed(3)
    lstm = nn.LSTM(4, 16, num_layers=2)
    x = torch.randn(20, 3, 4)
    out, (h_n, c_n) = lstm(x)
    call = record_fused_call("lstm", "lstm", lstm, (x,), {}, (out, (h_n, c_n)))
    assert call is not None
    grads = torch.autograd.grad(out.pow(2).sum(), [out, h_n, c_n], allow_unused=True)
    call.grads = {k: g for k, g in zip(("out", "h_n", "c_n"), grads, strict=True) if g is not None}
    return call


def test_exact_follows_the_tolerance_of_the_recorded_mode():
    """A kernel that computed in TF32 deviates from an IEEE replay by ~1e-3: exact for a
    TF32 call, not exact (with the reason) for an IEEE float32 call."""
    call = _recorded_lstm_call()
    assert call.mode.precision == "float32"
    clean = replay_fused_call(call)
    assert clean.exact and clean.fidelity < TOLERANCE["float32"]
    # the kernel's outputs as a TF32 kernel might have left them: 2e-3 relative off
    call.h_n = call.h_n * (1 + 2e-3)
    as_ieee = replay_fused_call(call)
    assert not as_ieee.exact and "float32" in (as_ieee.approximate_reason or "")
    assert TOLERANCE["float32"] < as_ieee.fidelity < TOLERANCE["tf32"]
    call.mode = MathMode("tf32")
    as_tf32 = replay_fused_call(call)
    assert as_tf32.exact and as_tf32.fidelity == pytest.approx(as_ieee.fidelity, rel=1e-3)
    assert torch.equal(as_tf32.total, as_ieee.total)  # on the CPU TF32 changes no product


def test_a_deviation_above_the_mode_tolerance_is_never_exact():
    call = _recorded_lstm_call()
    call.mode = MathMode("bfloat16")
    call.h_n = call.h_n * 1.2
    rep = replay_fused_call(call)
    assert not rep.exact and rep.fidelity > TOLERANCE["bfloat16"]
    assert "bfloat16" in (rep.approximate_reason or "")


def test_the_fidelity_is_the_largest_deviation_over_the_largest_value_of_all_tensors():
    """`relative_deviation` compares small tensors in one flat pass: the same figure as one
    comparison per tensor, checked against a closed form (matching NaN and Inf count as equal,
    a NaN against a number does not)."""
    from gradwatch._capture import stats

    real = [torch.tensor([[1.0, -4.0]]), torch.tensor([2.0, float("nan"), float("inf")])]
    replayed = [torch.tensor([[1.5, -4.0]]), torch.tensor([1.0, float("nan"), float("inf")])]
    # largest deviation 1.0 (2 vs 1), largest finite real value 4.0 (the Inf counts as 0)
    assert stats.relative_deviation(replayed, real).item() == 0.25
    per_tensor = [stats.relative_deviation([a], [b]) for a, b in zip(replayed, real, strict=True)]
    assert per_tensor[0].item() == 0.5 / 4.0 and per_tensor[1].item() == 1.0 / 2.0
    replayed[1][1] = 3.0  # a NaN that the replay does not reproduce
    assert stats.relative_deviation(replayed, real).isnan()
    assert stats.relative_deviation([torch.zeros(0)], [torch.zeros(0)]).item() == 0.0
