"""The cheap per-step signals and the records the core hands to its adapters.

Per watched module and optimizer step: the L2 norm of all the gradient injected into its
outputs (kept by the session's hooks, `gradwatch._capture.injected`) and the L2 norm of its
parameters' gradients (restricted to the modules the stepping optimizer trains), with their
presence; summed over ranks under DDP. Every tensor's norm comes from one
``torch._foreach_norm`` call per step (`gradwatch._capture.norms`). On an accelerator they
stay float64 tensors on the device (no host sync). For models on the CPU they are computed
straight into Python floats, the per-tensor norms accumulated in float32 (about 3x cheaper
than float64 there) and redone in float64 when float32 could overflow or underflow.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch._analysis.report import Report
from gradwatch._capture.injected import InjectedGrads
from gradwatch._capture.norms import host_norms
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
        # per optimizer: the watched parameters it trains, flat, and their modules
        self._layouts: dict[int, tuple[Any, list[nn.Parameter], list[int]]] = {}
        self._index_cache: dict[Any, tuple[Tensor, Tensor]] = {}

    def clear(self) -> None:
        self._layouts.clear()
        self._index_cache.clear()

    def _layout(self, optimizer: Any) -> tuple[list[nn.Parameter], list[int]]:
        """The parameters whose gradients count (those ``optimizer`` trains, all without
        one), flat, and the module of each; computed once per optimizer."""
        key = id(optimizer)
        cached = self._layouts.get(key)
        if cached is not None and (cached[0] is None or cached[0]() is optimizer):
            return cached[1], cached[2]
        trained = None
        if optimizer is not None and hasattr(optimizer, "param_groups"):
            trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
        flat: list[nn.Parameter] = []
        owners: list[int] = []
        for i, params in enumerate(self.params):
            if trained is None or any(id(p) in trained for p in params):
                flat.extend(params)
                owners.extend([i] * len(params))
        try:
            ref = None if optimizer is None else weakref.ref(optimizer)
        except TypeError:  # not weakly referenceable: keyed by id only
            ref = None
        self._layouts[key] = (ref, flat, owners)
        return flat, owners

    def _gradients(self, optimizer: Any) -> tuple[list[Tensor], list[int]]:
        flat, owners = self._layout(optimizer)
        grads: list[Tensor] = []
        owned: list[int] = []
        for p, i in zip(flat, owners, strict=True):
            g = p.grad
            if g is not None:
                grads.append(g)
                owned.append(i)
        return grads, owned

    # -- on the device --------------------------------------------------------------------
    def device_signals(
        self,
        injected: InjectedGrads,
        optimizer: Any,
        scale: Tensor | None,
        grads_scaled: bool,
    ) -> Tensor:
        """``[4, M]`` float64 on the device, summed over ranks under DDP; no host sync."""
        dev = self.device
        m = len(self.params)
        if m == 0:
            return torch.zeros(4, 0, dtype=torch.float64, device=dev)
        grads, owned = self._gradients(optimizer)
        tensors = grads + injected.grads
        norms = list(torch._foreach_norm(tensors, 2, dtype=torch.float64)) if tensors else []
        folded = [(i, v) for i, v in enumerate(injected.folded) if v is not None]
        for _, v in folded:
            norms.append(torch.as_tensor(v, dtype=torch.float64))
        norms = [n if n.device == dev else n.to(dev) for n in norms]
        key = (tuple(owned), tuple(injected.owners), tuple(i for i, _ in folded))
        index, present = self._index(key, m)
        if norms:
            vec = torch.stack(norms)
            # per module and row: sqrt of the summed squares (NaN stays NaN, inf stays inf)
            values = torch.zeros(2 * m, dtype=torch.float64, device=dev)
            values = values.index_add_(0, index, vec * vec).sqrt_().view(2, m)
        else:
            values = torch.zeros(2, m, dtype=torch.float64, device=dev)
        if scale is not None:
            s = scale.to(dev, torch.float64).reshape(())
            values = values / torch.stack([s, s if grads_scaled else s.new_ones(())]).view(2, 1)
        sig = torch.cat([values, present])
        if distributed():
            torch.distributed.all_reduce(sig)  # sums; means are taken by the detector
        return sig

    def _index(self, key: Any, m: int) -> tuple[Tensor, Tensor]:
        """Where each norm goes in the ``[2 * M]`` values (row 0: injected, row 1: the
        parameter gradients), and the presence rows, as device tensors; cached: the pattern
        rarely changes, and a host-to-device copy every step is avoidable work."""
        hit = self._index_cache.get(key)
        if hit is None:
            params, injected, folded = key
            index = [m + i for i in params] + list(injected) + list(folded)
            present = [[0.0] * m, [0.0] * m]
            for i in params:
                present[1][i] = 1.0
            for i in (*injected, *folded):
                present[0][i] = 1.0
            if len(self._index_cache) >= 16:
                self._index_cache.clear()
            hit = (
                torch.tensor(index, dtype=torch.long).to(self.device),
                torch.tensor(present, dtype=torch.float64).to(self.device),
            )
            self._index_cache[key] = hit
        return hit

    # -- on the host ----------------------------------------------------------------------
    def host_signals(
        self,
        injected: InjectedGrads,
        optimizer: Any,
        scale: Tensor | None,
        grads_scaled: bool,
    ) -> list[list[float]]:
        """The same matrix as nested lists of Python floats (CPU models: reading a CPU
        tensor costs nothing): every norm from one float32 `host_norms` call, the per-module
        reduction (float64) and the bookkeeping in plain Python."""
        m = len(self.params)
        grads, owned = self._gradients(optimizer)
        norms = host_norms(grads + injected.grads)
        k = len(grads)
        pn, has_pn = _per_module(m, owned, norms[:k])
        inj, has_inj = _per_module(m, injected.owners, norms[k:], injected.folded)
        if scale is not None:
            s = float(scale)
            inj = [v / s for v in inj]
            if grads_scaled:
                pn = [v / s for v in pn]
        sig = [inj, pn, has_inj, has_pn]
        if distributed():
            t = torch.tensor(sig, dtype=torch.float64)
            torch.distributed.all_reduce(t)  # sums; means are taken by the detector
            sig = t.tolist()
        return sig


def _per_module(
    m: int, owners: list[int], norms: list[float], folded: list[Any] | None = None
) -> tuple[list[float], list[float]]:
    """Per module, the L2 norm of its tensors' norms (0 where it has none) and its
    presence (1/0). Summed squares, redone with ``hypot`` where they overflowed."""
    squares = [0.0] * m
    present = [0.0] * m
    for i, v in zip(owners, norms, strict=True):
        squares[i] += v * v
        present[i] = 1.0
    if folded is not None:
        for i, v in enumerate(folded):
            if v is not None:
                v = float(v)
                squares[i] += v * v
                present[i] = 1.0
    values = [math.sqrt(s) for s in squares]  # NaN stays NaN (NaN + inf is NaN)
    for i, v in enumerate(values):
        if v == math.inf:  # a real inf, or squares above 1e308: hypot tells them apart
            mine = [n for j, n in zip(owners, norms, strict=True) if j == i]
            if folded is not None and folded[i] is not None:
                mine.append(float(folded[i]))
            values[i] = math.hypot(*mine)
    return values, present
