"""``--html``: one self-contained page (inline CSS and SVG, heatmaps as ``data:`` PNGs).

Nothing on the page refers to anything outside it (no script, font, stylesheet or image
URL), so it opens offline and can be attached to an e-mail or kept as a CI artifact.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence

import numpy as np

from gradwatch._base.vocabulary import VERDICTS
from gradwatch._outputs.tags import PREFIX
from gradwatch._report.model import ModuleSummary, RunSummary
from gradwatch._report.svg import PALETTE, Series, heatmap_svg, line_svg
from gradwatch._report.table import (
    COMPARE_HEADER,
    HEADER,
    compare_rows,
    fmt_gain,
    fmt_horizon,
    module_rows,
    run_notes,
)

__all__ = ["report_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#666}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 9px;border-bottom:1px solid #eee;
text-align:left;white-space:nowrap}th{background:#f4f4f4}
.v-healthy{color:#1a7f37;font-weight:600}.v-vanishing{color:#b35900;font-weight:600}
.v-exploding{color:#c62828;font-weight:600}.v-nonfinite{color:#8e24aa;font-weight:600}
.best{font-weight:700;background:#e8f5e9}.warn{background:#fff4e5;border:1px solid #f0c36d;
padding:6px 10px}.figs{display:flex;flex-wrap:wrap;gap:8px}
svg.chart{border:1px solid #eee;background:#fcfcfc}svg text.t{font-size:12px;font-weight:600}
svg text.a{font-size:11px;fill:#444}svg text.k{font-size:9.5px;fill:#555}
ul{margin:4px 0}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell(text: str, col: str) -> str:
    word = text.rstrip("*")
    cls = f' class="v-{word}"' if col == "verdict" and word in VERDICTS else ""
    return f"<td{cls}>{_e(text)}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_cell(c, h) for c, h in zip(r, header, strict=True)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _compare(runs: Sequence[RunSummary]) -> str:
    out = ["<h2>Comparison (last capture of each run)</h2>"]
    for name, label, entries in compare_rows(runs):
        head = "".join(f"<th>{_e(h)}</th>" for h in COMPARE_HEADER)
        rows = []
        for e in entries:
            gain = fmt_gain(e["gain"])
            horizon = fmt_horizon(e["horizon"])
            rows.append(
                f"<tr><td>{_e(e['run'])}</td>{_cell(e['verdict'], 'verdict')}"
                f"<td{' class=best' if e['best_gain'] else ''}>{_e(gain)}</td>"
                f"<td{' class=best' if e['best_horizon'] else ''}>{_e(horizon)}</td>"
                f"<td>{_e(e['seq_len'] if e['seq_len'] is not None else '-')}</td>"
                f"<td>{_e(e['step'])}</td></tr>"
            )
        out.append(f"<h3>{_e(name)} {_e(label)}</h3><table><tr>{head}</tr>{''.join(rows)}</table>")
    out.append('<p class="meta">Highlighted: the best of the runs, gain closest to 1 and '
               "longest horizon.</p>")  # fmt: skip
    return "".join(out)


def _lane_name(m: ModuleSummary, layer: int, direction: int) -> str:
    return f"{m.name} l{layer}d{direction}"


def _pictures(run: RunSummary, m: ModuleSummary) -> str:
    """Heatmap over training, profile and propagation at the last capture, per lane."""
    profiles = run.data.profiles.get(m.name, {})
    if not profiles:
        return '<p class="meta">No per-timestep profiles in the event files (written by ' \
               "TensorBoard loggers only).</p>"  # fmt: skip
    steps = sorted(profiles)
    header, last = profiles[steps[-1]]
    parts = []
    for layer in range(header.num_layers):
        for direction in range(header.num_directions):
            lane = _lane_name(m, layer, direction)
            totals = [profiles[s][1]["total"][layer, direction] for s in steps]
            parts.append(
                heatmap_svg(steps, totals, title=f"{lane}: log10 ||dL/dh_t|| over training")
            )
            parts.append(_profile(last, layer, direction, f"{lane}: dL/dh_t at step {steps[-1]}"))
            parts.append(_propagation(last, layer, direction, lane, steps[-1]))
    return f'<div class="figs">{"".join(parts)}</div>'


def _profile(values: dict[str, np.ndarray], layer: int, direction: int, title: str) -> str:
    series = []
    for i, row in enumerate(("total", "carried", "direct")):
        if row in values:
            y = values[row][layer, direction]
            series.append(Series(row, range(len(y)), y.tolist(), PALETTE[i]))
    return line_svg(series, title=title, xlabel="timestep t", ylabel="||dL/dh_t||", logy=True)


def _propagation(
    values: dict[str, np.ndarray], layer: int, direction: int, lane: str, step: int
) -> str:
    curve = values.get("propagation")
    if curve is None:
        return ""
    y = curve[layer, direction].astype(float)
    k = list(range(len(y)))
    series = [Series("log10 a(k)", k, y.tolist(), PALETTE[1])]
    gain = float(values["gain"][layer, direction]) if "gain" in values else math.nan
    if gain > 0 and math.isfinite(gain):
        series.append(
            Series(f"gain {gain:.3g}/step", k, [i * math.log10(gain) for i in k], "#888", "5 3")
        )
    horizon = float(values["horizon"][layer, direction]) if "horizon" in values else math.nan
    # a horizon beyond the measured curve is an extrapolation: named in the title, not drawn
    drawn = horizon if horizon <= len(y) - 1 else math.nan
    return line_svg(
        series,
        title=f"{lane}: propagation at step {step} (horizon {fmt_horizon(horizon)})",
        xlabel="steps back k",
        ylabel="log10 a(k)",
        hlines=[(-2.0, "1%")],
        vlines=[(drawn, f"horizon {fmt_horizon(horizon)}")],
    )


def _curves(run: RunSummary, m: ModuleSummary) -> str:
    """The scalar curves of one module over training, one line per layer/direction."""
    s = run.data.scalars
    head = f"{PREFIX}/{m.name}/"
    charts = []
    for metric, title, ylabel, logy in (
        ("gain", "per-step gain", "gain", True),
        ("horizon_fraction", "horizon / sequence length", "fraction", False),
    ):
        series = []
        for i, lane in enumerate(m.lanes):
            data = s.get(f"{head}{lane.label}/{metric}", {})
            xs = sorted(data)
            color = PALETTE[(i + 1) % len(PALETTE)]
            series.append(Series(lane.label, xs, [data[x] for x in xs], color))
        if any(ser.x for ser in series):
            charts.append(
                line_svg(series, title=f"{m.name}: {title}", xlabel="training step",
                         ylabel=ylabel, logy=logy)
            )  # fmt: skip
    verdicts = s.get(head + "verdict", {})
    xs = sorted(verdicts)
    charts.append(
        line_svg(
            [Series("verdict", xs, [verdicts[x] for x in xs], PALETTE[4], step=True)],
            title=f"{m.name}: verdict",
            xlabel="training step",
            ylabel="",
            yticks=[0, 1, 2, 3],
            ylabels=list(VERDICTS),
            yrange=(-0.3, 3.3),
        )
    )
    return f'<div class="figs">{"".join(charts)}</div>'


def _run_curves(run: RunSummary) -> str:
    """Run-wide curves: clipping norm and threshold, recurrent parameter gradient norms."""
    s = run.data.scalars
    charts = []
    clip = [(t, f"{PREFIX}/clip/{t}") for t in ("pre_norm", "threshold")]
    series = [
        Series(label, sorted(s[tag]), [s[tag][x] for x in sorted(s[tag])], PALETTE[i + 1])
        for i, (label, tag) in enumerate(clip)
        if tag in s
    ]
    if series:
        charts.append(line_svg(series, title="clipping: norm before clipping, threshold",
                               xlabel="training step", ylabel="norm", logy=True))  # fmt: skip
    series = []
    for i, name in enumerate(run.modules):
        tag = f"{PREFIX}/{name}/param_grad_norm"
        if tag in s:
            xs = sorted(s[tag])
            series.append(Series(name, xs, [s[tag][x] for x in xs], PALETTE[(i + 1) % 7]))
    if series:
        charts.append(line_svg(series, title="recurrent parameter gradient norm",
                               xlabel="training step", ylabel="norm", logy=True))  # fmt: skip
    return f'<div class="figs">{"".join(charts)}</div>' if charts else ""


def _run_section(run: RunSummary) -> str:
    out = [f"<h2>Run {_e(run.name)}</h2>"]
    out.extend(f'<p class="warn">{_e(w)}</p>' for w in run.warnings)
    rows = [r for m in run.modules.values() for r in module_rows(m)]
    if rows:
        out.append(_table(HEADER, rows))
    out.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in run_notes(run)) + "</ul>")
    out.append(_run_curves(run))
    for m in run.modules.values():
        out.append(f"<h3>{_e(m.name)} ({_e(m.kind)}): {_e(m.verdict)}</h3>")
        if m.explanation:
            out.append(f"<p>{_e(m.explanation)}</p>")
        out.append(_pictures(run, m))
        out.append(_curves(run, m))
    return "".join(out)


def report_html(runs: Sequence[RunSummary], *, warnings: Sequence[str] = ()) -> str:
    """The whole page."""
    made = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    body = [
        "<h1>gradwatch report</h1>",
        f'<p class="meta">{len(runs)} run{"s" if len(runs) != 1 else ""}; made {made}. '
        "gain: per-step factor of a gradient carried back through time (&lt;1 shrinks, "
        "&gt;1 grows); horizon: steps until it falls below 1% (never: not within the "
        "sequence).</p>",
    ]
    body.extend(f'<p class="warn">{_e(w)}</p>' for w in warnings)
    if len(runs) > 1:
        body.append(_compare(runs))
    body.extend(_run_section(r) for r in runs)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>gradwatch report</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )
