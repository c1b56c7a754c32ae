"""The cheap per-step signals and the records the core hands to its adapters.

Per watched module and optimizer step: the L2 norm of all the gradient injected into its
outputs (measured by the session's hooks) and the L2 norm of its parameters' gradients
(restricted to the modules the stepping optimizer trains), with their presence; summed over
ranks under DDP. On an accelerator they stay float64 tensors on the device (no host sync).
For models on the CPU they are computed straight into Python floats, the per-tensor norms
accumulated in float32 (about 3x cheaper than float64 there) and redone in float64 when
float32 could overflow or underflow.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch._analysis.report import Report
from gradwatch._engine._common import distributed
from gradwatch._engine.detector import StepFlags

__all__ = ["CheapSignals", "StepOutcome", "StepSignals"]


@dataclass(frozen=True)
class StepSignals:
    """The cheap signals of one optimizer step, copied to the host (on logging steps).

    Attributes:
        step: The optimizer step.
        injected: Per module, the L2 norm of all the gradient that reached its outputs
            (divided by the loss scale under AMP); absent for modules that got none (cells
            between captures).
        grad_norm: Per module, the L2 norm of its parameters' gradients (unscaled); absent
            for modules without gradients in this step's optimizer.
        spike: A norm was more than ``spike_factor`` times its running level.
        nonfinite: A non-finite value appeared (outside a loss-scaled step).
        skipped: The GradScaler skipped the step (inf/NaN in the scaled gradients).
        captured: Why the step was captured (``"scheduled"``, ``"spike"``, ``"nonfinite"``),
            ``None`` if it was not.
    """

    step: int
    injected: dict[str, float]
    grad_norm: dict[str, float]
    spike: bool
    nonfinite: bool
    skipped: bool
    captured: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StepOutcome:
    """What `MonitorCore.finish_step` did; the adapters log and warn from it."""

    step: int
    report: Report | None = None
    reason: str | None = None
    skipped: bool = False
    changes: tuple[Any, ...] = ()
    signals: tuple[StepSignals, ...] = ()  # materialised on this step (logging steps)
    #: This step's flags when they were read on the host at this step (always on the CPU,
    #: on CUDA only on captures or with ``read_flags=True``).
    flags: StepFlags | None = None


class CheapSignals:
    """Computes one step's ``[4, M]`` signal matrix for the watched modules' parameters:
    rows ``injected``, ``grad_norm`` (values, 0 where absent) and their presence (1/0)."""

    def __init__(self, params: list[list[nn.Parameter]], device: torch.device) -> None:
        self.params = params
        self.device = device
        #: Every watched parameter is on the CPU: compute on the host (see the module doc).
        self.host = all(p.device.type == "cpu" for ps in params for p in ps) and (
            device.type == "cpu"
        )
        self._opt_masks: dict[int, list[bool]] = {}
        self._presence_cache: dict[Any, Tensor] = {}

    def clear(self) -> None:
        self._opt_masks.clear()
        self._presence_cache.clear()

    def _opt_mask(self, optimizer: Any) -> list[bool]:
        if optimizer is None or not hasattr(optimizer, "param_groups"):
            return [True] * len(self.params)
        mask = self._opt_masks.get(id(optimizer))
        if mask is None:
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            mask = [any(id(p) in ids for p in ps) for ps in self.params]
            self._opt_masks[id(optimizer)] = mask
        return mask

    # -- on the device --------------------------------------------------------------------
    def device_signals(
        self,
        injected: list[Any],
        optimizer: Any,
        scale: Tensor | None,
        grads_scaled: bool,
    ) -> Tensor:
        """``[4, M]`` float64 on the device, summed over ranks under DDP; no host sync."""
        dev = self.device
        m = len(self.params)
        if m == 0:
            return torch.zeros(4, 0, dtype=torch.float64, device=dev)
        mask = self._opt_mask(optimizer)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        inj, pn, has_inj, has_pn = [], [], [], []
        for i, params in enumerate(self.params):
            v = injected[i]
            if v is None:
                inj.append(zero)
            elif isinstance(v, Tensor):
                inj.append(v.to(dev))
            else:
                inj.append(torch.tensor(v, dtype=torch.float64, device=dev))
            has_inj.append(v is not None)
            grads = [p.grad for p in params if p.grad is not None] if mask[i] else []
            if grads:
                norms = [torch.linalg.vector_norm(g, dtype=torch.float64).to(dev) for g in grads]
                pn.append(torch.linalg.vector_norm(torch.stack(norms)))
            else:
                pn.append(zero)
            has_pn.append(bool(grads))
        values = torch.stack([torch.stack(inj), torch.stack(pn)])
        if scale is not None:
            s = scale.to(dev, torch.float64).reshape(())
            values = values / torch.stack([s, s if grads_scaled else s.new_ones(())]).view(2, 1)
        present = self._presence(tuple(has_inj), tuple(has_pn))
        sig = torch.cat([torch.where(present > 0, values, 0.0), present])
        if distributed():
            sig = sig.clone()
            torch.distributed.all_reduce(sig)  # sums; means are taken by the detector
        return sig

    def _presence(self, has_inj: tuple[bool, ...], has_pn: tuple[bool, ...]) -> Tensor:
        """The presence mask as a device tensor, cached: the pattern rarely changes, and a
        fresh host-to-device copy every step is avoidable work."""
        key = (has_inj, has_pn)
        t = self._presence_cache.get(key)
        if t is None:
            if len(self._presence_cache) >= 16:
                self._presence_cache.clear()
            t = torch.tensor([has_inj, has_pn], dtype=torch.float64).to(self.device)
            self._presence_cache[key] = t
        return t

    # -- on the host ----------------------------------------------------------------------
    def host_signals(
        self,
        injected: list[Any],
        optimizer: Any,
        scale: Tensor | None,
        grads_scaled: bool,
    ) -> list[list[float]]:
        """The same matrix as nested lists of Python floats (CPU models: reading a CPU
        tensor costs nothing): parameter norms accumulated in float32 (see `_host_norms`),
        the per-module reduction (float64) and the bookkeeping in plain Python."""
        m = len(self.params)
        mask = self._opt_mask(optimizer)
        inj, pn = [0.0] * m, [0.0] * m
        has_inj, has_pn = [0.0] * m, [0.0] * m
        grads: list[Tensor] = []
        owners: list[int] = []
        for i, params in enumerate(self.params):
            v = injected[i]
            if v is not None:
                inj[i], has_inj[i] = float(v), 1.0
            if mask[i]:
                for p in params:
                    if p.grad is not None:
                        grads.append(p.grad)
                        owners.append(i)
        if grads:
            per: list[list[float]] = [[] for _ in range(m)]
            for i, n in zip(owners, _host_norms(grads), strict=True):
                per[i].append(n)
            for i, ns in enumerate(per):
                if ns:
                    pn[i], has_pn[i] = _norm(ns), 1.0
        if scale is not None:
            s = float(scale)
            inj = [v / s for v in inj]
            if grads_scaled:
                pn = [v / s for v in pn]
        sig = [
            [v if h > 0 else 0.0 for v, h in zip(inj, has_inj, strict=True)],
            [v if h > 0 else 0.0 for v, h in zip(pn, has_pn, strict=True)],
            has_inj,
            has_pn,
        ]
        if distributed():
            t = torch.tensor(sig, dtype=torch.float64)
            torch.distributed.all_reduce(t)  # sums; means are taken by the detector
            sig = t.tolist()
        return sig


def _host_norms(grads: list[Tensor]) -> list[float]:
    """L2 norms of CPU gradients, read in one transfer. Accumulated in float32 (on the CPU a
    float64 norm converts the whole tensor first and costs about 3x as much); a norm
    outside [1e-10, 1e18], where float32 squares may have overflowed or underflowed, is
    redone in float64. Relative error about 1e-7 * sqrt(numel)."""
    norms = torch.stack(
        [
            torch.linalg.vector_norm(g, dtype=None if g.dtype == torch.float64 else torch.float32)
            for g in grads
        ]
    ).tolist()
    for k, v in enumerate(norms):
        if not 1e-10 <= v <= 1e18 and grads[k].dtype != torch.float64:
            norms[k] = float(torch.linalg.vector_norm(grads[k], dtype=torch.float64))
    return norms


def _norm(values: list[float]) -> float:
    """The L2 norm of a few norms, in float64 (NaN wins over inf, as in a tensor
    reduction)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return math.hypot(*values)
