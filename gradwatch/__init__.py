"""gradwatch: see vanishing and exploding gradients through time in recurrent networks."""

import logging
from typing import Any

from gradwatch._analysis.report import Causes, Explanation, ModuleReport, NonfiniteLocation, Report
from gradwatch._base.errors import (
    BackwardNotRunError,
    CaptureError,
    GradwatchError,
    NoRecurrentModuleError,
    UnsupportedModuleError,
)
from gradwatch._capture import mark_scan, mark_state
from gradwatch._engine.trace import Trace, trace

__version__ = "0.1.0.dev0"

# A library leaves logging configuration to the application: without a handler of its own,
# records on the "gradwatch" logger are not printed a second time next to the warnings the
# callback raises (configure logging, or logging.captureWarnings, to route them).
logging.getLogger("gradwatch").addHandler(logging.NullHandler())

# Imported on first use: Lightning takes seconds to import and plain-PyTorch users need none of it.
_LAZY = {
    "GradWatch": "gradwatch._adapters.lightning",
    "Monitor": "gradwatch._adapters.pytorch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


__all__ = [
    "BackwardNotRunError",
    "CaptureError",
    "Causes",
    "Explanation",
    "GradWatch",
    "GradwatchError",
    "ModuleReport",
    "Monitor",
    "NoRecurrentModuleError",
    "NonfiniteLocation",
    "Report",
    "Trace",
    "UnsupportedModuleError",
    "__version__",
    "mark_scan",
    "mark_state",
    "trace",
]
