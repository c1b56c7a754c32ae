"""Pictures of one module call: the heatmap over training, the latest profile, propagation.

Figures are built with ``matplotlib.figure.Figure`` and rendered with the Agg canvas, never
through ``pyplot``: no global figure registry to leak into, no GUI backend, safe in worker
threads. `render` turns a figure into an RGB array and releases it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from gradwatch._analysis.report import ModuleReport

__all__ = ["heatmap_figure", "profile_figure", "propagation_figure", "render"]

_PANEL_W, _PANEL_H = 4.2, 2.6
_COLORS = {"total": "#222222", "carried": "#1f77b4", "direct": "#ff7f0e"}


def render(fig: Figure) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` pixels of ``fig``; the figure is cleared afterwards."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return image


def _grid(layers: int, directions: int, dpi: int) -> tuple[Figure, np.ndarray]:
    width, height = _PANEL_W * directions, _PANEL_H * layers + 0.5
    fig = Figure(figsize=(width, height), dpi=dpi)
    # fixed margins in inches: tight_layout would cost as much as drawing the figure
    axes = fig.subplots(
        layers,
        directions,
        squeeze=False,
        gridspec_kw=dict(
            left=0.7 / width,
            right=1 - 0.2 / width,
            bottom=0.45 / height,
            top=1 - 0.55 / height,
            wspace=0.35,
            hspace=0.75 / (_PANEL_H - 0.75),
        ),
    )
    return fig, axes


def _panel_title(m: ModuleReport, layer: int, direction: int) -> str:
    where = f"layer {layer}" + (
        f", {'reverse' if direction else 'forward'}" if m.num_directions > 1 else ""
    )
    if m.verdicts:
        where += f": {m.verdicts[layer][direction]}"
    return where


def heatmap_figure(
    m: ModuleReport, steps: Sequence[int], profiles: Sequence[np.ndarray], *, dpi: int = 80
) -> Figure:
    """log10 ||dL/dh_t|| over training step (rows) x timestep (columns), one panel per layer
    and direction. ``profiles[i]`` is the ``[L, D, T_i]`` total of training step
    ``steps[i]``; shorter sequences are padded. Zero gradients and padding are grey,
    non-finite values are marked with red crosses rather than dropped."""
    fig, axes = _grid(m.num_layers, m.num_directions, dpi)
    width = max(p.shape[-1] for p in profiles)
    stack = np.full((len(profiles), m.num_layers, m.num_directions, width), np.nan)
    for i, p in enumerate(profiles):
        stack[i, :, :, : p.shape[-1]] = p[: m.num_layers, : m.num_directions]
    nonfinite = _measured(stack, profiles) & ~np.isfinite(stack)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(np.isfinite(stack) & (stack > 0), stack, np.nan))
    finite = logs[np.isfinite(logs)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (-1.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    y = np.asarray(steps, dtype=float)
    y_edges = _edges(y)
    x_edges = np.arange(width + 1) - 0.5
    cmap = _cmap()
    for layer in range(m.num_layers):
        for direction in range(m.num_directions):
            ax = axes[layer, direction]
            data = np.ma.masked_invalid(logs[:, layer, direction])
            mesh = ax.pcolormesh(
                x_edges, y_edges, data, cmap=cmap, norm=Normalize(lo, hi), shading="flat"
            )
            bad_r, bad_t = np.nonzero(nonfinite[:, layer, direction])
            if bad_r.size:
                ax.scatter(bad_t, y[bad_r], marker="x", color="red", s=12, label="non-finite")
                ax.legend(loc="upper right", fontsize=6)
            ax.set_title(_panel_title(m, layer, direction), fontsize=8)
            ax.set_xlabel("timestep t", fontsize=7)
            ax.set_ylabel("training step", fontsize=7)
            ax.tick_params(labelsize=6)
            cbar = fig.colorbar(mesh, ax=ax)
            cbar.set_label("log10 ||dL/dh_t||", fontsize=7)
            cbar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{m.name} ({m.kind}): log10 ||dL/dh_t|| over training", fontsize=9)
    return fig


def profile_figure(m: ModuleReport, *, dpi: int = 80) -> Figure:
    """The latest ||dL/dh_t|| per timestep: total, carried (through the recurrence) and direct
    (injected at t), on a log axis. Vanishing shows as carried falling towards the start;
    exploding as total rising towards it."""
    fig, axes = _grid(m.num_layers, m.num_directions, dpi)
    t = np.arange(m.steps)
    series = {"total": m.total, "carried": m.carried, "direct": m.direct}
    for layer in range(m.num_layers):
        for direction in range(m.num_directions):
            ax = axes[layer, direction]
            drawn = False
            for label, tensor in series.items():
                values = tensor[layer, direction].double().numpy()
                shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)
                if np.isfinite(shown).any():
                    ax.plot(t, shown, label=label, color=_COLORS[label], lw=1.2)
                    drawn = True
                bad = ~np.isfinite(values)
                if bad.any():
                    ax.scatter(
                        t[bad],
                        np.full(bad.sum(), _marker_y(values)),
                        marker="x",
                        color="red",
                        s=14,
                        label=f"{label} non-finite",
                    )
            if drawn:
                ax.set_yscale("log")
            ax.set_title(_panel_title(m, layer, direction), fontsize=8)
            ax.set_xlabel("timestep t", fontsize=7)
            ax.set_ylabel("||dL/dh_t||", fontsize=7)
            ax.tick_params(which="both", labelsize=6)
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"{m.name} ({m.kind}): per-timestep gradient, latest step", fontsize=9)
    return fig


def propagation_figure(m: ModuleReport, *, dpi: int = 80) -> Figure | None:
    """log10 a(k) of a unit gradient carried back k steps, the 1% line and the horizon.

    A straight line of slope log10(gain) is pure exponential decay (or growth); the
    horizon is where the curve crosses -2 (1%). ``None`` when the report has no curve.
    """
    if m.propagation is None:
        return None
    fig, axes = _grid(m.num_layers, m.num_directions, dpi)
    seq_len = m.seq_len or m.steps
    for layer in range(m.num_layers):
        for direction in range(m.num_directions):
            ax = axes[layer, direction]
            curve = m.propagation[layer, direction].double().numpy()
            k = np.arange(curve.shape[-1])
            ax.plot(
                k,
                np.where(np.isfinite(curve), curve, np.nan),
                color="#1f77b4",
                lw=1.4,
                label="log10 a(k)",
            )
            ax.axhline(-2.0, color="grey", ls=":", lw=1, label="1%")
            gain = _value(m.gain, layer, direction)
            if math.isfinite(gain) and gain > 0:
                ax.plot(
                    k,
                    k * math.log10(gain),
                    color="grey",
                    ls="--",
                    lw=0.8,
                    label=f"gain {gain:.3g}/step",
                )
            horizon = _value(m.horizon, layer, direction)
            if math.isfinite(horizon):
                ax.axvline(horizon, color="red", lw=1.2, label=f"horizon {horizon:.0f}")
                note = f"horizon {horizon:.0f} of {seq_len} steps"
            elif math.isnan(horizon):
                note = "horizon unknown"
            else:
                note = f"above 1% over all {seq_len} steps"
            ax.set_title(f"{_panel_title(m, layer, direction)} ({note})", fontsize=8)
            ax.set_xlabel("steps back k", fontsize=7)
            ax.set_ylabel("log10 a(k)", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"{m.name} ({m.kind}): propagation through the recurrence", fontsize=9)
    return fig


def _value(tensor, layer: int, direction: int) -> float:
    if tensor is None:
        return math.nan
    return float(tensor[layer, direction])


def _marker_y(values: np.ndarray) -> float:
    """Where to draw non-finite markers on a log axis: at the largest finite value, or 1."""
    good = values[np.isfinite(values) & (values > 0)]
    return float(good.max()) if good.size else 1.0


def _measured(stack: np.ndarray, profiles: Sequence[np.ndarray]) -> np.ndarray:
    """Where ``stack`` holds a measured value rather than padding."""
    measured = np.zeros(stack.shape, dtype=bool)
    for i, p in enumerate(profiles):
        measured[i, :, :, : p.shape[-1]] = True
    return measured


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around (possibly irregular) training steps for ``pcolormesh``."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mids = (centres[1:] + centres[:-1]) / 2
    first = centres[0] - (mids[0] - centres[0])
    last = centres[-1] + (centres[-1] - mids[-1])
    return np.concatenate([[first], mids, [last]])


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#d9d9d9")
