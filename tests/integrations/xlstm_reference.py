"""Independent float64 reference for xlstm's sLSTM cell (``backend="vanilla"``): the step
equations of Beck et al. (2024), eq. 8-17 with the stabiliser ``m_t``, rewritten from the
cell's own parameters and unrolled with autograd. Each state part ``(y, c, n, m)`` is consumed
through two identity views, one feeding the next step ("carried") and one feeding the
returned tensors ("direct"); ``retain_grad`` on the part itself gives its total."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _view(t: Tensor) -> Tensor:
    v = t.view_as(t)
    v.retain_grad()
    return v


def slstm_unrolled(cell, x: Tensor) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """``cell(x)`` for ``x`` ``[B, S, 4H]`` (input_shape "BSGNH"), unrolled in the dtype of
    ``x``. Returns ``(output [B, NH, S, DH], final state [4, B, H], taps per step)``."""
    cfg = cell.config
    nh, dh, hidden = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    batch, steps = x.shape[0], x.shape[1]
    R = cell._recurrent_kernel.to(x.dtype)  # [NH, 4*DH, DH]
    b = cell._bias.to(x.dtype)  # [4*H], gate-major
    wx = x.reshape(batch, steps, 4, nh, dh).permute(1, 0, 2, 3, 4).reshape(steps, batch, -1)
    y = c = n = m = torch.zeros(batch, hidden, dtype=x.dtype)
    taps, outs = [], []
    for t in range(steps):
        ry = torch.einsum("bkd,kgd->bkg", y.reshape(batch, nh, dh), R)  # [B, NH, 4*DH]
        ry = ry.reshape(batch, nh, 4, dh).transpose(1, 2).reshape(batch, -1)
        i_raw, f_raw, z_raw, o_raw = (wx[t] + ry + b).reshape(batch, 4, hidden).unbind(1)
        log_f_plus_m = m + F.logsigmoid(f_raw)
        m_new = i_raw if t == 0 else torch.maximum(i_raw, log_f_plus_m)
        i_gate = torch.minimum(torch.exp(i_raw - m_new), torch.ones_like(i_raw))
        f_gate = torch.minimum(torch.exp(log_f_plus_m - m_new), torch.ones_like(i_raw))
        c_new = f_gate * c + i_gate * torch.tanh(z_raw)
        n_new = f_gate * n + i_gate
        y_new = torch.sigmoid(o_raw) * c_new / n_new
        parts = {"y": y_new, "c": c_new, "n": n_new, "m": m_new}
        for p in parts.values():
            p.retain_grad()
        tap = {"parts": parts, "out": {}, "rec": {}}
        for k, p in parts.items():
            tap["out"][k], tap["rec"][k] = _view(p), _view(p)
        taps.append(tap)
        outs.append(tap["out"]["y"])
        y, c, n, m = (tap["rec"][k] for k in ("y", "c", "n", "m"))
    out = torch.stack(outs, 0).reshape(steps, batch, nh, dh).permute(1, 2, 0, 3)
    final = torch.stack([taps[-1]["out"][k] for k in ("y", "c", "n", "m")])
    return out, final, taps


def slstm_stats(taps: list[dict]) -> dict[str, Tensor]:
    """The report's statistics ``[T]``: total and direct of ``y``, carried over the whole
    state, cell_total of ``c``; per-sample norms, batch mean."""

    def g(t: Tensor) -> Tensor:
        return torch.zeros_like(t) if t.grad is None else t.grad

    def norm(t: Tensor) -> Tensor:
        return t.norm(dim=-1)

    rows = {"total": [], "direct": [], "carried": [], "cell_total": []}
    for tap in taps:
        rows["total"].append(norm(g(tap["parts"]["y"])).mean())
        rows["direct"].append(norm(g(tap["out"]["y"])).mean())
        rows["cell_total"].append(norm(g(tap["parts"]["c"])).mean())
        rec = torch.stack([norm(g(v)) for v in tap["rec"].values()])
        rows["carried"].append(rec.square().sum(0).sqrt().mean())
    return {k: torch.stack(v) for k, v in rows.items()}
