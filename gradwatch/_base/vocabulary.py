"""The words every layer shares, defined once: verdicts, module kinds, gate names.

Each is a ``Literal`` for type checkers plus a tuple of its values for code that iterates
or validates. Every other module imports them from here instead of spelling the strings.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "CELL_KINDS",
    "EXPLODING_VERDICTS",
    "FUSED_KINDS",
    "GATED_KINDS",
    "GATES",
    "KINDS",
    "LSTM_KINDS",
    "PROBLEM_VERDICTS",
    "VERDICTS",
    "Gate",
    "Kind",
    "Verdict",
    "worst",
]

Verdict = Literal["healthy", "vanishing", "exploding", "nonfinite"]
# Ordered from best to worst: a module's verdict is the worst over its layers and directions.
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
# The verdicts that signal a problem (what reactive clipping and CI gates act on).
PROBLEM_VERDICTS: tuple[Verdict, ...] = VERDICTS[1:]
# The problems clipping can act on (reactive clipping engages on them; vanishing it cannot fix).
EXPLODING_VERDICTS: tuple[Verdict, ...] = ("exploding", "nonfinite")

FusedKind = Literal["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
CellKind = Literal["LSTMCell", "GRUCell", "RNNCell"]
Kind = Literal[FusedKind, CellKind, "custom"]
FUSED_KINDS: tuple[FusedKind, ...] = get_args(FusedKind)
CELL_KINDS: tuple[CellKind, ...] = get_args(CellKind)
KINDS: tuple[str, ...] = (*FUSED_KINDS, *CELL_KINDS, "custom")
GATED_KINDS = frozenset({"LSTM", "GRU", "LSTMCell", "GRUCell"})
LSTM_KINDS = frozenset({"LSTM", "LSTMCell"})

Gate = Literal["input", "forget", "output", "update", "reset"]
GATES: tuple[Gate, ...] = get_args(Gate)


def worst(verdicts: tuple[str, ...] | list[str]) -> Verdict:
    """The worst of some verdicts (``"healthy"`` for none)."""
    return max(verdicts, key=VERDICTS.index, default="healthy")  # type: ignore[return-value]
