"""The words every layer shares, defined once: verdicts, module kinds, gate names.

Each is a ``Literal`` for type checkers plus a tuple of its values for code that iterates
or validates. Every other module imports them from here instead of spelling the strings.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "CAUSES",
    "CELL_KINDS",
    "CELL_STATE_KINDS",
    "EXPLODING_VERDICTS",
    "FUSED_KINDS",
    "GATED_KINDS",
    "GATES",
    "GRU_KINDS",
    "KINDS",
    "LSTM_KINDS",
    "PACKAGE_KINDS",
    "PROBLEM_VERDICTS",
    "VERDICTS",
    "Cause",
    "Gate",
    "Kind",
    "PackageKind",
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
# Recurrences known by their package, hooked per step: xLSTM's sLSTM, ncps' closed-form
# continuous-time cell (CfC).
PackageKind = Literal["sLSTM", "CfC"]
Kind = Literal[FusedKind, CellKind, PackageKind, "custom", "scan"]
FUSED_KINDS: tuple[FusedKind, ...] = get_args(FusedKind)
CELL_KINDS: tuple[CellKind, ...] = get_args(CellKind)
PACKAGE_KINDS: tuple[PackageKind, ...] = get_args(PackageKind)
KINDS: tuple[str, ...] = (*FUSED_KINDS, *CELL_KINDS, *PACKAGE_KINDS, "custom", "scan")
# Gated: a gate decides per step how much of the state (and of its gradient) is kept, so
# "use a gated cell" is no advice for them and the Pascanu bound does not apply.
GATED_KINDS = frozenset({"LSTM", "GRU", "LSTMCell", "GRUCell", "sLSTM", "CfC"})
LSTM_KINDS = frozenset({"LSTM", "LSTMCell"})
GRU_KINDS = frozenset({"GRU", "GRUCell"})
# The kinds whose reports carry ``cell_total``, the gradient reaching a cell state c_t.
CELL_STATE_KINDS = LSTM_KINDS | {"sLSTM"}

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
