"""Analysis: quantities and verdicts from raw captures; `analyze` is the one entry point."""

from gradwatch._analysis.analyze import analyze

__all__ = ["analyze"]
