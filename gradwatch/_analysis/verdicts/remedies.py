"""The one remedies table: what to try, per dominant cause and, as a fallback, per verdict.

Each `Remedy` says what it is about (``topic``, so a list never suggests the same thing
twice) and which module kinds it applies to (no "use a gated cell" for an LSTM, no
forget-gate bias for a GRU). `gradwatch._analysis.verdicts.explain` attaches the cause's
remedies to each `Explanation`; the warnings (`gradwatch._outputs.messages`) complete them
from the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch._base.vocabulary import GATED_KINDS, GRU_KINDS, LSTM_KINDS

__all__ = ["REMEDIES", "Remedy", "remedies_for_key", "topic_of"]


@dataclass(frozen=True)
class Remedy:
    """One thing to try. ``only``: the kinds it applies to (``None``: every kind);
    ``never``: the kinds it does not apply to."""

    topic: str
    text: str
    only: frozenset[str] | None = None
    never: frozenset[str] = frozenset()

    def applies(self, kind: str) -> bool:
        return kind not in self.never and (self.only is None or kind in self.only)


GATED_CELL = Remedy(
    "gated",
    "use a gated cell (nn.LSTM or nn.GRU): its additive state path carries the gradient "
    "without a repeated multiplication by W_hh and tanh'",
    never=GATED_KINDS | {"scan"},
)
ORTHOGONAL = Remedy(
    "init",
    "initialise the recurrent weight orthogonally (nn.init.orthogonal_ on weight_hh), or as "
    "the identity for a ReLU RNN (IRNN), so its spectral norm starts at 1",
    # no weight_hh: a scan's factor is its transition, CfC mixes [x, h] in one layer, the
    # sLSTM's recurrent kernel is block-diagonal per head
    never=frozenset({"scan", "CfC", "sLSTM"}),
)
FORGET_BIAS = Remedy(
    "forget",
    "raise the LSTM forget-gate bias to about 1-2 (b_if + b_hf; PyTorch starts near 0), e.g. "
    "bias_hh_l{k}.data[H:2H].fill_(1.0), so the cell keeps its memory",
    only=LSTM_KINDS | {"custom"},
)
UPDATE_BIAS = Remedy(
    "update",
    "bias the GRU update gate towards keeping the state (b_iz + b_hz about +1 to +2) so "
    "h_t copies h_{t-1} more",
    only=GRU_KINDS | {"custom"},
)
SLSTM_FORGET = Remedy(
    "forget",
    'start the sLSTM forget gates open: sLSTMLayerConfig(bias_init="small_init") sets '
    'their bias to 3-6 (the default "powerlaw_blockdependent" spreads it from +5 down '
    "to -7 over each head, so some units forget within a few steps)",
    only=frozenset({"sLSTM"}),
)
# Hasani et al. 2022 (CfC): the state is an interpolation of two heads, with no additive
# carry; ncps adds an LSTM memory cell for long dependencies.
CFC_MEMORY = Remedy(
    "memory",
    "give the CfC a memory cell for long dependencies: CfC(..., mixed_memory=True) runs an "
    "LSTM cell alongside it, whose cell state carries the gradient across steps",
    only=frozenset({"CfC"}),
)
CLIP = Remedy(
    "clip",
    "clip gradients by norm (Trainer(gradient_clip_val=1.0) or "
    "torch.nn.utils.clip_grad_norm_); gradwatch's adaptive clipping picks the threshold",
)
LOWER_LR = Remedy(
    "lr", "lower the learning rate (or warm it up) so the recurrent weight stops growing"
)
TRUNCATE = Remedy(
    "truncation",
    "train on shorter truncation windows (truncated BPTT) so fewer factors multiply",
)
SATURATION = Remedy(
    "saturation",
    "keep the state nonlinearity out of saturation: scale the inputs down, add layer "
    "normalisation before the recurrence, lower the learning rate",
)
SPECTRAL = Remedy(
    "init",
    "keep the recurrent weight's spectral norm near 1 (orthogonal initialisation, "
    "spectral or weight normalisation)",
    never=frozenset({"scan"}),
)
# Diagonal linear recurrences (kind "scan": SSMs, minGRU, LRU): the factor is a_t itself.
TRANSITION_INIT = Remedy(
    "init",
    "initialise the transition closer to 1: for Mamba/S4D a smaller step size (lower "
    "dt_min/dt_max, i.e. the dt_proj bias) or smaller A; for minGRU/LRU a gate bias or "
    "eigenvalue radius that keeps the state (|a_t| near 1)",
    only=frozenset({"scan"}),
)
TIMESCALES = Remedy(
    "timescales",
    "spread the state dimensions over a range of timescales (e.g. |a| from 0.9 to 0.999, "
    "LRU ring initialisation) so some of them remember long enough",
    only=frozenset({"scan"}),
)
BOUNDED_TRANSITION = Remedy(
    "bounded",
    "keep |a_t| <= 1 by construction: a = exp(-softplus(.)) or exp(-exp(A_log) * delta) "
    "instead of a free value",
    only=frozenset({"scan"}),
)
NONFINITE_INPUT = Remedy(
    "nan",
    "look for inf/NaN in the inputs and the loss (torch.autograd.detect_anomaly for one step)",
)
AMP = Remedy("amp", "with 16-bit mixed precision keep the GradScaler on, or use bf16-mixed")

#: Remedies per dominant cause (`gradwatch._base.vocabulary.Cause`) and, as a fallback, per
#: verdict, most useful first.
REMEDIES: dict[str, tuple[Remedy, ...]] = {
    "small_recurrent_weight": (ORTHOGONAL, GATED_CELL, FORGET_BIAS),
    "saturated_activation": (SATURATION, GATED_CELL, ORTHOGONAL),
    "activation_derivative": (GATED_CELL, ORTHOGONAL),
    "forget_gate": (FORGET_BIAS, ORTHOGONAL),
    "update_gate": (UPDATE_BIAS, ORTHOGONAL),
    "large_recurrent_weight": (CLIP, SPECTRAL, LOWER_LR, TRUNCATE),
    "transition_decay": (TRANSITION_INIT, TIMESCALES, TRUNCATE),
    "transition_growth": (BOUNDED_TRANSITION, CLIP, LOWER_LR),
    "nonfinite": (CLIP, LOWER_LR, NONFINITE_INPUT, AMP),
    "vanishing": (
        GATED_CELL,
        FORGET_BIAS,
        UPDATE_BIAS,
        SLSTM_FORGET,
        CFC_MEMORY,
        ORTHOGONAL,
        TRANSITION_INIT,
    ),
    "exploding": (CLIP, SPECTRAL, LOWER_LR, TRUNCATE, BOUNDED_TRANSITION),
}

_TOPIC = {r.text: r.topic for rs in REMEDIES.values() for r in rs}


def remedies_for_key(key: str, kind: str) -> tuple[str, ...]:
    """The texts of the remedies for a cause or verdict ``key`` that apply to ``kind``."""
    return tuple(r.text for r in REMEDIES.get(key, ()) if r.applies(kind))


def topic_of(text: str) -> str:
    """What a remedy text is about (a text not in the table is its own topic)."""
    return _TOPIC.get(text, text)
