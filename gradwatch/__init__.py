"""gradwatch: see vanishing and exploding gradients through time in recurrent networks."""

from gradwatch.capture import Trace, mark_state, trace
from gradwatch.errors import (
    BackwardNotRunError,
    CaptureError,
    GradwatchError,
    NoRecurrentModuleError,
    UnsupportedModuleError,
)
from gradwatch.report import ModuleReport, Report

__version__ = "0.1.0.dev0"

__all__ = [
    "BackwardNotRunError",
    "CaptureError",
    "GradwatchError",
    "ModuleReport",
    "NoRecurrentModuleError",
    "Report",
    "Trace",
    "UnsupportedModuleError",
    "__version__",
    "mark_state",
    "trace",
]
