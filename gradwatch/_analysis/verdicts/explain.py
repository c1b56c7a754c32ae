"""Plain-words explanation of a verdict, in terms of the two causes: depth and the factor.

The per-step factor of a simple RNN is (recurrent weight) x (activation derivative); its log
splits into the two, so the more negative (vanishing) or positive (exploding) term is the
dominant cause. Gated cells replace the factor by gate values: the forget gate for the LSTM
cell path, the update gate for the GRU.
"""

from __future__ import annotations

import math

from gradwatch._analysis.report import Causes, Explanation, ModuleReport, NonfiniteLocation
from gradwatch._analysis.verdicts.remedies import remedies_for_key
from gradwatch._base.vocabulary import GRU_KINDS, LSTM_KINDS, Cause

__all__ = ["explain"]


def _at(causes: Causes | None, field: str, layer: int, d: int) -> float:
    if causes is None:
        return math.nan
    value = getattr(causes, field)
    return math.nan if value is None else float(value[layer, d])


def _gate(causes: Causes | None, gate: str, layer: int, d: int) -> float:
    if causes is None or gate not in causes.gate_mean:
        return math.nan
    return float(causes.gate_mean[gate][layer, d])


def explain(
    report: ModuleReport,
    verdict: str,
    where: tuple[int, int] | None,
    nonfinite_at: NonfiniteLocation | None,
) -> Explanation:
    """The explanation of ``verdict``, measured at layer/direction ``where``."""
    name = report.name
    if verdict == "nonfinite":
        place = str(nonfinite_at) if nonfinite_at else name
        text = (
            f"{name}: non-finite gradient (inf/NaN); it first appeared in backward order at "
            f"{place}."
        )
        loc = (nonfinite_at.layer, nonfinite_at.direction) if nonfinite_at else (None, None)
        remedies = remedies_for_key("nonfinite", report.kind)
        return Explanation(verdict, "nonfinite", text, *loc, remedies)
    if where is None or report.gain is None:
        return Explanation(verdict, "none", f"{name}: {verdict}.")
    layer, d = where
    gain = float(report.gain[layer, d])
    horizon = float(report.horizon[layer, d]) if report.horizon is not None else math.nan
    where_txt = f"layer {layer}" + (f" direction {d}" if report.num_directions > 1 else "")
    measured = (
        f"per-step gain {gain:.3g}, horizon {horizon:.3g} steps for a sequence of "
        f"{report.seq_len} steps"
    )
    if report.log10_attenuation is not None:
        scale = float(report.log10_attenuation[layer, d])
        measured += f" (a gradient carried over the whole sequence is scaled by 1e{scale:+.1f})"
    if verdict == "healthy":
        text = f"{name} {where_txt}: healthy: {measured}."
        return Explanation(verdict, "none", text, layer, d)
    cause, reason, values = _cause(report, verdict, layer, d)
    text = f"{name} {where_txt}: {verdict} gradients: {measured}. Dominant cause: {reason}."
    remedies = remedies_for_key(cause, report.kind)
    return Explanation(verdict, cause, text, layer, d, remedies, reason, values)


