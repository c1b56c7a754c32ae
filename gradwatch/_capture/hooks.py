"""Module hooks that leave nothing behind, and the recorders active in each thread.

A recorder's module hooks live in the model's own hook dictionaries. Three things must not
follow them:

- a strong reference from the model to the recorder: a dropped `Monitor` or trace would
  live as long as the model (and keep recording). `WeakHook` holds the recorder weakly;
  once the recorder is gone the hook removes itself the next time it runs;
- a copy: ``copy.deepcopy(model)`` (EMA and teacher copies) and pickling copy the hook
  dictionaries. A `WeakHook` copies as an inert `_Orphan`, and the deep copy removes the
  orphans from every copied module as soon as it completes (`_Sweeper`), so the copy is a
  plain model;
- another thread: `mark_state` records into the recorders attached in the calling thread
  only (`attach_here`, `active_here`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["WeakHook", "active_here", "attach_here", "detach_here", "strip_orphans"]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class _Orphan:
    """What a `WeakHook` becomes in a copied model: does nothing, removes itself."""

    def __call__(self, module: nn.Module, *args: Any) -> None:
        strip_orphans(module)
        return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Orphan, ())


def strip_orphans(module: nn.Module) -> None:
    """Remove from ``module`` every copied gradwatch hook (`_Orphan`) and every hook whose
    recorder is gone."""
    for attr in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = getattr(module, attr, None)
        if not hooks:
            continue
        gone = [k for k, h in list(hooks.items()) if _gone(h)]
        for k in gone:
            hooks.pop(k, None)
            for extra in _HOOK_DICTS[2:]:
                d = getattr(module, extra, None)
                if isinstance(d, dict):
                    d.pop(k, None)


def _gone(hook: Any) -> bool:
    return isinstance(hook, _Orphan) or (isinstance(hook, WeakHook) and hook.orphaned)


class _Sweeper:
    """Lives in a deep copy's memo: when the memo is freed (the copy is complete), it strips
    the orphans from the copied modules. CPython frees the memo as ``copy.deepcopy``
    returns; the orphans also remove themselves at their first call, should that be later."""

    def __init__(self) -> None:
        self.copies: list[weakref.ref[nn.Module]] = []

    def __del__(self) -> None:
        for ref in self.copies:
            module = ref()
            if module is not None:
                with contextlib.suppress(Exception):  # never break a user's copy
                    strip_orphans(module)


class WeakHook:
    """A module hook calling ``fn(recorder, *bound, module, *hook_args)`` while the
    recorder lives, on ``module`` only (not on shallow copies sharing its dictionaries)."""

    __slots__ = ("__weakref__", "_bound", "_fn", "_module", "_recorder")

    def __init__(self, recorder: Any, module: nn.Module, fn: Callable[..., Any], *bound: Any):
        self._recorder = weakref.ref(recorder)
        self._module = weakref.ref(module)
        self._fn = fn
        self._bound = bound

    @property
    def orphaned(self) -> bool:
        """Whether the recorder is gone."""
        return self._recorder() is None

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        recorder = self._recorder()
        if recorder is None:  # the recorder was dropped without detaching: go away
            strip_orphans(module)
            return None
        if self._module() is not module:  # a shallow copy sharing the hook dictionary
            return None
        start = recorder.clock()  # the overhead budget counts the recorder's own time
        try:
            return self._fn(recorder, *self._bound, module, *args)
        finally:
            recorder.own_ns += recorder.clock() - start

    def __deepcopy__(self, memo: dict[int, Any]) -> _Orphan:
        sweeper = memo.get(id(_Sweeper))
        if sweeper is None:
            sweeper = memo[id(_Sweeper)] = _Sweeper()
        target = self._module()
        copy = memo.get(id(target)) if target is not None else None
        if isinstance(copy, nn.Module):
            sweeper.copies.append(weakref.ref(copy))
        return _Orphan()

    def __reduce__(self) -> tuple[Any, ...]:  # pickling a watched model: a plain model
        return (_Orphan, ())


# -- recorders per thread ------------------------------------------------------------------
_local = threading.local()


def _stack() -> list[weakref.ref[Any]]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def attach_here(recorder: Any) -> list[weakref.ref[Any]]:
    """Make ``recorder`` receive the marks of the calling thread (weakly held); returns
    that thread's stack, for `detach_here` from any thread."""
    stack = _stack()
    stack.append(weakref.ref(recorder))
    return stack


def detach_here(recorder: Any, stack: list[weakref.ref[Any]] | None) -> None:
    """Stop ``recorder`` receiving marks (``stack``: what `attach_here` returned)."""
    if stack is not None:
        stack[:] = [r for r in stack if r() is not None and r() is not recorder]


def active_here() -> list[Any]:
    """The live recorders attached in the calling thread, oldest first."""
    stack = _stack()
    live = [r() for r in stack]
    if any(r is None for r in live):
        stack[:] = [r for r in stack if r() is not None]
    return [r for r in live if r is not None]
