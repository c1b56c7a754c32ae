"""The spike / non-finite detector of the cheap signals, and reading its flags on the host.

Each cheap signal (per module: injected-gradient norm, parameter-gradient norm) keeps a
running level, an exponential average of its log10 over about 10 steps, that spikes and
non-finite values do not update. A value more than ``spike_factor`` times above its level
(after ``warmup_steps`` updates) is a spike.

Two implementations of the same arithmetic (float64, identical decisions on every rank):

- on the device (`SpikeDetector.update`): a few tiny tensor ops, nothing read on the
  host, so a CUDA step never waits for its kernels; the flags are then read one step late
  (`DeviceFlag`) or right away when the caller needs them;
- on the host (`SpikeDetector.update_host`), for models on the CPU, where reading a
  value costs nothing: plain Python floats, a fraction of the cost of ~25 tiny tensor ops.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DeviceFlag", "HostFlag", "SpikeDetector", "StepFlags"]

EMA_ALPHA = 0.1  # smoothing of the running log10 norm (about 10 steps)


class StepFlags(NamedTuple):
    """The detector's verdict on one optimizer step, read on the host."""

    spike: bool  # a signal rose more than spike_factor above its running level
    nonfinite: bool  # a non-finite value, outside a loss-scaled step
    skipped: bool  # the GradScaler skips the step (inf/NaN in the scaled gradients)


class SpikeDetector:
    """Running levels of ``[2, M]`` signals and the spike / non-finite / skipped flags."""

    def __init__(self, spike_factor: float, warmup_steps: int) -> None:
        self.spike_factor = float(spike_factor)
        self.warmup_steps = warmup_steps
        # a signal above its level by more than this (in log10) is a spike; inf: never
        self._log_factor = (
            math.log10(self.spike_factor) if math.isfinite(self.spike_factor) else math.inf
        )
        self._ema: Tensor | None = None  # [2, M] float64 running log10 norms (device path)
        self._count: Tensor | None = None  # [2, M] int64 updates so far (device path)
        self._host: tuple[list[list[float]], list[list[int]]] | None = None  # host path

    # -- state ----------------------------------------------------------------------------
    @property
    def ema(self) -> Tensor | None:
        """The running log10 levels, ``[2, M]`` float64 (``None`` before the first step)."""
        if self._host is not None:
            return torch.tensor(self._host[0], dtype=torch.float64).reshape(2, -1)
        return self._ema

    @property
    def count(self) -> Tensor | None:
        """Updates of each running level so far, ``[2, M]`` int64."""
        if self._host is not None:
            return torch.tensor(self._host[1], dtype=torch.int64).reshape(2, -1)
        return self._count

    def load(self, ema: Tensor, count: Tensor, device: torch.device, host: bool) -> None:
        if host:
            self._ema = self._count = None
            self._host = (ema.double().tolist(), count.long().tolist())
        else:
            self._host = None
            self._ema, self._count = ema.to(device), count.to(device)

    # -- device path ----------------------------------------------------------------------
    def update(self, sig: Tensor, amp: bool, found_inf: Tensor | None) -> Tensor:
        """Spike / non-finite / skipped flags (uint8 ``[3]``) on the device from ``sig``
        (``[4, M]``: summed values, then their presence counts); updates the running
        levels. Nothing here reads a value on the host."""
        dev = sig.device
        m = sig.shape[1]
        if self._host is not None:  # switched from the host path: carry the levels over
            ema, count = self.ema, self.count
            assert ema is not None and count is not None
            self._host, self._ema, self._count = None, ema.to(dev), count.to(dev)
        if self._ema is None or self._ema.shape[1] != m:
            self._ema = torch.zeros(2, m, dtype=torch.float64, device=dev)
            self._count = torch.zeros(2, m, dtype=torch.int64, device=dev)
        assert self._count is not None
        present = sig[2:] > 0
        value = sig[:2] / sig[2:].clamp_min(1)  # mean over the ranks that measured it
        finite = torch.isfinite(value) | ~present
        nonfinite = (~finite).any()
        logv = torch.log10(value)
        ok = present & torch.isfinite(logv)
        warm = self._count >= self.warmup_steps
        threshold = self._ema + math.log10(self.spike_factor)
        spike = ok & warm & (logv > threshold) if math.isfinite(self.spike_factor) else ok & False
        update = ok & ~spike
        first = self._count == 0
        new = torch.where(first, logv, self._ema + EMA_ALPHA * (logv - self._ema))
        self._ema = torch.where(update, new, self._ema)
        self._count = self._count + update.long()
        if amp:  # under a GradScaler, inf/NaN means the scaler skips the step
            skipped = nonfinite if found_inf is None else (found_inf.to(dev) > 0) | nonfinite
            nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        else:
            skipped = torch.zeros((), dtype=torch.bool, device=dev)
        return torch.stack([spike.any(), nonfinite, skipped.reshape(())]).to(torch.uint8)

    # -- host path ------------------------------------------------------------------------
    def update_host(self, sig: list[list[float]], amp: bool, found_inf: Tensor | None) -> StepFlags:
        """The same as `update` on Python floats (``sig`` as nested lists)."""
        m = len(sig[0])
        if self._host is None and self._ema is not None and self._ema.shape[1] == m:
            assert self._count is not None  # switched from the device path
            self._host = (self._ema.cpu().tolist(), self._count.cpu().tolist())
            self._ema = self._count = None
        if self._host is None or len(self._host[0][0]) != m:
            self._host = ([[0.0] * m, [0.0] * m], [[0] * m, [0] * m])
            self._ema = self._count = None
        emas, counts = self._host
        log_factor = self._log_factor
        warmup = self.warmup_steps
        spike = nonfinite = False
        # rows: the values of both signals, then their presence counts (see signals.py)
        for r in (0, 1):
            values, present, ema, count = sig[r], sig[r + 2], emas[r], counts[r]
            for i in range(m):
                c = present[i]
                if not c > 0:
                    continue
                value = values[i] / c if c > 1.0 else values[i]  # the mean over the ranks
                if value - value != 0.0:  # inf or NaN (a cheaper math.isfinite)
                    nonfinite = True
                    continue
                if value <= 0.0:  # log10 would be -inf (or NaN): neither a spike nor an update
                    continue
                logv = math.log10(value)
                n = count[i]
                if n >= warmup and logv > ema[i] + log_factor:
                    spike = True
                    continue
                ema[i] = logv if n == 0 else ema[i] + EMA_ALPHA * (logv - ema[i])
                count[i] = n + 1
        skipped = False
        if amp:  # under a GradScaler, inf/NaN means the scaler skips the step
            skipped = nonfinite or (found_inf is not None and float(found_inf) > 0)
            nonfinite = False
        return StepFlags(spike, nonfinite, skipped)


class DeviceFlag:
    """Flags on the device, read on the host without stalling it: copied to pinned memory
    with ``non_blocking`` and read one step later, when they have long arrived."""

    def __init__(self, flags: Tensor) -> None:
        self.flags = flags
        self.event = None
        if flags.device.type == "cuda":
            self.host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flags.to("cpu", non_blocking=True)

    def read(self) -> StepFlags:
        if self.event is not None:
            self.event.synchronize()  # recorded a whole step ago: already complete
        return StepFlags(*(bool(v) for v in self.host.tolist()))


class HostFlag:
    """Flags computed on the host: nothing to wait for."""

    def __init__(self, flags: StepFlags) -> None:
        self.flags = flags

    def read(self) -> StepFlags:
        return self.flags
