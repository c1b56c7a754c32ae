"""What the measured quantities mean: verdicts, their causes in plain words, hysteresis."""

from gradwatch.verdicts.classify import classify, first_nonfinite, worst
from gradwatch.verdicts.diagnose import diagnose
from gradwatch.verdicts.explain import REMEDIES, explain
from gradwatch.verdicts.thresholds import Thresholds
from gradwatch.verdicts.tracker import VerdictChange, VerdictTracker

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
