"""Independent float64 reference for ncps' ``CfC`` (not wired, ``return_sequences=True``): the
layer's loop rewritten from its own parameters (Hasani et al., 2022, the CfC cell in its
default, ``no_gate`` and ``pure`` modes; with ``mixed_memory``, the LSTM cell first), each
state part consumed through two identity views, one feeding the next step ("carried") and one
feeding everything else ("direct"); ``retain_grad`` on ``h_t`` itself gives its total."""

from __future__ import annotations

import torch
from torch import Tensor


def _view(t: Tensor) -> Tensor:
    v = t.view_as(t)
    v.retain_grad()
    return v


def _cfc_cell(cell, x: Tensor, h: Tensor, ts: float) -> Tensor:
    z = torch.cat([x, h], 1)
    if cell.backbone_layers > 0:
        z = cell.backbone(z)
    ff1 = cell.ff1(z)
    if cell.mode == "pure":
        return -cell.A * torch.exp(-ts * (cell.w_tau.abs() + ff1.abs())) * ff1 + cell.A
    ff1, ff2 = torch.tanh(ff1), torch.tanh(cell.ff2(z))
    t_interp = torch.sigmoid(cell.time_a(z) * ts + cell.time_b(z))
    if cell.mode == "no_gate":
        return ff1 + t_interp * ff2
    return ff1 * (1.0 - t_interp) + t_interp * ff2


def _lstm_cell(lstm, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    z = lstm.input_map(x) + lstm.recurrent_map(h)
    i, ig, fg, og = z.chunk(4, 1)
    c_new = c * torch.sigmoid(fg + 1.0) + torch.tanh(i) * torch.sigmoid(ig)
    return torch.tanh(c_new) * torch.sigmoid(og), c_new


def cfc_unrolled(layer, x: Tensor) -> tuple[Tensor, Tensor, list[dict]]:
    """``layer(x)`` (batch first) in the dtype of ``x``: ``(readout, final h, taps)``."""
    batch = x.shape[0]
    h = torch.zeros(batch, layer.state_size, dtype=x.dtype)
    c = torch.zeros_like(h) if layer.use_mixed else None
    taps, readout = [], []
    for t in range(x.shape[1]):
        hx = h
        if c is not None:
            hx, c_new = _lstm_cell(layer.lstm, x[:, t], h, c)
        h_new = _cfc_cell(layer.rnn_cell, x[:, t], hx, 1.0)
        h_new.retain_grad()
        tap = {"h": h_new, "out": _view(h_new), "rec": [_view(h_new)]}
        if c is not None:
            tap["rec"].append(_view(c_new))
            c = tap["rec"][1]
        taps.append(tap)
        readout.append(layer.fc(tap["out"]))
        h = tap["rec"][0]
    return torch.stack(readout, 1), taps[-1]["out"], taps


def cfc_stats(taps: list[dict]) -> dict[str, Tensor]:
    """Per-sample norms, batch mean, ``[T]``: total and direct of ``h``, carried over the
    whole state (``h``, and ``c`` with mixed memory)."""

    def norm(t: Tensor) -> Tensor:
        return (torch.zeros_like(t) if t.grad is None else t.grad).norm(dim=-1)

    rows = {"total": [], "direct": [], "carried": []}
    for tap in taps:
        rows["total"].append(norm(tap["h"]).mean())
        rows["direct"].append(norm(tap["out"]).mean())
        rec = torch.stack([norm(v) for v in tap["rec"]])
        rows["carried"].append(rec.square().sum(0).sqrt().mean())
    return {k: torch.stack(v) for k, v in rows.items()}


def unroll_cell(cell, x: Tensor, state_size: int) -> list[dict]:
    """Any ncps cell ``(y_t, h_t) = cell(x_t, h_{t-1}, 1.0)`` unrolled over ``x`` [B, T, F],
    with the taps of `cfc_stats` (``"y"``: the step's output, computed from the direct view)."""
    h = torch.zeros(x.shape[0], state_size, dtype=x.dtype)
    taps = []
    for t in range(x.shape[1]):
        _, h_new = cell(x[:, t], h, 1.0)
        h_new.retain_grad()
        tap = {"h": h_new, "out": _view(h_new), "rec": [_view(h_new)]}
        tap["y"] = cell._map_outputs(tap["out"])
        taps.append(tap)
        h = tap["rec"][0]
    return taps