def _cause(
    report: ModuleReport, verdict: str, layer: int, d: int
) -> tuple[Cause, str, dict[str, float]]:
    """The dominant cause, its sentence, and the numbers the sentence states."""
    c = report.causes
    norm = _at(c, "weight_norm", layer, d)
    radius = _at(c, "weight_radius", layer, d)
    deriv = _at(c, "act_derivative", layer, d)
    sat = _at(c, "saturation", layer, d)
    kind = report.kind
    if kind in LSTM_KINDS and verdict == "vanishing":
        f = _gate(c, "forget", layer, d)
        bias = _at(c, "forget_bias", layer, d)
        return (
            "forget_gate",
            f"the forget gate averages {f:.2f} (effective bias b_if + b_hf = {bias:.2f}), so "
            f"the cell state keeps only {100 * f:.0f}% of its gradient per step",
            {"forget_gate": f, "forget_bias": bias},
        )
    if kind in GRU_KINDS and verdict == "vanishing":
        z = _gate(c, "update", layer, d)
        return (
            "update_gate",
            f"the update gate averages {z:.2f}, so the state passes on only {100 * z:.0f}% "
            "of its gradient per step directly; the rest goes through the candidate",
            {"update_gate": z},
        )
    if kind == "scan":
        return _scan_cause(c, verdict, layer, d)
    if all(math.isnan(v) for v in (norm, radius, deriv)):
        # hooks only (marked states, sLSTM, CfC): the step equations are not known here, so
        # the factor cannot be split into weight and activation terms; say so, blame nothing
        g = math.nan if report.actual_gain is None else float(report.actual_gain[layer, d])
        return (
            "none",
            "not identified: gradwatch measures this recurrence's gradients but does not know "
            f"its step equations (measured per-step factor {g:.3g})",
            {"actual_gain": g},
        )
    act = "ReLU" if kind == "RNN_RELU" else "tanh"
    weights = {"weight_norm": norm, "weight_radius": radius, "act_derivative": deriv}
    if verdict == "exploding":
        return (
            "large_recurrent_weight",
            f"the recurrent weight is large: spectral radius {radius:.3g}, ||W_hh||_2 = "
            f"{norm:.3g}, and the {act} units pass the gradient on (mean derivative "
            f"{deriv:.2f}), so each step multiplies it by more than 1",
            weights,
        )
    # vanishing, simple RNN: split log(gain) into weight and activation terms
    if norm < 1:
        return (
            "small_recurrent_weight",
            f"||W_hh||_2 = {norm:.3g} < 1, so no step can do anything but shrink the gradient "
            "(Pascanu bound)",
            {"weight_norm": norm},
        )
    weight_term = math.log(radius) if radius > 0 else -math.inf
    act_term = math.log(deriv) if deriv > 0 else -math.inf
    if act_term < weight_term:
        if act != "ReLU" and sat > 0.2:
            return (
                "saturated_activation",
                f"{100 * sat:.0f}% of the tanh units are saturated (mean derivative "
                f"{deriv:.2f}), which cuts the gradient at each step",
                {"saturation": sat, "act_derivative": deriv},
            )
        return (
            "activation_derivative",
            f"the mean {act} derivative is {deriv:.2f}; with a spectral radius of {radius:.3g} "
            "the product per step stays below 1",
            {"act_derivative": deriv, "weight_radius": radius},
        )
    return (
        "small_recurrent_weight",
        f"the recurrent weight's spectral radius is {radius:.3g} (mean {act} derivative "
        f"{deriv:.2f}): the repeated factor is below 1",
        {"weight_radius": radius, "act_derivative": deriv},
    )


def _scan_cause(
    c: Causes | None, verdict: str, layer: int, d: int
) -> tuple[Cause, str, dict[str, float]]:
    """A diagonal linear recurrence: the repeated factor is the transition |a_t| itself."""
    t = {} if c is None else {k: float(v[layer, d]) for k, v in c.transition.items()}
    mean, spread = t.get("mean", math.nan), t.get("spread", math.nan)
    extra = ""
    if "step_size" in t:
        extra += f"; mean step size Δ {t['step_size']:.3g}"
    if "input_gate" in t:
        extra += f"; mean input gate {t['input_gate']:.2f}"
    if verdict == "exploding":
        return (
            "transition_growth",
            f"{100 * t.get('above_one', math.nan):.0f}% of the transition values |a_t| exceed "
            f"1 (mean {mean:.3g}, spread {spread:.2g}), so the state and its gradient grow at "
            f"each step{extra}",
            t,
        )
    return (
        "transition_decay",
        f"the transition |a_t| averages {mean:.3g} (spread {spread:.2g}); "
        f"{100 * t.get('near_one', math.nan):.0f}% of its values are above 0.99 and "
        f"{100 * t.get('near_zero', math.nan):.0f}% below 0.1, so each step keeps only that "
        f"fraction of the gradient{extra}",
        t,
    )
