"""`WatchOptions`: the configuration `GradWatch` and `Monitor` share, validated once.

Both adapters take these arguments under the same names, with the same defaults, and build
one frozen `WatchOptions` from them before anything else happens (as Lightning's own
callbacks validate in ``__init__``), so a bad value fails at construction with a
``ValueError`` naming the argument, never later inside a training step.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from typing_extensions import TypedDict

from gradwatch._capture import Selector, normalize_selectors
from gradwatch._clipping import STRATEGY_NAMES, Clipper, ClipStrategy
from gradwatch._clipping.strategies import StrategyName
from gradwatch._engine._common import check_int
from gradwatch._engine.budget import DEFAULT_OVERHEAD_BUDGET

if TYPE_CHECKING:
    from gradwatch._analysis.verdicts import Thresholds

__all__ = [
    "DEFAULT_OVERHEAD_BUDGET",
    "ClipSpec",
    "FiguresMode",
    "WatchArgs",
    "WatchOptions",
    "watch_options",
]

#: What ``figures=`` accepts: ``"auto"`` (none where the gradwatch TensorBoard tab draws the
#: same data, fewer elsewhere), ``True`` (at every capture) or ``False`` (never).
FiguresMode = Union[bool, Literal["auto"]]  # noqa: UP007 (a runtime alias)

#: What ``clip=`` accepts: nothing, a strategy name, a configured strategy or a Clipper.
ClipSpec = Union[StrategyName, ClipStrategy, Clipper, None]  # noqa: UP007 (a runtime alias)


#: What ``include=``/``exclude=`` accept: one pattern or type, or an iterable of them.
Selectors = Union[Selector, Iterable[Selector], None]  # noqa: UP007 (a runtime alias)

# Arguments that moved onto the Clipper: a constructor given one says how to migrate.
_MOVED_TO_CLIPPER = {"clip_mode": "mode", "clip_scope": "scope", "clip_nonfinite": "nonfinite"}


@dataclass(frozen=True)
class WatchOptions:
    """What `gradwatch.GradWatch` and `gradwatch.Monitor` share; see their docstrings.

    Attributes:
        overhead_budget: gradwatch's own time as a fraction of the training time (0.02: 2%).
            Without ``every_n_steps`` the captures are spaced to stay within it; the cheap
            signals are computed less often when they alone would exceed half of it. ``None``:
            no budget (then ``every_n_steps`` is required). See docs/overhead.md.
        every_n_steps: Capture every this many optimizer steps, starting at the first, instead
            of the budget's schedule (``None``, the default: the budget decides). The
            overhead is still measured and reported.
        include: Only watch modules matching these ``fnmatch`` name patterns or types
            (a tuple after validation; a single pattern or type is accepted).
        exclude: Do not watch modules matching these patterns or types.
        spike_factor: A cheap signal this many times above its running level triggers a
            capture (``math.inf``: never).
        warmup_steps: Optimizer steps of running level before spikes are detected.
        history: Captured reports kept (the cheap-signal history keeps ``10 * history``).
        log_every_n_steps: Copy the cheap signals to the host and log them every this many
            optimizer steps. ``None``: the loop's own interval (the Trainer's
            ``log_every_n_steps`` for `GradWatch`, 50 for `Monitor`).
        thresholds: A `gradwatch.Thresholds` for the verdicts (``None``: the defaults).
        clip: ``None`` (never touch gradients), a strategy name, a configured
            `gradwatch.ClipStrategy` or a configured `gradwatch.Clipper`.
        figures: Render matplotlib figures on captures (when panels are written):
            ``"auto"`` (default) renders none when panels go to a TensorBoard writer (the
            gradwatch tab draws the same data from tensor summaries) and every fifth capture's
            elsewhere; ``True`` at every capture; ``False`` never.
        async_flags: Read the spike flag one step late without stalling the device
            (``None``: on CUDA only).
    """

    overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET
    every_n_steps: int | None = None
    include: tuple[Selector, ...] | None = None
    exclude: tuple[Selector, ...] | None = None
    spike_factor: float = 10.0
    warmup_steps: int = 10
    history: int = 100
    log_every_n_steps: int | None = None
    thresholds: Thresholds | None = None
    clip: ClipSpec = None
    figures: FiguresMode = "auto"
    async_flags: bool | None = None

    def __post_init__(self) -> None:
        _check_budget(self.overhead_budget, self.every_n_steps)
        check_int("every_n_steps", self.every_n_steps, 1, allow_none=True)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("history", self.history, 1)
        check_int("log_every_n_steps", self.log_every_n_steps, 1, allow_none=True)
        factor = self.spike_factor
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 1:
            raise ValueError(
                f"spike_factor must be a number > 1 (math.inf turns spike detection off), "
                f"got {factor!r}"
            )
        if not isinstance(self.figures, bool) and self.figures != "auto":
            raise ValueError(f"figures must be 'auto', True or False, got {self.figures!r}")
        if not isinstance(self.async_flags, bool) and self.async_flags is not None:
            raise ValueError(f"async_flags must be True, False or None, got {self.async_flags!r}")
        for name in ("include", "exclude"):  # frozen: normalised through object.__setattr__
            object.__setattr__(self, name, normalize_selectors(getattr(self, name), name))
        if self.thresholds is not None:
            from gradwatch._analysis.verdicts import Thresholds

            if not isinstance(self.thresholds, Thresholds):
                raise ValueError(
                    f"thresholds must be a gradwatch.Thresholds, got {self.thresholds!r}"
                )
        _check_clip(self.clip)

    # -- plain data: pickling and checkpoint keys -------------------------------------------
    def to_plain(self) -> dict[str, Any]:
        """The options as builtins where possible: module types as ``{"type": "mod:Qual"}``,
        thresholds as ``{"thresholds": {...}}`` (``clip`` is kept as given). What a pickled
        `GradWatch` holds, so an allow-list unpickler needs no gradwatch internals."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("include", "exclude"):
            if out[key] is not None:
                out[key] = [
                    {"type": f"{s.__module__}:{s.__qualname__}"} if isinstance(s, type) else s
                    for s in out[key]
                ]
        if self.thresholds is not None:
            out["thresholds"] = {"thresholds": self.thresholds.as_dict()}
        return out

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> WatchOptions:
        """The inverse of `to_plain`."""
        data = dict(data)
        for key in ("include", "exclude"):
            if data.get(key) is not None:
                data[key] = [_resolve_type(s) for s in data[key]]
        thresholds = data.get("thresholds")
        if isinstance(thresholds, dict) and "thresholds" in thresholds:
            from gradwatch._analysis.verdicts import Thresholds

            data["thresholds"] = Thresholds(**thresholds["thresholds"])
        return cls(**data)


