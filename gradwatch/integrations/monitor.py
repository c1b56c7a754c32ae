"""The framework-free core shared by the Lightning callback and the plain-PyTorch monitor.

One *optimizer step* is the unit of everything here: the gradients of all the backward passes
since the previous step (accumulation micro-batches, truncated-BPTT chunks, a closure called
several times) make one step. The owner (an adapter) drives the core with two calls:

- :meth:`MonitorCore.bind` once, when the model's recurrent modules exist, then
  :meth:`MonitorCore.attach`;
- :meth:`MonitorCore.finish_step` after the last backward of a step and *before* the
  optimizer changes the weights (the replay needs the weights of the forward pass).

Every step costs only the *cheap signals*, computed and kept on the device: the norm of the
gradient injected into each watched module's outputs, the gradient norm of each module's
parameters, and a non-finite check. Every ``every_n_steps`` steps, and when the cheap signals
show a spike or a non-finite value, the step is *captured*: the recurrences are replayed
exactly (see :mod:`gradwatch.capture.tracing`) and diagnosed.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.capture.discovery import RECURRENT_TYPES, Selector, cell_kind
from gradwatch.capture.fused import check_fused_module
from gradwatch.capture.tracing import Session
from gradwatch.outputs.clipping import ClipEvent, Clipper
from gradwatch.report import VERDICTS, ModuleReport, Report

__all__ = [
    "DEFAULT_EVERY_N_STEPS",
    "ClipControl",
    "MonitorCore",
    "StepOutcome",
    "StepSignals",
    "merge_module_reports",
    "scaler_info",
]

log = logging.getLogger("gradwatch")

#: Default capture interval in optimizer steps. A capture replays every watched recurrence
#: once (about 0.7-1.3x the module's own forward and backward on the CPU, see
#: docs/benchmarks.md) and diagnoses it, so the amortised cost is about 1% of a step at 100.
#: Vanishing/exploding regimes change over hundreds of steps; sudden explosions are caught at
#: every step by the cheap signals, which trigger a capture of their own.
DEFAULT_EVERY_N_STEPS = 100
_EMA_ALPHA = 0.1  # smoothing of the spike detector's running log10 norm (about 10 steps)
_PER_STEP_FIELDS = ("total", "carried", "direct", "cell_total")
_SIGNAL_ROWS = ("injected", "grad_norm")

Warn = Callable[[str], None]


# -------------------------------------------------------------------------------- results
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
    """What :meth:`MonitorCore.finish_step` did; the adapters log and warn from it."""

    step: int
    report: Report | None = None
    reason: str | None = None
    skipped: bool = False
    changes: tuple[Any, ...] = ()
    signals: tuple[StepSignals, ...] = ()  # materialised on this step (logging steps)
    #: This step's ``(spike, nonfinite, skipped)`` flags when they were read on the host at
    #: this step (always on the CPU, on CUDA only on captures or with ``read_flags=True``).
    flags: tuple[bool, bool, bool] | None = None


# ------------------------------------------------------------------------------ helpers
def scaler_info(scaler: Any, optimizer: Any) -> tuple[Tensor | None, bool, Tensor | None]:
    """``(scale, grads_scaled, found_inf)`` of a ``torch.amp.GradScaler`` for one optimizer.

    ``scale`` is the scaler's scale *tensor* (no host sync), the factor the gradients of
    this step were multiplied by; ``grads_scaled`` tells whether the parameter gradients
    still carry it (they do until ``scaler.unscale_(optimizer)``, which Lightning calls
    before ``on_before_optimizer_step`` except for fused optimizers); ``found_inf`` is the
    scaler's inf/NaN verdict when ``unscale_`` ran. All ``None``/``False`` without a
    scaler.
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None, False, None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # never used for a backward pass yet
        return None, False, None
    grads_scaled, found = True, None
    states = getattr(scaler, "_per_optimizer_states", {})
    st = states.get(id(optimizer)) if optimizer is not None else None
    if st is not None:
        from torch.amp.grad_scaler import OptState

        if st.get("stage") is OptState.UNSCALED:
            grads_scaled = False
            per_dev = list(st.get("found_inf_per_device", {}).values())
            if per_dev:
                found = torch.stack([f.to(per_dev[0].device).reshape(()) for f in per_dev]).sum()
    return scale, grads_scaled, found


