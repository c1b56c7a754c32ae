r"""
GradWatch
=========

Watch the hidden-state gradients of every recurrent module of a LightningModule during
training: cheap signals at every optimizer step, an exact per-timestep capture with
diagnostics every ``every_n_steps`` steps and after any spike or non-finite value.

The same class works with ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer``:
it derives from the ``Callback`` of each namespace that is installed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from typing_extensions import override

from gradwatch._analysis.report import Report
from gradwatch._capture import Selectors, normalize_selectors
from gradwatch._clipping import ClipEvent
from gradwatch._engine.monitor import (
    DEFAULT_EVERY_N_STEPS,
    ClipControl,
    MonitorCore,
    StepOutcome,
    StepSignals,
)

if TYPE_CHECKING:
    from torch.optim import Optimizer

__all__ = ["GradWatch"]

log = logging.getLogger("gradwatch")


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = []
    try:
        from lightning.pytorch import Callback as _LightningCallback

        bases.append(_LightningCallback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as _PLCallback

        bases.append(_PLCallback)
    except ImportError:
        pass
    if not bases:
        raise ModuleNotFoundError(
            "gradwatch.GradWatch needs `lightning` or `pytorch-lightning`; for plain PyTorch "
            "loops use gradwatch.Monitor"
        )
    return tuple(bases)


def _warn(message: str) -> None:
    """Warnings from rank zero only: the ``gradwatch`` logger and Lightning's warnings."""
    if rank_zero_only.rank == 0:
        log.warning(message)
    rank_zero_warn(message, category=RuntimeWarning)


