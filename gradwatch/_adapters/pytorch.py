"""``gradwatch.Monitor``: the training-loop monitor for plain PyTorch (no Lightning needed).

```python
mon = gradwatch.Monitor(model)
for x, y in loader:
    loss = loss_fn(model(x), y)
    loss.backward()
    mon.step(optimizer)          # after the last backward, before optimizer.step()
    optimizer.step()
    optimizer.zero_grad()
mon.close()
mon.verdicts                     # {"encoder.rnn": "healthy", ...}
```
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import Any

from torch import nn

from gradwatch._analysis.report import Report
from gradwatch._capture import Selectors
from gradwatch._clipping import ClipEvent
from gradwatch._engine.monitor import (
    DEFAULT_EVERY_N_STEPS,
    ClipControl,
    MonitorCore,
    StepOutcome,
    StepSignals,
    scaler_info,
)

__all__ = ["Monitor"]


class Monitor:
    """Watch the recurrent modules of ``model`` over a hand-written training loop.

    Call `step` once per optimizer step, after the last ``backward()`` of the step
    (several backward passes, e.g. gradient accumulation or truncated BPTT chunks, make one
    step) and before ``optimizer.step()``. Every step costs only cheap signals kept on the
    device; every ``every_n_steps`` steps, and after a spike or a non-finite value, the
    step's recurrences are replayed exactly and diagnosed (see ``docs/plain_pytorch.md``).
    Hooks are registered at construction and removed by `close` (or at the end of a
    ``with`` block). Training is not changed: the weights are bit-identical to a run
    without the monitor.

    Args:
        model: The model; its recurrent modules (``nn.RNN``/``LSTM``/``GRU`` and the cells)
            are found by type. Create the monitor after the model is fully built.
        every_n_steps: Capture (replay and diagnose) every this many optimizer steps,
            starting with the first. Default 100.
        include: Only watch modules matching these ``fnmatch`` name patterns or types.
        exclude: Do not watch modules matching these patterns or types.
        spike_factor: A cheap signal this many times above its running level (an
            exponential average of its log over about 10 steps) triggers a capture.
            ``math.inf`` disables spike captures; non-finite values always trigger one.
        warmup_steps: Steps of running level before spikes are detected.
        history: Number of captured reports kept in `reports` (the oldest are
            dropped); the cheap-signal history keeps ``10 * history`` steps.
        log_every_n_steps: Copy the cheap signals to the host every this many steps (the
            only host synchronisation outside captures); ``None``: only on captures.
        thresholds: `gradwatch._analysis.verdicts.Thresholds` for the verdicts.
        scaler: The ``torch.amp.GradScaler`` of the loop, if any: captured gradients are
            divided by its scale, and steps it skips are reported as skipped.
        async_flags: Read the spike flag one step late without stalling the device
            (default: on CUDA). A spike at step ``s`` is then captured at step ``s + 2``;
            on the CPU it is captured at step ``s`` itself.
        clip: Gradient clipping in `step` (see ``docs/clipping.md``); ``None`` (the
            default) never touches gradients. A strategy name (``"norm"``, ``"value"``,
            ``"autoclip"``, ``"zscore"``, ``"agc"``), a configured ``ClipStrategy`` or a
            configured ``Clipper`` (then leave the ``clip_*`` arguments out).
        clip_mode: ``"always"`` (default) or ``"reactive"`` (only on steps with a spike or
            non-finite flag, or while the latest verdict is exploding or non-finite).
        clip_scope: ``"all"`` (default: the parameters of the optimizer passed to
            `step`, else the model's) or ``"recurrent"``.
        clip_nonfinite: ``"skip"`` (default: every gradient of the step set to ``None``, so
            ``optimizer.step()`` leaves the parameters and its state as they are),
            ``"zero"`` or ``"leave"``.

    Raises:
        ValueError: An argument is invalid (the message names it).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        include: Selectors | None = None,
        exclude: Selectors | None = None,
        spike_factor: float = 10.0,
        warmup_steps: int = 10,
        history: int = 100,
        log_every_n_steps: int | None = 50,
        thresholds: Any = None,
        scaler: Any = None,
        async_flags: bool | None = None,
        clip: Any = None,
        clip_mode: str | None = None,
        clip_scope: str | None = None,
        clip_nonfinite: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise ValueError(f"scaler must be a torch.amp.GradScaler, got {scaler!r}")
        self.core = MonitorCore(
            every_n_steps=every_n_steps,
            include=include,
            exclude=exclude,
            spike_factor=spike_factor,
            warmup_steps=warmup_steps,
            history=history,
            log_every_n_steps=log_every_n_steps,
            thresholds=thresholds,
            async_flags=async_flags,
        )
        self._clip = ClipControl.build(
            clip,
            clip_mode=clip_mode,
            clip_scope=clip_scope,
            clip_nonfinite=clip_nonfinite,
            history=history,
            warn=self.core.warn,
        )
        self._model: nn.Module | None = model
        self._model_ref = weakref.ref(model)
        self.scaler = scaler
        self.global_step = 0
        self.core.bind(model, start_step=0)
        self.core.attach()
        if self._clip is not None:
            self._clip.bind(model, self.core.include, self.core.exclude)

    # -- driving -----------------------------------------------------------------------------
    def step(self, optimizer: Any = None) -> Report | None:
        """Close one optimizer step; returns its report when the step was captured.

        Call after the step's last backward and before ``optimizer.step()`` (with a
        GradScaler: after ``scaler.unscale_(optimizer)`` if you call it, before
        ``scaler.step(optimizer)``). ``optimizer`` restricts the parameter-gradient signal
        to the modules it trains (useful with several optimizers).

        With ``clip``, the gradients are then clipped in place (the event is in
        `clip_events`). With a ``scaler``, pass the optimizer: its gradients are
        unscaled here first with ``scaler.unscale_(optimizer)`` unless you already did
        (``scaler.step`` does not unscale them twice). A skipped step (``nonfinite="skip"``)
        leaves every gradient ``None``: the ``optimizer.step()`` that follows changes
        nothing.
        """
        step = self.global_step
        self.global_step += 1
        clip = self._clip
        out: StepOutcome | None = None
        try:
            out = self.core.finish_step(
                step,
                optimizer=optimizer,
                scaler=self.scaler,
                read_flags=clip is not None and clip.reactive,
            )
        except Exception as e:  # monitoring must never crash training
            self.core.break_down(e)
        if clip is not None:
            self._unscale(optimizer)
            clip.step(
                step,
                optimizer=optimizer,
                model=self.model,
                outcome=out,
                verdicts=self.core.verdicts,
                monitoring=self.core.broken is None,
                scaler=self.scaler,
            )
        if out is None:
            return None
        for change in out.changes:
            self.core.warn(_change_message(change))
        return out.report

    def _unscale(self, optimizer: Any) -> None:
        """Unscale the gradients before clipping them, once (GradScaler's own bookkeeping)."""
        scale, grads_scaled, _ = scaler_info(self.scaler, optimizer)
        if scale is None or not grads_scaled:
            return
        if optimizer is None:
            raise ValueError(
                "Monitor(clip=..., scaler=...): pass the optimizer to step(optimizer) so that "
                "its gradients can be unscaled before they are clipped"
            )
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(
                f"Monitor(clip=...) cannot clip for {type(optimizer).__name__}(fused=True) "
                "with a GradScaler: a fused optimizer unscales inside its step, so the "
                "gradients are still loss-scaled here. Use a non-fused optimizer or clip=None"
            )
        self.scaler.unscale_(optimizer)

    @property
    def model(self) -> nn.Module | None:
        """The watched model (held weakly once the monitor is closed)."""
        return self._model if self._model is not None else self._model_ref()

    def close(self) -> None:
        """Remove every hook and release everything recorded (idempotent). The results
        (`reports`, `verdicts`, `signals`) stay; the model is no longer held."""
        self.core.close()
        self._model = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- results -----------------------------------------------------------------------------
    @property
    def reports(self) -> dict[int, Report]:
        """Captured reports by optimizer step (0-based), the last ``history`` of them."""
        return dict(self.core.reports)

    @property
    def verdicts(self) -> dict[str, str]:
        """Latest verdict of every watched module call (with hysteresis)."""
        return self.core.verdicts

    @property
    def signals(self) -> list[StepSignals]:
        """Cheap signals of recent steps (copied to the host on logging steps)."""
        self.core.flush_signals()
        return list(self.core.signals)

    @property
    def names(self) -> list[str]:
        """The watched modules."""
        return list(self.core.names)

    @property
    def clipper(self) -> Any:
        """The `gradwatch._clipping.Clipper` in use (``None`` with ``clip=None``)."""
        return None if self._clip is None else self._clip.clipper

    @property
    def clip_events(self) -> list[ClipEvent]:
        """Recent clipping events (the last ``10 * history``): every step in ``"always"``
        mode, the flagged steps in ``"reactive"`` mode, and every non-finite step."""
        return [] if self._clip is None else list(self._clip.events)

    def state_dict(self) -> dict[str, Any]:
        """Detector state, history and clipping state: plain types and CPU tensors only."""
        state = {"global_step": self.global_step, **self.core.state_dict()}
        if self._clip is not None:
            state["clip"] = self._clip.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        step = state.pop("global_step", 0)
        clip = state.pop("clip", None)
        if self._clip is not None and clip is not None:
            self._clip.load_state_dict(clip)
        self.core.load_state_dict(state)
        self.global_step = int(step)
        self.core.plan_step(self.global_step)


def _change_message(change: Any) -> str:
    """One log line for a verdict change (the panels' message when available)."""
    try:
        from gradwatch._outputs.messages import change_message

        return change_message(change.report, change.old, change.new, change.report.seq_len)
    except Exception:
        m = change.report
        return f"gradwatch: {change.name}: {change.old} -> {change.new}. {m.explain()}"