def _weighted(parts: list[Tensor | None], weights: list[Tensor], steps: int) -> Tensor | None:
    if any(p is None for p in parts):
        return None
    num = torch.zeros((*parts[0].shape[:-1], steps), dtype=torch.float64)
    den = torch.zeros(steps, dtype=torch.float64)
    for p, w in zip(parts, weights, strict=True):
        t = p.shape[-1]
        w = w.to(torch.float64)
        used = w > 0
        num[..., :t] += torch.where(used, p.to(torch.float64) * w, torch.zeros((), dtype=num.dtype))
        den[:t] += w
    return (num / den.clamp_min(1)).float()


def merge_module_reports(parts: list[ModuleReport], name: str) -> ModuleReport:
    """Merge the reports of the same call over micro-batches (or DDP ranks) into one.

    The per-step profiles (``total``, ``carried``, ``direct``, ``cell_total``) are means over
    the valid samples of all parts, weighted by ``valid_samples`` at each step: exactly the
    profile one batch holding every sample would give (non-finite values propagate). Summary
    diagnostics (gain, horizon, causes, verdicts, explanation, ...) are per-trajectory and do
    not average; they are taken from the worst part (by verdict, then by number of samples),
    so a problem in one micro-batch is never averaged away. ``nonfinite_at`` is the first one
    found in part order.
    """
    if len(parts) == 1:
        return parts[0] if parts[0].name == name else dataclasses.replace(parts[0], name=name)
    steps = max(p.steps for p in parts)
    weights = [p.valid_samples for p in parts]
    merged = {
        f: _weighted([getattr(p, f) for p in parts], weights, steps) for f in _PER_STEP_FIELDS
    }
    valid = torch.zeros(steps, dtype=torch.int64)
    for w in weights:
        valid[: w.shape[0]] += w

    def badness(p: ModuleReport) -> tuple[int, int]:
        rank = VERDICTS.index(p.verdict) if p.verdict in VERDICTS else 0
        return rank, int(p.valid_samples.sum())

    worst = max(parts, key=badness)
    reasons = sorted({p.approximate_reason for p in parts if p.approximate_reason})
    nonfinite_at = next((p.nonfinite_at for p in parts if p.nonfinite_at is not None), None)
    return dataclasses.replace(
        worst,
        name=name,
        total=merged["total"],
        carried=merged["carried"],
        direct=merged["direct"],
        cell_total=merged["cell_total"],
        valid_samples=valid,
        exact=all(p.exact for p in parts),
        fidelity=max(p.fidelity for p in parts),
        approximate_reason="; ".join(reasons) or None,
        received_gradient=any(p.received_gradient for p in parts),
        seq_len=max(p.seq_len for p in parts),
        nonfinite_at=nonfinite_at,
    )


def _unscale(m: ModuleReport, scale: float) -> ModuleReport:
    if scale == 1.0:
        return m
    changes = {f: getattr(m, f) / scale for f in _PER_STEP_FIELDS if getattr(m, f) is not None}
    return dataclasses.replace(m, **changes)


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _is_rank_zero() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


def _default_warn(message: str) -> None:
    if _is_rank_zero():
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_selectors(name: str, selectors: Any) -> list[Selector] | None:
    if selectors is None:
        return None
    if isinstance(selectors, str | type):
        selectors = [selectors]
    try:
        out = list(selectors)
    except TypeError:
        raise ValueError(
            f"{name} must be a module name pattern, a module type, or a list of them; "
            f"got {selectors!r}"
        ) from None
    for s in out:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise ValueError(
                f"{name} must hold module name patterns (fnmatch, e.g. 'encoder.*') or "
                f"nn.Module subclasses, got {s!r}"
            )
    return out


def _unsupported(model: nn.Module) -> dict[str, str]:
    """Recurrent modules that cannot be measured, with the reason."""
    bad = {}
    for qualified, module in model.named_modules():
        if not isinstance(module, RECURRENT_TYPES):
            continue
        name = qualified or type(model).__name__
        if isinstance(module, nn.RNNBase):
            try:
                check_fused_module(name, module)
            except ValueError as e:
                bad[name] = str(e)
        elif cell_kind(module) is None:
            bad[name] = f"{type(module).__name__} is not an RNNCell, LSTMCell or GRUCell"
    return bad


