"""Warnings a person can act on: what changed, where, what was measured, why, what to try.

Framework-free on purpose: the functions return strings and `warn_change` logs them
on the ``gradwatch`` logger; the Lightning callback routes the same strings through
``rank_zero_warn`` so only rank zero speaks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from gradwatch._analysis.report import Explanation, ModuleReport
from gradwatch._analysis.verdicts.remedies import REMEDIES, topic_of
from gradwatch._base.vocabulary import VERDICTS
from gradwatch._outputs.scalars import profile_stats

__all__ = [
    "REMEDIES",
    "change_message",
    "remedies_for",
    "summary_table",
    "warn_change",
]

logger = logging.getLogger("gradwatch")

_MAX_REMEDIES = 4


def remedies_for(m: ModuleReport, verdict: str | None = None) -> list[str]:
    """Up to four remedies: the explanation's own first, then the table's by cause and by
    verdict (`gradwatch._analysis.verdicts.REMEDIES`, one topic each, only those that apply to
    the module's kind).
    """
    verdict = verdict or m.verdict
    exp = _explanation(m, verdict)
    own = list(dict.fromkeys(exp.remedies if exp is not None else ()))
    out = list(own)
    topics = {topic_of(r) for r in out}
    keys = ([exp.cause] if exp is not None else []) + [verdict]
    for remedy in (r for key in keys for r in REMEDIES.get(key, ())):
        if len(out) >= _MAX_REMEDIES:
            break
        if remedy.topic in topics or not remedy.applies(m.kind):
            continue
        out.append(remedy.text)
        topics.add(remedy.topic)
    return out[: max(_MAX_REMEDIES, len(own))]


def change_message(
    m: ModuleReport,
    old: str | None,
    new: str | None = None,
    seq_len: int | None = None,
    *,
    layer: int | None = None,
    direction: int | None = None,
) -> str:
    """The one message for a verdict change of module call ``m`` from ``old`` to ``new``.

    ``old`` is ``None`` when there was no verdict before; ``new`` defaults to ``m.verdict``
    and ``seq_len`` to the report's own. ``layer``/``direction`` locate the change (as in
    ``gradwatch._analysis.verdicts.VerdictChange``); by default the explanation's, else the first
    part with the new verdict. The message names the place, the measured gain, horizon
    versus sequence length and attenuation, where the first non-finite value appeared, the
    dominant cause and what to try.
    """
    new = new or m.verdict
    seq_len = seq_len or m.seq_len or m.steps
    if layer is None:
        layer, direction = _where(m, new)
    head = f"gradwatch: {m.name} ({m.kind})"
    if new == "healthy":
        was = f" (was {old})" if old else ""
        measured = _measured(m, layer, direction, seq_len)
        return f"{head} is healthy again{was}" + (f": {measured}." if measured else ".")

    was = f" (was {old})" if old else ""
    lines = [f"{head} is now {new.upper()}{was} at {_place(m, layer, direction)}."]
    others = _others(m, new, layer, direction)
    if others:
        lines.append(f"  also {new}: {others}.")
    # with non-finite gradients the gain and horizon are not measurements: leave them out
    measured = "" if new == "nonfinite" else _measured(m, layer, direction, seq_len)
    if new == "nonfinite" and m.nonfinite_at is not None:
        lines.append(
            f"  first non-finite gradient, in backward order (the order the gradient travels "
            f"back through time): {m.nonfinite_at}."
        )
    if measured:
        lines.append(f"  measured: {measured}.")
    cause = _cause_text(m, new)
    if cause:
        lines.append(f"  cause: {cause}")
    remedies = remedies_for(m, new)
    if remedies:
        lines.append("  try:")
        lines.extend(f"    - {r}" for r in remedies)
    return "\n".join(lines)


def warn_change(
    m: ModuleReport,
    old: str | None,
    new: str | None = None,
    seq_len: int | None = None,
    *,
    layer: int | None = None,
    direction: int | None = None,
    log: logging.Logger | None = None,
) -> str | None:
    """Log `change_message` on the ``gradwatch`` logger and return it.

    Call it once per change (``gradwatch._analysis.verdicts.VerdictTracker`` decides when, with
    hysteresis). A worse state is a WARNING, a recovery INFO; nothing happens (``None``)
    when the verdict did not change, or when a module is first seen healthy.
    """
    new = new or m.verdict
    if new == old or (old is None and new == "healthy"):
        return None
    message = change_message(m, old, new, seq_len, layer=layer, direction=direction)
    level = logging.INFO if new == "healthy" else logging.WARNING
    (log or logger).log(level, message)
    return message


def summary_table(latest: Mapping[str, ModuleReport]) -> str:
    """A plain-text table of the latest measurement of every call, one row per layer and
    direction, for the end of training."""
    if not latest:
        return "gradwatch: no recurrent module was measured."
    header = (
        "module",
        "kind",
        "layer",
        "verdict",
        "gain",
        "horizon",
        "seq",
        "log10 att.",
        "carried",
        "cause",
    )
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for name, m in latest.items():
        seq_len = m.seq_len or m.steps
        carried = profile_stats(m).get("carried_fraction")
        exp = m.explanation
        for layer in range(m.num_layers):
            for direction in range(m.num_directions):
                verdict = m.verdicts[layer][direction] if m.verdicts else m.verdict
                on_row = exp is not None and (
                    (exp.layer, exp.direction) == (layer, direction)
                    or (exp.layer is None and layer == 0 and direction == 0)
                )
                cause = exp.cause if on_row and exp.cause != "none" else ""
                rows.append(
                    (
                        name,
                        m.kind,
                        _ld(m, layer, direction),
                        verdict,
                        _fmt(_get(m.gain, layer, direction)),
                        _horizon(_get(m.horizon, layer, direction)),
                        str(seq_len),
                        _fmt(_get(m.log10_attenuation, layer, direction), ".1f"),
                        _pct(_get(carried, layer, direction)),
                        cause,
                    )
                )
        if m.nonfinite_at is not None:
            notes.append(f"{name}: first non-finite gradient at {m.nonfinite_at}")
        if not m.exact:
            notes.append(f"{name}: approximate values ({m.approximate_reason or 'see docs'})")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    counts = {v: sum(1 for m in latest.values() if m.verdict == v) for v in VERDICTS}
    status = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    lines = [f"gradwatch summary ({len(latest)} module calls: {status})"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    lines.append(
        "gain: per-step factor of the gradient carried back; horizon: steps until it falls "
        "below 1% ('never': not within the sequence); carried: share of dL/dh that arrives "
        "through the recurrence."
    )
    lines.extend(notes)
    return "\n".join(lines)


# -- formatting helpers --------------------------------------------------------------------


def _explanation(m: ModuleReport, verdict: str) -> Explanation | None:
    """The report's explanation if it explains ``verdict`` (a tracker with hysteresis may
    announce a verdict the latest report alone does not show)."""
    exp = m.explanation
    return exp if exp is not None and exp.verdict == verdict else None


def _cause_text(m: ModuleReport, verdict: str) -> str:
    """The explanation's reason, without the measurements the message already states (its
    whole text for an explanation made without a reason)."""
    exp = _explanation(m, verdict)
    if exp is None or exp.cause in ("nonfinite", "none"):
        return ""
    return f"{exp.reason}." if exp.reason else exp.text


def _where(m: ModuleReport, verdict: str) -> tuple[int | None, int | None]:
    exp = _explanation(m, verdict)
    if exp is not None and exp.layer is not None:
        return exp.layer, exp.direction
    if verdict == "nonfinite" and m.nonfinite_at is not None:
        return m.nonfinite_at.layer, m.nonfinite_at.direction
    for layer, row in enumerate(m.verdicts):
        for direction, v in enumerate(row):
            if v == verdict:
                return layer, direction
    return None, None


def _others(m: ModuleReport, verdict: str, layer: int | None, direction: int | None) -> str:
    places = [
        _place(m, li, di)
        for li, row in enumerate(m.verdicts)
        for di, v in enumerate(row)
        if v == verdict and (li, di) != (layer, direction)
    ]
    return "; ".join(places)


def _place(m: ModuleReport, layer: int | None, direction: int | None) -> str:
    if layer is None:
        return "all layers" if m.num_layers > 1 else "layer 0"
    text = f"layer {layer}"
    if m.num_directions > 1 and direction is not None:
        text += f", {'reverse' if direction else 'forward'} direction ({direction})"
    else:
        text += f", direction {direction or 0}"
    return text


def _measured(m: ModuleReport, layer: int | None, direction: int | None, seq_len: int) -> str:
    li, di = (layer or 0), (direction or 0)
    parts: list[str] = []
    gain = _get(m.gain, li, di)
    if gain is not None:
        parts.append(f"per-step gain {_fmt(gain)}")
    horizon = _get(m.horizon, li, di)
    if horizon is not None:
        if math.isinf(horizon):
            parts.append(f"horizon: stays above 1% over the whole {seq_len}-step sequence")
        elif math.isnan(horizon):
            parts.append("horizon: not measurable")
        else:
            parts.append(
                f"horizon {horizon:.3g} steps versus sequence length {seq_len} (dependencies "
                f"further than {horizon:.3g} steps back get under 1% of the gradient)"
            )
    att = _get(m.log10_attenuation, li, di)
    if att is not None and math.isfinite(att) and abs(att) < 0.05:
        parts.append("the gradient keeps its size over the sequence")
    elif att is not None and math.isfinite(att):
        word = "shrinks" if att < 0 else "grows"
        parts.append(f"the gradient {word} by a factor 10^{abs(att):.1f} over the sequence")
    elif att is not None:
        parts.append(f"log10 attenuation over the sequence {_fmt(att)}")
    actual = _get(m.actual_gain, li, di)
    if actual is not None and math.isfinite(actual):
        parts.append(f"actual gradient's per-step gain {_fmt(actual)}")
    return "; ".join(parts)


def _get(value: Any, layer: int, direction: int) -> float | None:
    if value is None:
        return None
    try:
        return float(value[layer, direction])
    except (IndexError, TypeError):
        return None


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def _horizon(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "never"
    return "nan" if math.isnan(x) else format(x, ".3g")


def _pct(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{100 * x:.0f}%"


def _ld(m: ModuleReport, layer: int, direction: int) -> str:
    return f"l{layer}d{direction}"