def _check_budget(budget: Any, every_n_steps: Any) -> None:
    if budget is None:
        if every_n_steps is None:
            raise ValueError(
                "overhead_budget=None (no budget) needs a fixed schedule: pass every_n_steps "
                "too, or keep a budget such as overhead_budget=0.02"
            )
        return
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ValueError(
            f"overhead_budget must be a fraction of the training time in (0, 1] (0.02 means "
            f"2%) or None, got {budget!r}"
        )


def _resolve_type(selector: Any) -> Any:
    if not (isinstance(selector, dict) and "type" in selector):
        return selector
    module, _, qualname = selector["type"].partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _check_clip(clip: Any) -> None:
    if clip is None or isinstance(clip, ClipStrategy | Clipper):
        return
    if isinstance(clip, str) and clip in STRATEGY_NAMES:
        return
    valid = ", ".join(repr(n) for n in STRATEGY_NAMES)
    hint = ""
    if isinstance(clip, type) and issubclass(clip, ClipStrategy | Clipper):
        hint = f"; pass an instance, {clip.__name__}(...), not the class"
    raise ValueError(
        f"clip={clip!r}: unknown clipping strategy: use None, one of {valid}, a configured "
        f"strategy such as AutoClip(percentile=5), or a Clipper{hint}"
    )


class WatchArgs(TypedDict, total=False):
    """The keyword arguments of `GradWatch` and `Monitor` that build their `WatchOptions`
    (for ``**options: Unpack[WatchArgs]``: type checkers and editors see every name)."""

    overhead_budget: float | None
    every_n_steps: int | None
    include: Selectors
    exclude: Selectors
    spike_factor: float
    warmup_steps: int
    history: int
    log_every_n_steps: int | None
    thresholds: Thresholds | None
    clip: ClipSpec
    figures: FiguresMode
    async_flags: bool | None


def watch_options(owner: str, options: dict[str, Any]) -> WatchOptions:
    """`WatchOptions` from an adapter's keyword arguments; an unknown name is a
    ``TypeError`` naming it (and, for the removed ``clip_*`` arguments, the replacement)."""
    known = {f.name for f in dataclasses.fields(WatchOptions)}
    for name in options:
        if name in _MOVED_TO_CLIPPER:
            raise TypeError(
                f"{owner}({name}=...) was removed: configure a Clipper instead, e.g. "
                f"{owner}(clip=gradwatch.Clipper('norm', {_MOVED_TO_CLIPPER[name]}=...))"
            )
        if name not in known:
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {name!r}; the options are "
                f"{', '.join(sorted(known))}"
            )
    return WatchOptions(**options)
