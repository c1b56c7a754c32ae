"""Capture: how the per-timestep hidden-state gradients dL/dh_t are obtained.

Capture yields raw, undiagnosed captures (`RawCapture`); `gradwatch._analysis.analyze` turns
them into reports. One `Recorder` hooks a model; each kind of recurrence is a family in
`gradwatch._capture.families`.
"""

from gradwatch._capture.families import Family, register, registered
from gradwatch._capture.families.marked import mark_state
from gradwatch._capture.families.scan import mark_scan
from gradwatch._capture.raw import RawCapture, Recurrences, Transition, Walkable
from gradwatch._capture.recorder import Recorder, active_recorder
from gradwatch._capture.selection import (
    Selection,
    Selector,
    Selectors,
    normalize_selectors,
    select_modules,
)

__all__ = [
    "Family",
    "RawCapture",
    "Recorder",
    "Recurrences",
    "Selection",
    "Selector",
    "Selectors",
    "Transition",
    "Walkable",
    "active_recorder",
    "mark_scan",
    "mark_state",
    "normalize_selectors",
    "register",
    "registered",
    "select_modules",
]
