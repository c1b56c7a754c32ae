"""gradwatch: see vanishing and exploding gradients through time in recurrent networks.

Everything a user needs is importable from here. Names are loaded on first use (PEP 562),
so ``import gradwatch`` imports neither torch nor Lightning: a command-line tool starts at
once, and plain-PyTorch users never pay for Lightning.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# A library leaves logging configuration to the application: without a handler of its own,
# records on the "gradwatch" logger are not printed a second time next to the warnings the
# callback raises (configure logging, or logging.captureWarnings, to route them).
logging.getLogger("gradwatch").addHandler(logging.NullHandler())

if TYPE_CHECKING:  # what type checkers and editors see; at run time see _SURFACE
    from gradwatch._adapters.lightning import GradWatch
    from gradwatch._adapters.pytorch import Monitor
    from gradwatch._analysis.report import (
        Causes,
        Explanation,
        ModuleReport,
        NonfiniteLocation,
        Report,
    )
    from gradwatch._analysis.verdicts import Thresholds
    from gradwatch._base.errors import (
        BackwardNotRunError,
        CaptureError,
        GradwatchError,
        NoRecurrentModuleError,
        UnsupportedModuleError,
    )
    from gradwatch._capture import mark_scan, mark_state
    from gradwatch._clipping import (
        AGC,
        AutoClip,
        ClipEvent,
        Clipper,
        ClipStrategy,
        NormClip,
        ValueClip,
        ZScoreClip,
    )
    from gradwatch._engine.budget import Overhead
    from gradwatch._engine.history import ReportHistory
    from gradwatch._engine.options import WatchOptions
    from gradwatch._engine.signals import StepSignals
    from gradwatch._engine.trace import Trace, trace
    from gradwatch._outputs.messages import summary_table
    from gradwatch._outputs.panels import PanelWriter

# public name -> the private module that defines it
_SURFACE: dict[str, str] = {
    # training loops
    "GradWatch": "gradwatch._adapters.lightning",
    "Monitor": "gradwatch._adapters.pytorch",
    "WatchOptions": "gradwatch._engine.options",
    "ReportHistory": "gradwatch._engine.history",
    "Overhead": "gradwatch._engine.budget",
    "StepSignals": "gradwatch._engine.signals",
    # one step, traced
    "trace": "gradwatch._engine.trace",
    "Trace": "gradwatch._engine.trace",
    "mark_state": "gradwatch._capture",
    "mark_scan": "gradwatch._capture",
    # reports and verdicts
    "Report": "gradwatch._analysis.report",
    "ModuleReport": "gradwatch._analysis.report",
    "Causes": "gradwatch._analysis.report",
    "Explanation": "gradwatch._analysis.report",
    "NonfiniteLocation": "gradwatch._analysis.report",
    "Thresholds": "gradwatch._analysis.verdicts",
    # clipping
    "Clipper": "gradwatch._clipping",
    "ClipEvent": "gradwatch._clipping",
    "ClipStrategy": "gradwatch._clipping",
    "NormClip": "gradwatch._clipping",
    "ValueClip": "gradwatch._clipping",
    "AutoClip": "gradwatch._clipping",
    "ZScoreClip": "gradwatch._clipping",
    "AGC": "gradwatch._clipping",
    # outputs
    "PanelWriter": "gradwatch._outputs.panels",
    "summary_table": "gradwatch._outputs.messages",
    # errors
    "GradwatchError": "gradwatch._base.errors",
    "BackwardNotRunError": "gradwatch._base.errors",
    "CaptureError": "gradwatch._base.errors",
    "NoRecurrentModuleError": "gradwatch._base.errors",
    "UnsupportedModuleError": "gradwatch._base.errors",
}


def __getattr__(name: str) -> Any:
    module = _SURFACE.get(name)
    if module is None:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SURFACE})


__all__ = [
    "AGC",
    "AutoClip",
    "BackwardNotRunError",
    "CaptureError",
    "Causes",
    "ClipEvent",
    "ClipStrategy",
    "Clipper",
    "Explanation",
    "GradWatch",
    "GradwatchError",
    "ModuleReport",
    "Monitor",
    "NoRecurrentModuleError",
    "NonfiniteLocation",
    "NormClip",
    "Overhead",
    "PanelWriter",
    "Report",
    "ReportHistory",
    "StepSignals",
    "Thresholds",
    "Trace",
    "UnsupportedModuleError",
    "ValueClip",
    "WatchOptions",
    "ZScoreClip",
    "__version__",
    "mark_scan",
    "mark_state",
    "summary_table",
    "trace",
]
