r"""
GradWatch
=========

Watch the hidden-state gradients of every recurrent module of a LightningModule during
training: cheap signals at every optimizer step, an exact per-timestep capture with
diagnostics as often as its overhead budget allows (or every ``every_n_steps`` steps) and
after any spike or non-finite value.

The same class works with ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer``:
it derives from the ``Callback`` of each namespace that is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from typing_extensions import Unpack, override

from gradwatch._adapters._watcher import Watcher
from gradwatch._analysis.report import Report
from gradwatch._clipping import Clipper
from gradwatch._engine.budget import Overhead
from gradwatch._engine.options import WatchArgs, WatchOptions, watch_options

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


class _GradWatch(Watcher):
    r"""Watch vanishing and exploding gradients through time in a LightningModule's RNNs.

    Every optimizer step, GradWatch measures cheap signals on the device (the norm of the
    gradient injected into each recurrent module's outputs, each module's parameter
    gradient norm, a non-finite check). As often as its overhead budget allows (or every
    ``every_n_steps`` optimizer steps), and right after a spike or a non-finite value, it
    captures the step exactly: the per-timestep
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

    Keyword Args:
        overhead_budget (float | None): gradwatch's own time (hooks, signals, captures, what it
            writes to the loggers) as a fraction of the training time. Default 0.02 (2%):
            captures are spaced to stay within it, the first one included, and the cheap signals
            are computed every few steps when they alone would cost more than half of it. The
            time spent is in `overhead`, logged as ``gradwatch/overhead`` and summarised at the
            end of training (see ``docs/overhead.md``). ``None``: no budget (needs
            ``every_n_steps``).
        every_n_steps (int | None): Capture every this many optimizer steps, starting at the first,
            instead of the budget's schedule. Default ``None``: the budget decides.
        include (Selectors): Only watch modules matching these ``fnmatch`` name patterns (qualified
            names in the LightningModule, e.g. ``"encoder.*"``) or module types: one, or an iterable
            of them.
        exclude (Selectors): Do not watch modules matching these patterns or types.
        spike_factor (float): A cheap signal this many times above its running level triggers a
            capture (``math.inf``: never); non-finite values always trigger one.
        warmup_steps (int): Optimizer steps of running level before spikes are detected.
        history (int): Captured reports kept in `reports` (the last ``history``); the cheap-signal
            history keeps ``10 * history`` steps.
        log_every_n_steps (int | None): Copy the cheap signals to the host and log them every this
            many optimizer steps (the only host synchronisation besides captures). Default: the
            Trainer's ``log_every_n_steps``.
        thresholds (Thresholds | None): A `gradwatch.Thresholds` for the verdicts.
        clip (ClipSpec): Gradient clipping (see ``docs/clipping.md``). ``None`` (the default) never
            touches gradients. A strategy name (``"norm"``, ``"value"``, ``"autoclip"``,
            ``"zscore"``, ``"agc"``: published defaults), a configured `gradwatch.ClipStrategy`, or
            a `gradwatch.Clipper`, which also sets the mode (``"always"`` or ``"reactive"``), the
            scope (``"all"`` or ``"recurrent"``) and the non-finite policy (``"skip"``, ``"zero"``,
            ``"leave"``). Applied in ``on_before_optimizer_step``: after AMP unscaling and DDP
            reduction, before the optimizer step, in automatic and manual optimization. Refused at
            fit start together with ``Trainer(gradient_clip_val=...)``, a fused optimizer under a
            GradScaler, FSDP, DeepSpeed.
        figures (FiguresMode): Render matplotlib figures (heatmap, profile, propagation) on
            captures. ``"auto"`` (default): none when the panels go to TensorBoard, whose gradwatch
            tab draws the same data; every fifth capture's for other loggers that show images.
            ``True``: at every capture; ``False``: never.
        async_flags (bool | None): Read the spike flag one step late, without stalling the device
            (default: on CUDA; a spike at step ``s`` is then captured at step ``s + 2``). On the CPU
            (flags read at once) it is captured at step ``s + 1``.

    All arguments are keyword-only; they make a frozen `gradwatch.WatchOptions`
    (`options`), and each is also a read-only attribute of the same name.

    Raises:
        ValueError: If an argument is invalid; the message names it.

    Example:
        ```python
        from gradwatch import GradWatch

        gw = GradWatch(every_n_steps=50)
        trainer = Trainer(callbacks=[gw])
        trainer.fit(model)
        gw.verdicts                             # {"encoder.rnn": "healthy"}
        gw.reports[-1]["encoder.rnn"].total     # the latest: [layers, directions, T]
        gw.reports[0]["encoder.rnn"].verdict    # the capture at optimizer step 0
        gw.overhead.fraction                    # gradwatch's time / training time
        ```

    The state saved in checkpoints (detector levels, verdict history, cheap signals,
    clipping state) holds only plain types and tensors, so ``weights_only`` loading works.
    Its `state_key` depends on ``include``, ``exclude``, ``every_n_steps`` and ``clip``,
    so several GradWatch callbacks in one Trainer keep separate states.
    """

    def __init__(self, **options: Unpack[WatchArgs]) -> None:
        self._configure(watch_options("GradWatch", dict(options)), warn=_warn)
        self._training = False  # per fit: monitoring hooks are live
        self._clipping = False  # per fit: the clipper is bound to this fit's model

    @property
    @override
    def state_key(self) -> str:
        # What decides which modules are watched and how: two callbacks that differ in it keep
        # separate checkpoint states (Lightning's own callbacks do the same). Lightning reads
        # it at every hook call of every batch: computed once (the options are frozen).
        cached = self.__dict__.get("_state_key")
        if cached is not None and cached[0] is self._options:
            return cached[1]
        plain = self._options.to_plain()
        keys = ("every_n_steps", "include", "exclude", "clip")
        key = self._generate_state_key(**{k: plain[k] for k in keys})
        self.__dict__["_state_key"] = (self._options, key)
        return key

    # -- per-fit state: bound to this fit's Trainer, released at teardown ------------------
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._release()  # left over from an interrupted fit of another Trainer, if any
        if trainer.is_global_zero and trainer.loggers:
            try:
                self._open_panels(list(trainer.loggers))
            except Exception as e:  # monitoring must never crash training
                self._core.break_down(e)

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._clip is not None:  # refusals: a clear error instead of wrong gradients
            _check_clipping_setup(self._clip.spec, trainer)

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
            if self._options.log_every_n_steps is None:
                self._core.log_every_n_steps = max(1, int(trainer.log_every_n_steps))
            self._core.bind(pl_module, start_step=trainer.global_step)
            self._core.attach()
            self._training = True
            self._write_layout()
        except Exception as e:  # monitoring must never crash training
            self._core.break_down(e)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        # Lightning calls this inside optimizer.step() (automatic and manual optimization),
        # after the precision plugin's scaler.unscale_ and after DDP's all-reduce, before the
        # parameters change: the monitor measures the raw gradients first, then they are
        # clipped, then the step's scalars (clip included) are published.
        self._finish_step(
            trainer.global_step,
            optimizer=optimizer,
            model=pl_module,
            scaler=trainer.scaler,
            monitor=self._training,
            clip=self._clipping,
        )

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._core.detach()  # validation inside fit: no hooks, no cost

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._training:
            self._core.attach()

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._training = self._clipping = False
        self._core.detach()
        try:
            self._core.flush_signals()
            if trainer.is_global_zero:
                _log_summary(trainer, self._core.reports, self._core.overhead)
        except Exception as e:
            log.debug("gradwatch: no summary table: %r", e)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._release()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        """End of a fit: no hooks, nothing recorded, no logger of that Trainer kept."""
        self._training = self._clipping = False
        self._core.close()
        self._close_panels()

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return self._state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_state(state_dict)

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the configuration-dependent state_key hold the state
        # under the class name: hand it to this callback (Lightning then loads it).
        # Those written when every_n_steps defaulted to 100 hold it under that key.
        states = checkpoint.get("callbacks")
        key = self.state_key
        if not isinstance(states, dict) or key in states:
            return
        for old in (self._old_default_state_key(), _LEGACY_STATE_KEY):
            if old is not None and old in states:
                states[key] = states[old]
                return

    def _old_default_state_key(self) -> str | None:
        """The `state_key` of this configuration when ``every_n_steps`` defaulted to 100."""
        if self._options.every_n_steps is not None:
            return None
        plain = {**self._options.to_plain(), "every_n_steps": 100}
        keys = ("every_n_steps", "include", "exclude", "clip")
        return self._generate_state_key(**{k: plain[k] for k in keys})

    def __getstate__(self) -> dict[str, Any]:
        # Pickled as plain data: the options and the checkpoint state. ddp_spawn pickles
        # callbacks, and libraries such as darts pickle them inside a saved model and load it
        # with a safe (allow-list) unpickler: no gradwatch internals, no writer, not the
        # ``log``/``log_dict`` that Lightning attaches to every callback during fit.
        return {"options": self._options.to_plain(), "state": self.state_dict()}

    def __setstate__(self, data: dict[str, Any]) -> None:
        if "options" in data:
            options = WatchOptions.from_plain(data["options"])
        else:  # pickled before WatchOptions (e.g. inside a saved darts model)
            options = WatchOptions.from_plain(_legacy_arguments(data["init"]))
        self._configure(options, warn=_warn)
        self._training = self._clipping = False
        self.load_state_dict(data["state"])


_LEGACY_STATE_KEY = "GradWatch"  # the state_key of gradwatch <= 0.1.0.dev0


def _legacy_arguments(init: dict[str, Any]) -> dict[str, Any]:
    """The pickled constructor arguments of an older GradWatch, as today's options: the
    ``clip_*`` arguments become the Clipper's settings."""
    init = dict(init)
    moved = {k: init.pop(f"clip_{k}", None) for k in ("mode", "scope", "nonfinite")}
    moved = {k: v for k, v in moved.items() if v is not None}
    if moved and init.get("clip") is not None and not isinstance(init["clip"], Clipper):
        init["clip"] = Clipper(init["clip"], **moved)
    return init


def _log_summary(trainer: Any, reports: Mapping[int, Report], overhead: Overhead) -> None:
    """The summary table of the latest verdict of every call and the overhead line, at the
    end of training."""
    latest: dict[str, Any] = {}
    for rep in reports.values():
        latest.update(rep.modules)
    from gradwatch._outputs.messages import summary_table

    lines = [summary_table(latest)] if latest else []
    table = "\n".join([*lines, overhead.describe()])
    log.info("%s", table)
    # shown like Lightning's own messages: a child of the Trainer's namespace logger, which
    # Lightning gives a console handler at INFO level
    root = "lightning.pytorch" if type(trainer).__module__.startswith("lightning.") else None
    logging.getLogger(f"{root or 'pytorch_lightning'}.gradwatch").info("%s", table)


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


class GradWatch(_GradWatch, *_callback_bases()):  # type: ignore[misc]
    __doc__ = _GradWatch.__doc__
