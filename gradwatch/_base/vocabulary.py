"""The words every layer shares, defined once: verdicts, module kinds, gate names.

Each is a ``Literal`` for type checkers plus a tuple of its values for code that iterates
or validates. Every other module imports them from here instead of spelling the strings.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "CAUSES",
    "CELL_KINDS",
    "EXPLODING_VERDICTS",
    "FUSED_KINDS",
    "GATED_KINDS",
    "GATES",
    "GRU_KINDS",
    "KINDS",
    "LSTM_KINDS",
    "PROBLEM_VERDICTS",
    "VERDICTS",
    "Cause",
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
Kind = Literal[FusedKind, CellKind, "custom", "scan"]
FUSED_KINDS: tuple[FusedKind, ...] = get_args(FusedKind)
CELL_KINDS: tuple[CellKind, ...] = get_args(CellKind)
KINDS: tuple[str, ...] = (*FUSED_KINDS, *CELL_KINDS, "custom", "scan")
GATED_KINDS = frozenset({"LSTM", "GRU", "LSTMCell", "GRUCell"})
LSTM_KINDS = frozenset({"LSTM", "LSTMCell"})
GRU_KINDS = frozenset({"GRU", "GRUCell"})

Gate = Literal["input", "forget", "output", "update", "reset"]
GATES: tuple[Gate, ...] = get_args(Gate)

# The dominant cause an explanation names (``Explanation.cause``); "none" when healthy.
Cause = Literal[
    "small_recurrent_weight",
    "saturated_activation",
    "activation_derivative",
    "forget_gate",
    "update_gate",
    "large_recurrent_weight",
    "transition_decay",
    "transition_growth",
    "nonfinite",
    "none",
]
CAUSES: tuple[Cause, ...] = get_args(Cause)


def worst(verdicts: tuple[str, ...] | list[str]) -> Verdict:
    """The worst of some verdicts (``"healthy"`` for none)."""
    return max(verdicts, key=VERDICTS.index, default="healthy")  # type: ignore[return-value]