class _Flag:
    """A small device tensor read on the host without stalling the device: copied to pinned
    memory with ``non_blocking`` and read one step later, when it has long arrived."""

    def __init__(self, flags: Tensor) -> None:
        self.event = None
        if flags.device.type == "cuda":
            self.host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flags.to("cpu", non_blocking=True)

    def read(self) -> list[bool]:
        if self.event is not None:
            self.event.synchronize()  # recorded a whole step ago: already complete
        return [bool(v) for v in self.host.tolist()]


# ---------------------------------------------------------------------------------- core
class MonitorCore:
    """Schedule, cheap signals, capture, merging, reduction, detector state and history.

    See :class:`gradwatch.Monitor` and :class:`gradwatch.GradWatch` for the arguments.
    """

    def __init__(
        self,
        *,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        include: Iterable[Selector] | None = None,
        exclude: Iterable[Selector] | None = None,
        spike_factor: float = 10.0,
        warmup_steps: int = 10,
        history: int = 100,
        log_every_n_steps: int | None = 50,
        thresholds: Any = None,
        async_flags: bool | None = None,
        warn: Warn | None = None,
    ) -> None:
        _check_int("every_n_steps", every_n_steps, 1)
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("history", history, 1)
        _check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        if (
            isinstance(spike_factor, bool)
            or not isinstance(spike_factor, int | float)
            or not spike_factor > 1
        ):
            raise ValueError(
                f"spike_factor must be a number > 1 (math.inf turns spike detection off), "
                f"got {spike_factor!r}"
            )
        if async_flags is not None and not isinstance(async_flags, bool):
            raise ValueError(f"async_flags must be True, False or None, got {async_flags!r}")
        self.include = _check_selectors("include", include)
        self.exclude = _check_selectors("exclude", exclude)
        if thresholds is not None:
            from gradwatch.verdicts import Thresholds

            if not isinstance(thresholds, Thresholds):
                raise ValueError(
                    f"thresholds must be a gradwatch.verdicts.Thresholds, got {thresholds!r}"
                )
        self.every_n_steps = every_n_steps
        self.spike_factor = float(spike_factor)
        self.warmup_steps = warmup_steps
        self.history = history
        self.log_every_n_steps = log_every_n_steps
        self.thresholds = thresholds
        self.async_flags = async_flags
        self.warn: Warn = warn or _default_warn
        self.reports: OrderedDict[int, Report] = OrderedDict()
        self.signals: deque[StepSignals] = deque(maxlen=10 * history)
        self.tracker = self._make_tracker()
        self._init_runtime()

    def _init_runtime(self) -> None:
        """Everything that is rebuilt by :meth:`bind` and is not pickled."""
        self.session: Session | None = None
        self.names: list[str] = []
        self._params: list[list[nn.Parameter]] = []
        self._opt_masks: dict[int, list[bool]] = {}
        self._presence_cache: dict[Any, Tensor] = {}
        self._device = torch.device("cpu")
        self._ema: Tensor | None = None  # [2, M] float64 running log10 norms
        self._count: Tensor | None = None  # [2, M] int64 updates so far
        self._loaded: dict[str, Any] | None = getattr(self, "_loaded", None)
        self._pending: list[tuple[int, Tensor, Tensor, str | None]] = []
        self._flags: deque[_Flag] = deque()
        self._planned: str | None = None
        self._sync = True
        self._warned: set[str] = set()
        self.disabled: dict[str, str] = {}
        self.broken: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # picklable for ddp_spawn: no hooks, no session
        state = self.__dict__.copy()
        for k in ("session", "_params", "_opt_masks", "_presence_cache", "_pending", "_flags"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.session, self._params, self._opt_masks = None, [], {}
        self._presence_cache, self._pending, self._flags = {}, [], deque()

    def _make_tracker(self) -> Any:
        from gradwatch.verdicts import VerdictTracker

        return VerdictTracker(self.thresholds)

    # -- results ---------------------------------------------------------------------------
    @property
    def verdicts(self) -> dict[str, str]:
        """Latest verdict of every watched module call, with hysteresis."""
        return dict(self.tracker.verdicts)

    # -- lifecycle -------------------------------------------------------------------------
    def bind(self, model: nn.Module, start_step: int = 0) -> list[str]:
        """Find the recurrent modules of ``model`` (not yet hooked); returns their names.

        Modules that cannot be measured are left out with a warning. When none is found,
        warns with what was searched (states marked with ``gradwatch.mark_state`` are still
        watched).
        """
        self.close()
        bad = _unsupported(model)
        exclude = list(self.exclude or [])
        for name, why in bad.items():
            self._warn_once(name, f"gradwatch: not watching {name!r}: {why}")
            exclude.append(glob.escape(name))
        session = Session(
            model, include=self.include, exclude=exclude or None, thresholds=self.thresholds
        )
        self.session = session
        self.names = list(session.names)
        self._params = [list(m.parameters()) for _, m in session._targets]
        first = next((p for ps in self._params for p in ps), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._sync = (
            not self.async_flags if self.async_flags is not None else (self._device.type != "cuda")
        )
        if not self.names:
            searched = sum(1 for _ in model.modules())
            kinds = "nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell (and subclasses)"
            filters = ""
            if self.include or self.exclude:
                filters = f" with include={self.include!r}, exclude={self.exclude!r}"
            self._warn_once(
                "<none>",
                f"gradwatch: no recurrent module found in {type(model).__name__} (searched its "
                f"{searched} modules for {kinds}{filters}); only states marked with "
                "gradwatch.mark_state() will be measured",
            )
        self._restore_detector()
        self._plan(start_step)
        return self.names

    def attach(self) -> None:
        if self.session is not None and self.broken is None:
            self.session.attach()

    def detach(self) -> None:
        if self.session is not None:
            self.session.detach()

    def close(self) -> None:
        """Remove every hook and release everything recorded (the pending cheap signals are
        copied to the history first)."""
        if self.session is not None:
            self.flush_signals()
            self.session.close()
        self.session = None
        self._pending.clear()
        self._flags.clear()
        self._opt_masks.clear()
        self._presence_cache.clear()

    def break_down(self, error: BaseException) -> None:
        """An unexpected internal error: stop monitoring altogether, warn once."""
        self.broken = repr(error)
        self.close()
        self._warn_once(
            "<internal>",
            f"gradwatch: internal error, monitoring is switched off for the rest of the run "
            f"(training continues unchanged): {error!r}",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    # -- schedule --------------------------------------------------------------------------
    def _plan(self, step: int, forced: str | None = None) -> None:
        reason = "scheduled" if step % self.every_n_steps == 0 else None
        self._planned = reason or forced
        if self.session is not None:
            self.session.plan(capture=self._planned is not None, retain=self._sync)

    def is_logging_step(self, step: int) -> bool:
        return self.log_every_n_steps is not None and step % self.log_every_n_steps == 0

    # -- the step ----------------------------------------------------------------------------
    def finish_step(
        self,
        step: int,
        *,
        optimizer: Any = None,
        scaler: Any = None,
        read_flags: bool = False,
    ) -> StepOutcome:
        """Close optimizer step ``step``: cheap signals, capture if due, plan the next step.

        Call after the step's last backward pass and before the optimizer updates the
        weights. ``scaler`` is the run's ``torch.amp.GradScaler``, if any. ``read_flags``
        reads this step's flags on the host even with ``async_flags`` (one device sync; the
        spike capture is still scheduled two steps later): reactive clipping needs them now.
        """
        session = self.session
        if session is None or self.broken is not None:
            return StepOutcome(step)
        scale, grads_scaled, found_inf = scaler_info(scaler, optimizer)
        sig = self._signals(session.take_injected(), optimizer, scale, grads_scaled)
        flags = self._detect(sig, scale is not None, found_inf)

        reason = self._planned
        now: list[bool] | None = None
        if self._sync:
            now = _Flag(flags).read()
            if reason is None and session._retain and (now[0] or now[1]):
                reason = "nonfinite" if now[1] else "spike"
        elif reason is not None:  # a capture step synchronises anyway
            now = _Flag(flags).read()
        else:
            self._flags.append(_Flag(flags))
            if read_flags:
                now = self._flags[-1].read()
        results, failures = session.finish(replay=reason is not None)

        report = None
        skipped = bool(now[2]) if now is not None else False
        changes: tuple[Any, ...] = ()
        if reason is not None:
            report, failures = self._build_report(results, failures, scale)
            if not report.modules and not report.failures:
                report = None  # nothing was measured (no recurrent module reached)
        self._handle_failures(failures)
        if report is not None:
            if not skipped:
                changes = tuple(self.tracker.update(report))
            self.reports[step] = report
            while len(self.reports) > self.history:
                self.reports.popitem(last=False)
        self._pending.append((step, sig, flags, reason))
        materialised: tuple[StepSignals, ...] = ()
        if reason is not None or self.is_logging_step(step) or len(self._pending) > 1000:
            materialised = self.flush_signals()

        forced = None
        if not self._sync and len(self._flags) > 1:  # the previous step's flags, one step late
            old = self._flags.popleft().read()
            if old[1]:
                forced = "nonfinite"
            elif old[0]:
                forced = "spike"
        self._plan(step + 1, forced)
        read = None if now is None else (bool(now[0]), bool(now[1]), bool(now[2]))
        return StepOutcome(step, report, reason, skipped, changes, materialised, read)

    def _signals(
        self,
        injected: list[Tensor | None],
        optimizer: Any,
        scale: Tensor | None,
        grads_scaled: bool,
    ) -> Tensor:
        """``[4, M]`` float64 on the device: injected norm, parameter gradient norm, and
        their presence (1/0), summed over ranks under DDP."""
        dev = self._device
        m = len(self.names)
        if m == 0:
            return torch.zeros(4, 0, dtype=torch.float64, device=dev)
        mask = self._opt_mask(optimizer)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        inj, pn, has_inj, has_pn = [], [], [], []
        for i, params in enumerate(self._params):
            v = injected[i]
            inj.append(zero if v is None else v.to(dev))
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
        if _distributed():
            sig = sig.clone()
            torch.distributed.all_reduce(sig)  # sums; means are taken below
        return sig

    def _presence(self, has_inj: tuple[bool, ...], has_pn: tuple[bool, ...]) -> Tensor:
        """The presence mask as a device tensor, cached: the pattern rarely changes, and a
        fresh host-to-device copy every step is avoidable work."""
        key = (has_inj, has_pn)
        t = self._presence_cache.get(key)
        if t is None:
            if len(self._presence_cache) >= 16:
                self._presence_cache.clear()
            t = torch.tensor([has_inj, has_pn], dtype=torch.float64).to(self._device)
            self._presence_cache[key] = t
        return t

    def _opt_mask(self, optimizer: Any) -> list[bool]:
        if optimizer is None or not hasattr(optimizer, "param_groups"):
            return [True] * len(self._params)
        mask = self._opt_masks.get(id(optimizer))
        if mask is None:
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            mask = [any(id(p) in ids for p in ps) for ps in self._params]
            self._opt_masks[id(optimizer)] = mask
        return mask

    def _detect(self, sig: Tensor, amp: bool, found_inf: Tensor | None) -> Tensor:
        """Spike / non-finite / skipped flags (uint8 ``[3]``) on the device; updates the
        running levels. Nothing here reads a value on the host."""
        dev = sig.device
        m = sig.shape[1]
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
        new = torch.where(first, logv, self._ema + _EMA_ALPHA * (logv - self._ema))
        self._ema = torch.where(update, new, self._ema)
        self._count = self._count + update.long()
        if amp:  # under a GradScaler, inf/NaN means the scaler skips the step
            skipped = nonfinite if found_inf is None else (found_inf.to(dev) > 0) | nonfinite
            nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        else:
            skipped = torch.zeros((), dtype=torch.bool, device=dev)
        return torch.stack([spike.any(), nonfinite, skipped.reshape(())]).to(torch.uint8)

    def _build_report(
        self, results: list[tuple[str, ModuleReport]], failures: dict[str, str], scale: Any
    ) -> tuple[Report, dict[str, str]]:
        groups: dict[str, list[ModuleReport]] = {}
        for key, m in results:
            groups.setdefault(key, []).append(m)
        s = 1.0 if scale is None else float(scale)
        modules = {k: _unscale(merge_module_reports(v, k), s) for k, v in groups.items()}
        if _distributed():  # identical merged report on every rank
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (modules, failures))
            by_key: dict[str, list[ModuleReport]] = {}
            failures = {}
            for mods, fails in gathered:
                for k, m in mods.items():
                    by_key.setdefault(k, []).append(m)
                for k, why in fails.items():
                    failures.setdefault(k, why)
            modules = {k: merge_module_reports(v, k) for k, v in by_key.items()}
        return Report(modules=modules, failures=dict(failures)), failures

    def _handle_failures(self, failures: Mapping[str, str]) -> None:
        if self.session is None:
            return
        for name, why in failures.items():
            if name in self.disabled:
                continue
            self.disabled[name] = why
            self.session.disable(name, why)
            self._warn_once(
                f"failure:{name}",
                f"gradwatch: stopped watching {name!r} after an internal error ({why}); the "
                "other modules are still watched and training is not affected",
            )

    # -- history -----------------------------------------------------------------------------
    def flush_signals(self) -> tuple[StepSignals, ...]:
        """Copy the pending cheap signals to the host history (one transfer)."""
        if not self._pending:
            return ()
        pending, self._pending = self._pending, []
        sigs = torch.stack([p[1] for p in pending]).cpu()
        flags = torch.stack([p[2] for p in pending]).cpu()
        out = []
        for (step, _, _, reason), sig, fl in zip(pending, sigs, flags, strict=True):
            rows = []
            for r in range(2):
                cnt = sig[2 + r]
                vals = sig[r] / cnt.clamp_min(1)
                rows.append(
                    {n: float(vals[i]) for i, n in enumerate(self.names) if float(cnt[i]) > 0}
                )
            spike, nonfinite, skipped = (bool(v) for v in fl.tolist())
            s = StepSignals(step, rows[0], rows[1], spike, nonfinite, skipped, reason)
            self.signals.append(s)
            out.append(s)
        return tuple(out)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detector state and history, made of plain types and CPU tensors only (loadable
        with ``torch.load(weights_only=True)``). Reports are not saved."""
        self.flush_signals()
        pending = getattr(self, "_loaded", None)
        if pending is not None:  # loaded before training started: hand it on unchanged
            return {
                **pending,
                "tracker": self.tracker.state_dict(),
                "signals": [s.as_dict() for s in self.signals],
            }
        return {
            "version": 1,
            "names": list(self.names),
            "ema": None if self._ema is None else self._ema.detach().cpu().clone(),
            "count": None if self._count is None else self._count.detach().cpu().clone(),
            "tracker": self.tracker.state_dict(),
            "signals": [s.as_dict() for s in self.signals],
            "disabled": dict(self.disabled),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError(f"not a gradwatch monitor state: {state!r:.200}")
        self.tracker.load_state_dict(state["tracker"])
        self.signals = deque(
            (StepSignals(**s) for s in state.get("signals", [])), maxlen=10 * self.history
        )
        self._loaded = state
        if self.session is not None:
            self._restore_detector()

    def _restore_detector(self) -> None:
        state, self._loaded = self._loaded, None
        if state is None:
            return
        if state.get("names") != self.names:
            self._warn_once(
                "<resume>",
                "gradwatch: the checkpoint's monitor state is for modules "
                f"{state.get('names')}, the model has {self.names}: spike detection restarts",
            )
            return
        if state.get("ema") is not None:
            self._ema = state["ema"].to(self._device)
            self._count = state["count"].to(self._device)


# ------------------------------------------------------------------------------ clipping
_CLIP_CHOICES = {
    "clip_mode": ("always", "reactive"),
    "clip_scope": ("all", "recurrent"),
    "clip_nonfinite": ("skip", "zero", "leave"),
}
#: Verdicts of the latest capture that make reactive clipping engage.
REACTIVE_VERDICTS = ("exploding", "nonfinite")


class ClipControl:
    """Drives a `Clipper` at the end of every optimizer step, for both adapters.

    Framework-free: it picks the parameters (``scope``), decides whether a reactive step is
    flagged (from the core's flags and verdicts, identical on every DDP rank), applies the
    skip of ``nonfinite="skip"``, keeps the events (bounded) and logs them. The caller makes
    sure the gradients are unscaled and reduced, and calls it after
    `MonitorCore.finish_step` (which must measure the gradients before they are clipped).
    """

    def __init__(self, clipper: Clipper, *, spec: str, history: int = 100, warn: Warn) -> None:
        self.clipper = clipper
        self.spec = spec  # how the user wrote it, for messages: "clip='norm'"
        self.events: deque[ClipEvent] = deque(maxlen=10 * history)
        self.warn = warn
        self.engaged = False  # reactive clipping has applied at least once (warned once)
        self._warned: set[str] = set()
        self._recurrent: set[int] | None = None
        self._cache: dict[int, tuple[list[Tensor], list[Tensor]]] = {}

    @staticmethod
    def build(
        clip: Any,
        *,
        clip_mode: str | None,
        clip_scope: str | None,
        clip_nonfinite: str | None,
        history: int,
        warn: Warn,
    ) -> ClipControl | None:
        """Validate the constructor arguments of an adapter; ``None`` when ``clip is None``."""
        given = {"clip_mode": clip_mode, "clip_scope": clip_scope, "clip_nonfinite": clip_nonfinite}
        for name, value in given.items():
            if value is not None and value not in _CLIP_CHOICES[name]:
                options = ", ".join(repr(v) for v in _CLIP_CHOICES[name])
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        set_ = [f"{k}={v!r}" for k, v in given.items() if v is not None]
        if clip is None:
            if set_:
                raise ValueError(
                    f"{', '.join(set_)} has no effect without clip=...: pass a strategy, e.g. "
                    "clip='autoclip', or leave these arguments out"
                )
            return None
        if isinstance(clip, Clipper):
            if set_:
                raise ValueError(
                    f"clip is a configured Clipper ({clip!r}); set mode, scope and nonfinite on "
                    f"the Clipper itself instead of {', '.join(set_)}"
                )
            clipper = clip
        else:
            try:
                clipper = Clipper(
                    clip,
                    mode=clip_mode or "always",  # type: ignore[arg-type]
                    scope=clip_scope or "all",  # type: ignore[arg-type]
                    nonfinite=clip_nonfinite or "skip",  # type: ignore[arg-type]
                )
            except ValueError as e:
                raise ValueError(f"clip={clip!r}: {e}") from None
        return ClipControl(clipper, spec=f"clip={clip!r}", history=history, warn=warn)

    def __getstate__(self) -> dict[str, Any]:  # picklable for ddp_spawn
        state = self.__dict__.copy()
        state["_recurrent"], state["_cache"] = None, {}
        return state

    @property
    def reactive(self) -> bool:
        return self.clipper.mode == "reactive"

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    # -- parameters --------------------------------------------------------------------------
    def bind(
        self,
        model: nn.Module,
        include: Iterable[Selector] | None = None,
        exclude: Iterable[Selector] | None = None,
    ) -> None:
        """Find the recurrent modules' parameters (``scope="recurrent"``) of ``model``."""
        from gradwatch.capture.discovery import _matches, display_name

        ids: set[int] = set()
        for qualified, module in model.named_modules():
            if not isinstance(module, RECURRENT_TYPES):
                continue
            name = display_name(model, qualified)
            if include and not _matches(name, module, include):
                continue
            if exclude and _matches(name, module, exclude):
                continue
            ids.update(id(p) for p in module.parameters())
        self._recurrent = ids
        self._cache.clear()
        if self.clipper.scope == "recurrent" and not ids:
            self._warn_once(
                "<no-recurrent>",
                f"gradwatch: {self.spec} with scope 'recurrent', but {type(model).__name__} "
                "has no recurrent module (after include/exclude): nothing will be clipped",
            )

    def _parameters(self, optimizer: Any, model: nn.Module | None) -> tuple[list, list]:
        """(parameters to clip, parameters of the step) in a fixed order, the same on every
        rank: the optimizer's parameter groups, else the model's parameters."""
        key = id(optimizer) if optimizer is not None else 0
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if optimizer is not None and hasattr(optimizer, "param_groups"):
            stepped = list({id(p): p for g in optimizer.param_groups for p in g["params"]}.values())
        else:
            stepped = list(model.parameters()) if model is not None else []
        clipped = stepped
        if self.clipper.scope == "recurrent":
            ids = self._recurrent or set()
            clipped = [p for p in stepped if id(p) in ids]
        self._cache[key] = (clipped, stepped)
        return clipped, stepped

    # -- the step ----------------------------------------------------------------------------
    @staticmethod
    def flagged(outcome: StepOutcome | None, verdicts: Mapping[str, str]) -> str | None:
        """Why a reactive clipper should clip this step, or ``None``: this step's spike or
        non-finite flag, or an exploding / non-finite verdict of the latest capture."""
        flags = outcome.flags if outcome is not None else None
        if flags is not None:
            if flags[1]:
                return "non-finite signal"
            if flags[0]:
                return "spike"
        bad = sorted(n for n, v in verdicts.items() if v in REACTIVE_VERDICTS)
        if bad:
            return f"{verdicts[bad[0]]} verdict: {', '.join(bad)}"
        return None

    def step(
        self,
        step: int,
        *,
        optimizer: Any,
        model: nn.Module | None,
        outcome: StepOutcome | None,
        verdicts: Mapping[str, str],
        monitoring: bool = True,
        scaler: Any = None,
    ) -> ClipEvent | None:
        """Clip this step's gradients (already unscaled and reduced); returns the event.

        ``monitoring=False`` (the detector is off after an internal error): a reactive
        clipper then clips every step, with one warning. With ``nonfinite="skip"`` and no
        active GradScaler, the skip sets every gradient of the step's parameters to ``None``:
        ``torch.optim`` optimizers leave such parameters (and their state) untouched.
        """
        clipper = self.clipper
        why = None
        if self.reactive:
            if monitoring:
                why = self.flagged(outcome, verdicts)
            else:
                why = "monitoring off"
                self._warn_once(
                    "<monitoring-off>",
                    f"gradwatch: the detector is off, so reactive clipping ({self.spec}) "
                    "now clips every step",
                )
        clip_params, stepped = self._parameters(optimizer, model)
        clipper.step = step
        event = clipper.clip(clip_params, exploding=why is not None)
        if event is None:
            return None
        amp_skip = False
        if event.threshold is None:  # a non-finite total norm
            scale, _, _ = scaler_info(scaler, optimizer)
            if scale is not None:  # the GradScaler finds the same inf/NaN and skips the step
                amp_skip = True
                event = dataclasses.replace(
                    event, reason=f"{event.reason}; skipped by the GradScaler", skip_step=True
                )
            elif event.skip_step:
                for p in stepped:
                    p.grad = None
        elif why is not None:
            event = dataclasses.replace(event, reason=f"reactive: {why}")
        self.events.append(event)
        self._log(event, amp_skip)
        return event

    def _log(self, e: ClipEvent, amp_skip: bool) -> None:
        if _is_rank_zero() and log.isEnabledFor(logging.DEBUG):
            threshold = "-" if e.threshold is None else f"{e.threshold:.4g}"
            log.debug(
                "gradwatch: step %d: clip %s: norm %.4g, threshold %s, coefficient %.4g, %s%s",
                e.step,
                e.strategy,
                e.total_norm,
                threshold,
                e.coefficient,
                e.reason,
                " (warm-up)" if e.warmup else "",
            )
        if e.threshold is None and not amp_skip:
            action = {
                "skip": "the optimizer step is skipped (gradients set to None)",
                "zero": "gradients zeroed",
                "leave": "gradients left as they are",
            }[self.clipper.nonfinite]
            self._warn_once(
                "<nonfinite>",
                f"gradwatch: non-finite gradient norm ({e.total_norm}) at step {e.step}: "
                f"{action} (nonfinite={self.clipper.nonfinite!r}); later ones are logged at "
                "debug level, counted in clip_events and in the gradwatch/clip/* scalars",
            )
        elif self.reactive and e.clipped and not self.engaged:
            self.engaged = True
            self._warn_once(
                "<engaged>",
                f"gradwatch: reactive clipping engaged at step {e.step} ({e.reason[10:]}): "
                f"gradient norm {e.total_norm:.3g} clipped by {e.coefficient:.3g} "
                f"({e.strategy}, threshold {e.threshold:.3g}); later clips are logged at debug "
                "level and in the gradwatch/clip/* scalars",
            )

    @staticmethod
    def scalars(e: ClipEvent) -> dict[str, float]:
        """``gradwatch/clip/*`` scalars of one event."""
        from gradwatch.outputs.scalars import clip_scalars

        return clip_scalars(e)

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (``torch.load(weights_only=True)`` accepts them)."""
        return {
            "clipper": self.clipper.state_dict(),
            "events": [dataclasses.asdict(e) for e in self.events],
            "engaged": self.engaged,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.clipper.load_state_dict(state["clipper"])
        except (KeyError, ValueError, TypeError) as e:
            self._warn_once(
                "<resume>",
                f"gradwatch: the checkpoint's clipping state does not fit {self.spec} ({e}); "
                "clipping starts afresh",
            )
            return
        self.events = deque(
            (ClipEvent(**d) for d in state.get("events", [])), maxlen=self.events.maxlen
        )
        self.engaged = bool(state.get("engaged", False))
