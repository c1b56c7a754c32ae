"""``gradwatch.Monitor``: the training-loop monitor for plain PyTorch (no Lightning needed).

```python
mon = gradwatch.Monitor(model, log_dir="runs/exp1")   # panels optional
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

import logging
import os
import weakref
from types import TracebackType
from typing import Any

from torch import nn
from typing_extensions import Unpack

from gradwatch._adapters._watcher import Watcher
from gradwatch._analysis.report import Report
from gradwatch._engine._common import scaler_info
from gradwatch._engine.options import WatchArgs, watch_options

__all__ = ["Monitor"]

log = logging.getLogger("gradwatch")

#: ``log_every_n_steps=None`` in a plain loop (Lightning's default interval).
DEFAULT_LOG_EVERY_N_STEPS = 50


class Monitor(Watcher):
    """Watch the recurrent modules of ``model`` over a hand-written training loop.

    Call `step` once per optimizer step, after the last ``backward()`` of the step
    (several backward passes, e.g. gradient accumulation or truncated BPTT chunks, make one
    step) and before ``optimizer.step()``. A step costs cheap signals kept on the device; as
    often as the overhead budget allows (or every ``every_n_steps`` steps), and after a
    spike or a non-finite value, the step's recurrences are replayed exactly and diagnosed
    (see ``docs/plain_pytorch.md`` and ``docs/overhead.md``).
    Hooks are registered at construction and removed by `close` (or at the end of a
    ``with`` block). Training is not changed: the weights are bit-identical to a run
    without the monitor.

    Args:
        model: The model; its recurrent modules (``nn.RNN``/``LSTM``/``GRU`` and the cells)
            are found by type. Create the monitor after the model is fully built.
        scaler: The ``torch.amp.GradScaler`` of the loop, if any: captured gradients are
            divided by its scale, and steps it skips are reported as skipped.
        log_dir: Write gradwatch's TensorBoard panels (the same as `GradWatch` writes) to
            a ``SummaryWriter`` on this directory, closed by `close`.
        writer: Or write them to this ``SummaryWriter`` (or Lightning logger) of yours; it
            is flushed, not closed, by `close`.

    Keyword Args:
        overhead_budget (float | None): gradwatch's own time as a fraction of the training time
            (the rest of each step interval). Default 0.02: captures are spaced to stay within it,
            the first one included, and the cheap signals are computed every few steps when they
            alone would cost more than half of it. What was spent is in `overhead`, logged as
            ``gradwatch/overhead`` and at `close`. ``None``: no budget (needs ``every_n_steps``).
        every_n_steps (int | None): Capture (replay and diagnose) every this many optimizer steps,
            starting with the first, instead of the budget's schedule. Default ``None``.
        include (Selectors): Only watch modules matching these ``fnmatch`` name patterns or types
            (one, or an iterable of them).
        exclude (Selectors): Do not watch modules matching these patterns or types.
        spike_factor (float): A cheap signal this many times above its running level (an exponential
            average of its log over about 10 steps) triggers a capture. ``math.inf`` disables spike
            captures; non-finite values always trigger one.
        warmup_steps (int): Steps of running level before spikes are detected.
        history (int): Number of captured reports kept in `reports` (the oldest are dropped); the
            cheap-signal history keeps ``10 * history`` steps.
        log_every_n_steps (int | None): Copy the cheap signals to the host (and to the panels) every
            this many steps, the only host synchronisation outside captures. Default 50.
        thresholds (Thresholds | None): A `gradwatch.Thresholds` for the verdicts.
        clip (ClipSpec): Gradient clipping in `step` (see ``docs/clipping.md``); ``None`` (the
            default) never touches gradients. A strategy name (``"norm"``, ``"value"``,
            ``"autoclip"``, ``"zscore"``, ``"agc"``), a configured ``ClipStrategy``, or a
            `gradwatch.Clipper`, which also sets the mode, the scope (``"all"``: the parameters of
            the optimizer passed to `step`, else the model's) and the non-finite policy (``"skip"``:
            every gradient of the step set to ``None``, so ``optimizer.step()`` leaves the
            parameters and its state as they are).
        figures (FiguresMode): Render matplotlib figures on captures when panels are written:
            ``"auto"`` (default) none for a TensorBoard writer (the gradwatch tab draws the same
            data), every fifth capture's otherwise; ``True`` at every capture; ``False`` never.
        async_flags (bool | None): Read the spike flag one step late without stalling the device
            (default: on CUDA). A spike at step ``s`` is then captured at step ``s + 2``; on the CPU
            (flags read at once) at step ``s + 1``.

    The options are keyword-only and the same as `GradWatch`'s; they make a frozen
    `gradwatch.WatchOptions` (`options`), and each is a read-only attribute.

    Raises:
        ValueError: An argument is invalid (the message names it).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        scaler: Any = None,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        **options: Unpack[WatchArgs],
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise ValueError(f"scaler must be a torch.amp.GradScaler, got {scaler!r}")
        if log_dir is not None and writer is not None:
            raise ValueError("log_dir and writer: pass one of them (where the panels go)")
        self._configure(watch_options("Monitor", dict(options)))
        if self._options.log_every_n_steps is None:
            self._core.log_every_n_steps = DEFAULT_LOG_EVERY_N_STEPS
        self._model: nn.Module | None = model
        self._model_ref = weakref.ref(model)
        self.scaler = scaler
        self.global_step = 0
        self._own_writer: Any = None
        self._core.bind(model, start_step=0)
        self._core.attach()
        if self._clip is not None:
            self._clip.bind(model, self._core.include, self._core.exclude)
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = self._own_writer = SummaryWriter(log_dir=os.fspath(log_dir))
        if writer is not None:
            self._open_panels(writer)
            self._write_layout()

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
        out = self._finish_step(step, optimizer=optimizer, model=self.model, scaler=self.scaler)
        return None if out is None else out.report

    def _before_clip(self, optimizer: Any) -> None:
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
        """Remove every hook, release everything recorded and flush the panels (closing the
        writer of ``log_dir``); idempotent. The results stay readable. Logs the overhead
        spent (`overhead`) on the ``gradwatch`` logger at INFO level, once."""
        if self._model is not None and self.global_step > 0:
            log.info("%s", self._core.overhead.describe())
        self._core.close()
        self._close_panels()
        own, self._own_writer = self._own_writer, None
        if own is not None:
            own.close()
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

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detector state, history and clipping state: plain types and CPU tensors only."""
        return {"global_step": self.global_step, **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        step = int(state.pop("global_step", 0))
        self._load_state(state)
        self.global_step = step
        self._core.plan_step(step)
