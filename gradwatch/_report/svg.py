"""Hand-written inline SVG charts for the HTML report: no matplotlib, no external resource.

A heatmap is a PNG (written here with ``zlib``) embedded as a ``data:`` URI in the SVG, one
pixel per (training step, timestep), scaled up without smoothing.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Series", "heatmap_svg", "line_svg", "png_rgb"]

# viridis at 0, 0.25, 0.5, 0.75, 1 (matplotlib's values), interpolated linearly
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float
)
_GREY = (217, 217, 217)
_RED = (220, 30, 30)
PALETTE = ("#222222", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_W, _H = 440, 250
_M = {"left": 58, "right": 14, "top": 26, "bottom": 40}


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = PALETTE[0]
    dash: str = ""
    step: bool = False  # draw as a staircase (verdicts)


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt_tick(v: float, log: bool) -> str:
    if log:
        return f"1e{v:.0f}" if v == int(v) else f"{10**v:.3g}"
    return f"{v:.4g}"


def _frame(
    title: str, xlabel: str, ylabel: str, xr: tuple[float, float], yr: tuple[float, float],
    *, logy: bool = False, yticks: Sequence[float] | None = None, ylabels: Sequence[str] = (),
    right: int = _M["right"],
) -> tuple[list[str], Callable[[float], float], Callable[[float], float]]:  # fmt: skip
    """Axes, ticks and labels; returns the SVG parts and the x, y mappings to pixels."""
    x0, x1 = xr
    y0, y1 = yr
    pw, ph = _W - _M["left"] - right, _H - _M["top"] - _M["bottom"]

    def px(x: float) -> float:
        return _M["left"] + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return _M["top"] + ph - (y - y0) / ((y1 - y0) or 1) * ph

    parts = [
        f'<svg class="chart" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img">',
        f"<title>{_esc(title)}</title>",
        f'<rect x="{_M["left"]}" y="{_M["top"]}" width="{pw}" height="{ph}" fill="#fff" '
        'stroke="#999"/>',
        f'<text x="{_W / 2}" y="16" text-anchor="middle" class="t">{_esc(title)}</text>',
        f'<text x="{_M["left"] + pw / 2}" y="{_H - 6}" text-anchor="middle" class="a">'
        f"{_esc(xlabel)}</text>",
        f'<text transform="translate(13 {_M["top"] + ph / 2}) rotate(-90)" '
        f'text-anchor="middle" class="a">{_esc(ylabel)}</text>',
    ]
    for x in _nice_ticks(x0, x1):
        parts.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{_M["top"] + ph}" '
            f'y2="{_M["top"] + ph + 4}" stroke="#999"/><text x="{px(x):.1f}" '
            f'y="{_M["top"] + ph + 15}" text-anchor="middle" class="k">{x:.4g}</text>'
        )
    ticks = list(yticks) if yticks is not None else _nice_ticks(y0, y1)
    for i, y in enumerate(ticks):
        label = ylabels[i] if i < len(ylabels) else _fmt_tick(y, logy)
        parts.append(
            f'<line x1="{_M["left"]}" x2="{_M["left"] + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
            f'stroke="#eee"/><text x="{_M["left"] - 4}" y="{py(y) + 3:.1f}" text-anchor="end" '
            f'class="k">{_esc(label)}</text>'
        )
    return parts, px, py


def _range(values: list[float], pad: float = 0.05) -> tuple[float, float]:
    good = [v for v in values if math.isfinite(v)]
    if not good:
        return (0.0, 1.0)
    lo, hi = min(good), max(good)
    if hi - lo < 1e-12:
        return (lo - 0.5, hi + 0.5)
    return (lo - pad * (hi - lo), hi + pad * (hi - lo))


def line_svg(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    hlines: Sequence[tuple[float, str]] = (),
    vlines: Sequence[tuple[float, str]] = (),
    yticks: Sequence[float] | None = None,
    ylabels: Sequence[str] = (),
    yrange: tuple[float, float] | None = None,
) -> str:
    """A line chart; ``logy`` plots log10 of positive values (others leave gaps)."""

    def tr(v: float) -> float:
        if not logy:
            return v
        return math.log10(v) if v > 0 and math.isfinite(v) else math.nan

    ys = [[tr(float(v)) for v in s.y] for s in series]
    xs = [[float(v) for v in s.x] for s in series]
    xr = _range([v for x in xs for v in x] + [v for v, _ in vlines], pad=0.0)
    yr = yrange or _range([v for y in ys for v in y] + [tr(v) for v, _ in hlines])
    parts, px, py = _frame(title, xlabel, ylabel, xr, yr, logy=logy, yticks=yticks, ylabels=ylabels)
    for value, label in hlines:
        y = py(tr(value))
        parts.append(
            f'<line x1="{_M["left"]}" x2="{_W - _M["right"]}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#888" stroke-dasharray="2 3"><title>{_esc(label)}</title></line>'
        )
    for value, label in vlines:
        if math.isfinite(value):
            x = px(value)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_M["top"]}" y2="{_H - _M["bottom"]}" '
                f'stroke="#d62728" stroke-width="1.2"><title>{_esc(label)}</title></line>'
            )
    legend = []
    for i, s in enumerate(series):
        parts.extend(_polyline(xs[i], ys[i], s, px, py))
        legend.append((s.label, s.color, s.dash))
    legend += [(label, "#888", "2 3") for _, label in hlines]
    legend += [(label, "#d62728", "") for v, label in vlines if math.isfinite(v)]
    for i, (label, color, dash) in enumerate(legend):
        y = _M["top"] + 10 + 12 * i
        x = _W - _M["right"] - 118
        parts.append(
            f'<line x1="{x}" x2="{x + 16}" y1="{y - 3}" y2="{y - 3}" stroke="{color}" '
            f'stroke-width="2" stroke-dasharray="{dash}"/><text x="{x + 20}" y="{y}" '
            f'class="k">{_esc(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _polyline(xs: list[float], ys: list[float], s: Series, px: Callable, py: Callable) -> list[str]:
    """Finite runs of points as polylines (gaps at NaN); lone points as dots."""
    out, run = [], []
    points = list(zip(xs, ys, strict=True))
    for i, (x, y) in enumerate(points):
        if math.isfinite(y):
            if s.step and run and i > 0:
                run.append(f"{px(x):.1f},{py(points[i - 1][1]):.1f}")
            run.append(f"{px(x):.1f},{py(y):.1f}")
        if not math.isfinite(y) or i == len(points) - 1:
            if len(run) == 1:
                x1, y1 = run[0].split(",")
                out.append(f'<circle cx="{x1}" cy="{y1}" r="2.5" fill="{s.color}"/>')
            elif run:
                out.append(
                    f'<polyline fill="none" stroke="{s.color}" stroke-width="1.6" '
                    f'stroke-dasharray="{s.dash}" points="{" ".join(run)}"/>'
                )
            run = []
    return out


def png_rgb(pixels: np.ndarray) -> bytes:
    """A PNG file of ``uint8 [H, W, 3]`` pixels (no filtering; zlib-compressed)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _colours(logs: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((logs - lo) / ((hi - lo) or 1.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(np.nan_to_num(t)).astype(int), len(_VIRIDIS) - 2)
    f = (np.nan_to_num(t) - i)[..., None]
    return (_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).round().astype(np.uint8)


def heatmap_svg(steps: Sequence[int], profiles: Sequence[np.ndarray], *, title: str) -> str:
    """log10 of ``profiles[i]`` (``[T_i]``, training step ``steps[i]``) as rows: training
    step upwards, timestep to the right. Padding and zeros grey, non-finite values red."""
    width = max(p.shape[-1] for p in profiles)
    stack = np.full((len(profiles), width), np.nan)
    measured = np.zeros(stack.shape, dtype=bool)
    for i, p in enumerate(profiles):
        stack[i, : p.shape[-1]] = p
        measured[i, : p.shape[-1]] = True
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(np.isfinite(stack) & (stack > 0), stack, np.nan))
    finite = logs[np.isfinite(logs)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (-1.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    pixels = _colours(logs, lo, hi)
    pixels[~np.isfinite(logs)] = _GREY
    pixels[measured & ~np.isfinite(stack)] = _RED
    pixels = pixels[::-1]  # latest training step on top
    png = png_rgb(np.ascontiguousarray(pixels))
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    parts, _, _ = _frame(
        title, "timestep t", "training step", (-0.5, width - 0.5), (-0.5, len(steps) - 0.5),
        yticks=[], ylabels=[], right=_M["right"] + 40,
    )  # fmt: skip
    pw, ph = _W - _M["left"] - _M["right"] - 40, _H - _M["top"] - _M["bottom"]
    parts.append(
        f'<image x="{_M["left"]}" y="{_M["top"]}" width="{pw}" height="{ph}" '
        f'preserveAspectRatio="none" style="image-rendering:pixelated" href="{uri}"/>'
    )
    # training-step labels: first, middle and last row
    for i in sorted({0, len(steps) // 2, len(steps) - 1}):
        y = _M["top"] + ph - (i + 0.5) / len(steps) * ph
        parts.append(
            f'<text x="{_M["left"] - 4}" y="{y + 3:.1f}" text-anchor="end" class="k">'
            f"{steps[i]}</text>"
        )
    # colour bar
    bx = _W - _M["right"] - 30
    for j in range(20):
        colour = _colours(np.array([lo + (hi - lo) * (j + 0.5) / 20]), lo, hi)[0]
        parts.append(
            f'<rect x="{bx}" y="{_M["top"] + ph * (19 - j) / 20:.1f}" width="10" '
            f'height="{ph / 20 + 0.5:.1f}" fill="rgb({colour[0]},{colour[1]},{colour[2]})"/>'
        )
    for value, y in ((hi, _M["top"] + 8), (lo, _M["top"] + ph)):
        parts.append(f'<text x="{bx + 12}" y="{y:.1f}" class="k">{value:.1f}</text>')
    parts.append(
        f'<text transform="translate({_W - 2} {_M["top"] + ph / 2}) rotate(-90)" '
        'text-anchor="middle" class="k">log10 ||dL/dh_t||</text></svg>'
    )
    return "".join(parts)