class _GradWatch:
    r"""Watch vanishing and exploding gradients through time in a LightningModule's RNNs.

    Every optimizer step, GradWatch measures cheap signals on the device (the norm of the
    gradient injected into each recurrent module's outputs, each module's parameter
    gradient norm, a non-finite check). Every ``every_n_steps`` optimizer steps, and right
    after a spike or a non-finite value, it captures the step exactly: the per-timestep
    hidden-state gradients dL/dh_t of every recurrent module call, their propagation gain,
    memory horizon, causes and a verdict (``healthy``, ``vanishing``, ``exploding``,
    ``nonfinite``). A verdict change is logged once, as a warning from rank zero; scalars and
    figures go to the Trainer's loggers.

    Training is not changed: with ``clip=None`` the weights are bit-identical to a run
    without the callback. Works with gradient accumulation (one report per optimizer step,
    all micro-batches merged), AMP (16-mixed: gradients are divided by the loss scale and
    steps skipped by the GradScaler are reported as skipped; bf16-mixed), manual
    optimization (one report per ``optimizer.step()``), several optimizers and DDP
    (statistics reduced over ranks before any decision). Validation, test and predict loops
    are not hooked.

    Args:
        every_n_steps: Capture every this many optimizer steps, starting at the first.
            Default 100: a capture replays each recurrence once (about the cost of the
            module's own forward and backward), so the amortised cost is ~1% of a step.
        include: Only watch modules matching these ``fnmatch`` name patterns (qualified
            names in the LightningModule, e.g. ``"encoder.*"``) or module types.
        exclude: Do not watch modules matching these patterns or types.
        spike_factor: A cheap signal this many times above its running level triggers a
            capture (``math.inf``: never); non-finite values always trigger one.
        warmup_steps: Optimizer steps of running level before spikes are detected.
        history: Captured reports kept in `reports` (the last ``history``); the
            cheap-signal history keeps ``10 * history`` steps.
        log_every_n_steps: Copy the cheap signals to the host and log them every this many
            optimizer steps (the only host synchronisation besides captures). Default: the
            Trainer's ``log_every_n_steps``.
        thresholds: A `gradwatch._analysis.verdicts.Thresholds` for the verdicts.
        clip: Gradient clipping (see ``docs/clipping.md``). ``None`` (the default) never
            touches gradients. A strategy name (``"norm"``, ``"value"``, ``"autoclip"``,
            ``"zscore"``, ``"agc"``: published defaults), a configured
            `gradwatch._clipping.ClipStrategy`, or a configured
            `gradwatch._clipping.Clipper` (then leave the three ``clip_*`` arguments
            out). Applied in ``on_before_optimizer_step``: after AMP unscaling and DDP
            reduction, before the optimizer step, in automatic and manual optimization.
            Refused at fit start together with ``Trainer(gradient_clip_val=...)``, a fused
            optimizer under a GradScaler, FSDP, DeepSpeed.
        clip_mode: ``"always"`` (default) or ``"reactive"``: clip only on steps where the
            detector flags a spike or non-finite value, or while the latest capture's
            verdict is exploding (or non-finite). Adaptive strategies observe every step.
        clip_scope: ``"all"`` (default): every parameter of the stepping optimizer;
            ``"recurrent"``: only those of the recurrent modules (``include``/``exclude``
            apply).
        clip_nonfinite: A non-finite gradient norm: ``"skip"`` (default) the optimizer
            step (gradients set to ``None``: parameters and optimizer state unchanged),
            ``"zero"`` the gradients, or ``"leave"`` them. Always logged.
        figures: Render TensorBoard figures (heatmap, profile, propagation) on captures.
        async_flags: Read the spike flag one step late, without stalling the device
            (default: on CUDA; a spike at step ``s`` is then captured at step ``s + 2``).
            On the CPU the spike step itself is captured.

    Raises:
        ValueError: If an argument is invalid; the message names it.

    Example:
        ```python
        from gradwatch import GradWatch

        gw = GradWatch(every_n_steps=50)
        trainer = Trainer(callbacks=[gw])
        trainer.fit(model)
        gw.verdicts                        # {"encoder.rnn": "healthy"}
        gw.reports[0]["encoder.rnn"].total  # [num_layers, num_directions, T]
        ```

    The state saved in checkpoints (detector levels, verdict history, cheap signals,
    clipping state) holds only plain types and tensors, so ``weights_only`` loading works.
    """

    def __init__(
        self,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        *,
        include: Selectors | None = None,
        exclude: Selectors | None = None,
        spike_factor: float = 10.0,
        warmup_steps: int = 10,
        history: int = 100,
        log_every_n_steps: int | None = None,
        thresholds: Any = None,
        clip: Any = None,
        clip_mode: str | None = None,
        clip_scope: str | None = None,
        clip_nonfinite: str | None = None,
        figures: bool = True,
        async_flags: bool | None = None,
    ) -> None:
        if not isinstance(figures, bool):
            raise ValueError(f"figures must be True or False, got {figures!r}")
        # a tuple from here on: pickles as given (a single pattern is never split up)
        include = normalize_selectors(include, "include")
        exclude = normalize_selectors(exclude, "exclude")
        args = dict(
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
        # What pickling keeps: the arguments, as plain data where possible (see __getstate__)
        self._init_kwargs = _plain_arguments(
            **args,
            clip=clip,
            clip_mode=clip_mode,
            clip_scope=clip_scope,
            clip_nonfinite=clip_nonfinite,
            figures=figures,
        )
        self._core = MonitorCore(**args, warn=_warn)
        self._clip = ClipControl.build(
            clip,
            clip_mode=clip_mode,
            clip_scope=clip_scope,
            clip_nonfinite=clip_nonfinite,
            history=history,
            warn=_warn,
        )
        self._log_every_n_steps = log_every_n_steps
        self.clip = clip
        self.figures = figures
        self._writer: Any = None
        self._training = False
        self._clipping = False

    # -- results -----------------------------------------------------------------------------
    @property
    def reports(self) -> dict[int, Report]:
        """Captured reports by optimizer step (``trainer.global_step`` before the step); the
        last ``history`` of them."""
        return dict(self._core.reports)

    @property
    def verdicts(self) -> dict[str, str]:
        """Latest verdict of every watched module call (with hysteresis)."""
        return self._core.verdicts

    @property
    def signals(self) -> list[StepSignals]:
        """Cheap signals of recent optimizer steps (copied to the host on logging steps)."""
        return list(self._core.signals)

    @property
    def names(self) -> list[str]:
        """The watched modules (known from the start of training)."""
        return list(self._core.names)

    @property
    def clipper(self) -> Any:
        """The `gradwatch._clipping.Clipper` in use (``None`` with ``clip=None``)."""
        return None if self._clip is None else self._clip.clipper

    @property
    def clip_events(self) -> list[ClipEvent]:
        """Recent clipping events (the last ``10 * history``), ``step`` being
        ``trainer.global_step``: every step in ``"always"`` mode, the clipped steps in
        ``"reactive"`` mode, and every non-finite step."""
        return [] if self._clip is None else list(self._clip.events)

    # -- clipping: refusals --------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._clip is not None:
            _check_clipping_setup(self._clip.spec, trainer)

    # -- lifecycle ---------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._clip is not None:  # outside the monitoring's safety net: clipping must work
            self._clip.bind(pl_module, self._core.include, self._core.exclude)
            self._clipping = True
        # Discovery here, not in __init__: modules created in setup()/configure_model() exist
        # now, and the checkpoint (if resuming) has been restored into this callback.
        try:
            if getattr(trainer.strategy, "handles_gradient_accumulation", False):
                self._core.break_down(
                    RuntimeError(
                        f"{type(trainer.strategy).__name__} accumulates gradients itself "
                        "(DeepSpeed), which GradWatch does not support"
                    )
                )
                return
            if self._log_every_n_steps is None:
                self._core.log_every_n_steps = max(1, int(trainer.log_every_n_steps))
            self._core.bind(pl_module, start_step=trainer.global_step)
            self._core.attach()
            self._training = True
            if self._writer is None and trainer.is_global_zero and trainer.loggers:
                self._writer = _panel_writer(trainer.loggers, self._core.history, self.figures)
                if self._writer is not None and self._core.names:
                    self._writer.write_layout(self._core.names)
        except Exception as e:  # monitoring must never crash training
            self._core.break_down(e)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        # Lightning calls this inside optimizer.step() (automatic and manual optimization),
        # after the precision plugin's scaler.unscale_ and after DDP's all-reduce, before the
        # parameters change: the monitor measures the raw gradients first, then they are
        # clipped, then the step's scalars (clip included) are published.
        step = trainer.global_step
        out = None
        if self._training:
            try:
                out = self._core.finish_step(
                    step,
                    optimizer=optimizer,
                    scaler=trainer.scaler,
                    read_flags=self._clip is not None and self._clip.reactive,
                )
            except Exception as e:  # monitoring must never crash training
                self._core.break_down(e)
        event = None
        if self._clip is not None and self._clipping:
            event = self._clip.step(
                step,
                optimizer=optimizer,
                model=pl_module,
                outcome=out,
                verdicts=self._core.verdicts,
                monitoring=self._core.broken is None,
                scaler=trainer.scaler,
            )
        if out is not None or event is not None:
            try:
                self._publish(out or StepOutcome(step), event)
            except Exception as e:  # monitoring must never crash training
                self._core.break_down(e)

    def _publish(self, out: StepOutcome, event: ClipEvent | None = None) -> None:
        for change in out.changes:
            _warn(_change_message(change))
        if self._writer is None:
            return
        extra = _signal_scalars(out.signals[-1]) if out.signals else {}
        if event is not None and (
            # every clip, every non-finite step, every reactive event, and the threshold on
            # logging steps (in "always" mode an event comes every step)
            event.clipped
            or event.threshold is None
            or not event.reason.startswith("always")
            or self._core.is_logging_step(out.step)
        ):
            extra.update(ClipControl.scalars(event))
        try:
            if out.report is not None:
                self._writer.write(out.step, out.report, extra_scalars=extra)
            elif extra:
                self._writer.write_scalars(out.step, extra)
        except Exception as e:  # a logger problem must not stop monitoring or training
            log.debug("gradwatch: could not write panels: %r", e)

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._core.detach()  # validation inside fit: no hooks, no cost

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._training:
            self._core.attach()

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._training = False
        self._clipping = False
        self._core.detach()
        try:
            self._core.flush_signals()
            latest = _latest(self._core.reports)
            if latest and trainer.is_global_zero:
                from gradwatch._outputs.messages import summary_table

                table = summary_table(latest)
                log.info("%s", table)
                # shown like Lightning's own messages: a child of the Trainer's namespace
                # logger, which Lightning gives a console handler at INFO level
                root = "pytorch_lightning"
                if type(trainer).__module__.startswith("lightning."):
                    root = "lightning.pytorch"
                logging.getLogger(f"{root}.gradwatch").info("%s", table)
        except Exception as e:
            log.debug("gradwatch: no summary table: %r", e)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._training = self._clipping = False
        self._core.close()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._training = self._clipping = False
        self._core.close()

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = self._core.state_dict()
        if self._clip is not None:
            state["clip"] = self._clip.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        clip = state.pop("clip", None)
        self._core.load_state_dict(state)
        if self._clip is not None and clip is not None:
            self._clip.load_state_dict(clip)
        elif self._clip is not None:
            log.info("gradwatch: the checkpoint holds no clipping state; clipping starts afresh")

    def __getstate__(self) -> dict[str, Any]:
        # Pickled as plain data: the constructor arguments and the checkpoint state. ddp_spawn
        # pickles callbacks, and libraries such as darts pickle them inside a saved model and
        # load it with a safe (allow-list) unpickler: no gradwatch internals, no writer, not
        # the ``log``/``log_dict`` that Lightning attaches to every callback during fit.
        return {"init": dict(self._init_kwargs), "state": self.state_dict()}

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.__init__(**_from_plain(data["init"]))  # type: ignore[misc]
        self.load_state_dict(data["state"])


def _plain_arguments(**kwargs: Any) -> dict[str, Any]:
    """Constructor arguments with types replaced by qualified names and thresholds by a
    dict, so a pickled GradWatch holds (almost) nothing but builtins."""
    for key in ("include", "exclude"):
        if kwargs[key] is not None:
            kwargs[key] = [
                {"type": f"{s.__module__}:{s.__qualname__}"} if isinstance(s, type) else s
                for s in kwargs[key]
            ]
    thresholds = kwargs["thresholds"]
    if thresholds is not None and hasattr(thresholds, "as_dict"):
        kwargs["thresholds"] = {"thresholds": thresholds.as_dict()}
    return kwargs


def _from_plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    import importlib

    kwargs = dict(kwargs)
    for key in ("include", "exclude"):
        if kwargs.get(key) is not None:
            items = []
            for s in kwargs[key]:
                if isinstance(s, dict) and "type" in s:
                    module, _, qualname = s["type"].partition(":")
                    obj: Any = importlib.import_module(module)
                    for part in qualname.split("."):
                        obj = getattr(obj, part)
                    s = obj
                items.append(s)
            kwargs[key] = items
    thresholds = kwargs.get("thresholds")
    if isinstance(thresholds, dict) and "thresholds" in thresholds:
        from gradwatch._analysis.verdicts import Thresholds

        kwargs["thresholds"] = Thresholds(**thresholds["thresholds"])
    return kwargs


_UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "FSDP shards the gradients: a clipper would see one shard per rank",
    "ModelParallelStrategy": "FSDP2/tensor parallelism shards the gradients (DTensors)",
    "DeepSpeedStrategy": "DeepSpeed owns the gradients and clips inside its engine "
    "(use its gradient_clipping config)",
}


