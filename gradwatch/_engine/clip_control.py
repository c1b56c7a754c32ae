"""``ClipControl``: gradient clipping at the end of every optimizer step, for both adapters.

It picks the parameters (``scope``), decides whether a reactive step is flagged (from the
core's flags and verdicts, identical on every DDP rank), applies the skip of
``nonfinite="skip"``, keeps the events (bounded), logs them and saves them in checkpoints.
The `Clipper` itself (gradwatch._clipping) does the arithmetic.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from gradwatch._base.vocabulary import EXPLODING_VERDICTS
from gradwatch._capture import Selectors, select_modules
from gradwatch._clipping import ClipEvent, Clipper
from gradwatch._engine._common import Warn, is_rank_zero, log, scaler_info
from gradwatch._engine.signals import StepOutcome

__all__ = ["ClipControl"]

_NONFINITE_ACTIONS = {
    "skip": "the optimizer step is skipped (gradients set to None)",
    "zero": "gradients zeroed",
    "leave": "gradients left as they are",
}


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
    def build(clip: Any, *, history: int, warn: Warn) -> ClipControl | None:
        """The control for an adapter's validated ``clip`` option; ``None`` for ``None``.

        A name or a strategy gets a `Clipper` with its defaults (mode ``"always"``, scope
        ``"all"``, non-finite ``"skip"``); configure a `Clipper` to change them."""
        if clip is None:
            return None
        clipper = clip if isinstance(clip, Clipper) else Clipper(clip)
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
        include: Selectors | None = None,
        exclude: Selectors | None = None,
    ) -> None:
        """Find the recurrent modules' parameters (``scope="recurrent"``) of ``model``."""
        ids: set[int] = set()
        for _, module in select_modules(model, include, exclude).modules():
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
            if flags.nonfinite:
                return "non-finite signal"
            if flags.spike:
                return "spike"
        bad = sorted(n for n, v in verdicts.items() if v in EXPLODING_VERDICTS)
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
        self._log(event, amp_skip, why)
        return event

    def _log(self, e: ClipEvent, amp_skip: bool, why: str | None) -> None:
        if is_rank_zero() and log.isEnabledFor(logging.DEBUG):
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
            action = _NONFINITE_ACTIONS[self.clipper.nonfinite]
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
                f"gradwatch: reactive clipping engaged at step {e.step} ({why}): "
                f"gradient norm {e.total_norm:.3g} clipped by {e.coefficient:.3g} "
                f"({e.strategy}, threshold {e.threshold:.3g}); later clips are logged at debug "
                "level and in the gradwatch/clip/* scalars",
            )

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
