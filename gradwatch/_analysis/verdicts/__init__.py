"""What the measured quantities mean: verdicts, their causes in plain words, hysteresis."""

from gradwatch._analysis.verdicts.classify import classify, first_nonfinite
from gradwatch._analysis.verdicts.diagnose import diagnose
from gradwatch._analysis.verdicts.explain import explain
from gradwatch._analysis.verdicts.remedies import REMEDIES, Remedy
from gradwatch._analysis.verdicts.thresholds import Thresholds
from gradwatch._analysis.verdicts.tracker import VerdictChange, VerdictTracker
from gradwatch._base.vocabulary import worst

__all__ = [
    "REMEDIES",
    "Remedy",
    "Thresholds",
    "VerdictChange",
    "VerdictTracker",
    "classify",
    "diagnose",
    "explain",
    "first_nonfinite",
    "worst",
]
