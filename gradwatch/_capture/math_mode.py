"""The math mode a fused recurrent call ran in, and how the replay follows it.

A replay can only be compared with what the kernel computed. On the CPU a float32 call is
plain IEEE float32. On CUDA, cuDNN may run a float32 recurrence on TF32 tensor cores (10-bit
mantissa) when PyTorch allows it: the RNN descriptor gets
``at::globalContext().allowTF32CuDNN(at::Float32Op::RNN)`` (``aten/src/ATen/native/cudnn/
RNN.cpp``), that is ``torch.backends.cudnn.rnn.fp32_precision == "tf32"`` (also set by the
legacy ``torch.backends.cudnn.allow_tf32``; on by default), and the GPU has tensor cores that
do TF32 (compute capability 8.0 and newer). Under autocast the call's tensors are float16 or
bfloat16 and cuDNN computes in float32 from them (``promote_rnn_math_type``).

So the mode is recorded at forward time (`MathMode.of_call`) and the replay follows it:
operands rounded to the call's storage dtype, then float32 math, with TF32 matrix products
where the kernel was allowed TF32 (`MathMode.context`). The fidelity tolerance, the largest
relative deviation of the replayed outputs from the real ones for a report to be called
exact, follows from the mode (`MathMode.tolerance`): "exact" means equal to what this kernel
computed up to that mode's rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["TOLERANCE", "MathMode", "cudnn_rnn_allows_tf32"]

Precision = Literal["float64", "float32", "tf32", "float16", "bfloat16"]

# Largest relative deviation of the replay from the kernel's outputs for a report to be exact.
# float32: observed ~1e-6 (a different summation order). The others are about 20 units of
# roundoff of the mode (tf32 and float16 2^-11, bfloat16 2^-8): one rounding of the outputs
# is one unit (bfloat16 on the CPU measures 4e-3), the rest is room for the kernel's own
# summation order. The GPU figures are to be confirmed by benchmarks/gpu_check.py.
TOLERANCE: dict[Precision, float] = {
    "float64": 1e-10,
    "float32": 1e-4,
    "tf32": 1e-2,
    "float16": 1e-2,
    "bfloat16": 5e-2,
}

_STORAGE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def cudnn_rnn_allows_tf32() -> bool:
    """Whether PyTorch lets cuDNN RNNs use TF32 now (what reaches the RNN descriptor).

    The per-operator setting (``torch.backends.cudnn.rnn.fp32_precision``) falls back to
    cuDNN's, then to the generic one, when it is ``"none"``; older PyTorch has only the
    legacy ``torch.backends.cudnn.allow_tf32``.
    """
    cudnn = torch.backends.cudnn
    chain = (getattr(cudnn, "rnn", None), cudnn, torch.backends)
    for holder in chain:
        try:
            value = getattr(holder, "fp32_precision", None)
        except RuntimeError:  # a mix of legacy and new settings: ask the legacy flag
            break
        if value is None:
            break
        if value != "none":
            return value == "tf32"
    try:
        return bool(cudnn.allow_tf32)
    except RuntimeError:  # conv and rnn set differently through the legacy API
        return False


def _tf32_capable(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.backends.cudnn.enabled:
        return False
    try:
        return torch.cuda.get_device_capability(device)[0] >= 8
    except (RuntimeError, AssertionError):
        return False


@dataclass(frozen=True)
class MathMode:
    """How a fused call computed: its storage precision, and TF32 for cuDNN float32 calls."""

    precision: Precision = "float32"

    @staticmethod
    def of_call(output: Tensor, tf32_allowed: bool | None = None) -> MathMode:
        """The mode of a call from one of its outputs, read at forward time.

        ``tf32_allowed`` overrides the global setting (used to test the selection on the CPU).
        """
        storage = _STORAGE.get(output.dtype)
        if storage is not None:
            return MathMode(storage)  # type: ignore[arg-type]
        if output.dtype != torch.float32:
            return MathMode("float32")
        allowed = cudnn_rnn_allows_tf32() if tf32_allowed is None else tf32_allowed
        tf32 = allowed and (_tf32_capable(output.device) or tf32_allowed is not None)
        return MathMode("tf32" if tf32 else "float32")

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.precision]

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """The dtype the kernel's operands were rounded to, when below float32."""
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.precision)

    def operand(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``x`` as the replay reads it: rounded as the kernel saw it, then in ``dtype``."""
        low = self.storage_dtype
        if low is not None and x.dtype != low and x.is_floating_point():
            x = x.to(low)
        return x.to(dtype)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Matrix products in the replay as in the kernel: TF32 when the kernel used it, IEEE
        float32 otherwise (a user's global TF32 matmul setting must not leak into a replay of
        an IEEE kernel). Restores the setting on exit."""
        matmul = torch.backends.cuda.matmul
        want = self.precision == "tf32"
        if hasattr(matmul, "fp32_precision"):
            old = matmul.fp32_precision
            matmul.fp32_precision = "tf32" if want else "ieee"
            try:
                yield
            finally:
                matmul.fp32_precision = old
            return
        old_flag = matmul.allow_tf32
        matmul.allow_tf32 = want
        try:
            yield
        finally:
            matmul.allow_tf32 = old_flag

    def describe(self) -> str:
        if self.precision == "tf32":
            return "float32 on TF32 tensor cores (cuDNN)"
        if self.storage_dtype is not None:
            return f"{self.precision} operands with float32 math (autocast, or a half module)"
        return self.precision
