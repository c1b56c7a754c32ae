"""Exceptions raised by gradwatch. All derive from `GradwatchError`."""

from __future__ import annotations

__all__ = [
    "BackwardNotRunError",
    "CaptureError",
    "GradwatchError",
    "NoRecurrentModuleError",
    "UnsupportedModuleError",
]


class GradwatchError(RuntimeError):
    """Base class of gradwatch's errors."""


class NoRecurrentModuleError(GradwatchError):
    """The traced model has no recurrent module and no state was marked."""


class UnsupportedModuleError(GradwatchError):
    """A recurrent module has a configuration gradwatch cannot measure."""


class BackwardNotRunError(GradwatchError):
    """A report was asked for, but no backward pass reached the traced modules."""


class CaptureError(GradwatchError):
    """Some recurrent module calls could not be measured; the message lists why."""
