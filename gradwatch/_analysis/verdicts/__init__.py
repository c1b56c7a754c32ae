"""What the measured quantities mean: verdicts, their causes in plain words, hysteresis."""

from gradwatch._analysis.verdicts.classify import classify, first_nonfinite, worst
from gradwatch._analysis.verdicts.diagnose import diagnose
from gradwatch._analysis.verdicts.explain import REMEDIES, explain
from gradwatch._analysis.verdicts.thresholds import Thresholds
from gradwatch._analysis.verdicts.tracker import VerdictChange, VerdictTracker

__all__ = [
    "REMEDIES",
    "Thresholds",
    "VerdictChange",
    "VerdictTracker",
    "classify",
    "diagnose",
    "explain",
    "first_nonfinite",
    "worst",
]