def _check_clipping_setup(spec: str, trainer: Any) -> None:
    """Refuse, at fit start, setups where GradWatch cannot clip correctly (a clear
    ``ValueError`` instead of silently wrong gradients)."""
    who = f"GradWatch({spec})"
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val is not None and clip_val > 0:
        raise ValueError(
            f"{who} and Trainer(gradient_clip_val={clip_val}) would both clip the gradients "
            "(GradWatch first, then the Trainer on what is left). Clip in one place: remove "
            "gradient_clip_val from the Trainer, or use GradWatch(clip=None)"
        )
    strategy = getattr(trainer, "strategy", None)
    for cls in type(strategy).__mro__:
        why = _UNSUPPORTED_STRATEGIES.get(cls.__name__)
        if why is not None:
            raise ValueError(
                f"{who} cannot clip under {type(strategy).__name__}: {why}. Use "
                "GradWatch(clip=None) with this strategy"
            )
    if getattr(strategy, "handles_gradient_accumulation", False):
        raise ValueError(
            f"{who} cannot clip under {type(strategy).__name__}, which accumulates and steps "
            "gradients itself. Use GradWatch(clip=None) with this strategy"
        )
    scaler = getattr(trainer, "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        for opt in getattr(trainer, "optimizers", []):
            if getattr(opt, "_step_supports_amp_scaling", False):
                raise ValueError(
                    f"{who} cannot clip with {type(opt).__name__}(fused=True) under the "
                    f"GradScaler of precision={trainer.precision!r}: a fused optimizer "
                    "unscales inside its step, so the gradients are still loss-scaled when "
                    "they could be clipped. Use a non-fused optimizer (foreach is fast too), "
                    "bf16-mixed, or GradWatch(clip=None)"
                )


def _latest(reports: dict[int, Report]) -> dict[str, Any]:
    latest: dict[str, Any] = {}
    for rep in reports.values():
        latest.update(rep.modules)
    return latest


def _panel_writer(loggers: list[Any], history: int, figures: bool) -> Any:
    try:
        from gradwatch._outputs.panels import PanelWriter
    except ImportError:
        return None
    return PanelWriter(list(loggers), history=max(history, 1), figures=figures)


def _signal_scalars(s: StepSignals) -> dict[str, float]:
    from gradwatch._outputs.scalars import module_tag

    out = {module_tag(n, "param_grad_norm"): v for n, v in s.grad_norm.items()}
    out.update({module_tag(n, "injected_grad_norm"): v for n, v in s.injected.items()})
    out["gradwatch/step/skipped"] = float(s.skipped)
    out["gradwatch/step/spike"] = float(s.spike)
    return out


def _change_message(change: Any) -> str:
    try:
        from gradwatch._outputs.messages import change_message

        return change_message(change.report, change.old, change.new, change.report.seq_len)
    except Exception:
        m = change.report
        return f"gradwatch: {change.name}: {change.old} -> {change.new}. {m.explain()}"


class GradWatch(_GradWatch, *_callback_bases()):  # type: ignore[misc]
    __doc__ = _GradWatch.__doc__
