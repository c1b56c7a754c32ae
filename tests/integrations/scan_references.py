"""Independent float64 references for the scan packages: each module's forward rewritten
from its own parameters with the recurrence unrolled step by step (no parallel or log-space
scan), every state tapped as in ``tests/scan_reference.py``: ``retain_grad`` on ``h_t`` for the
total, one identity view feeding the next step (carried), one feeding the rest (direct)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class Taps:
    """The tapped states of one module call."""

    def __init__(self) -> None:
        self.states: list[Tensor] = []
        self.outs: list[Tensor] = []
        self.recs: list[Tensor] = []
        self.a: Tensor | None = None

    def unroll(self, a: Tensor, u: Tensor, h0: Tensor | None = None) -> Tensor:
        """``h_t = a_t * h_{t-1} + u_t`` over dimension 1; returns the stacked direct views."""
        self.a = a.detach()
        prev = torch.zeros_like(u[:, 0]) if h0 is None else h0
        for t in range(u.shape[1]):
            h = a[:, t] * prev + u[:, t]
            h.retain_grad()
            out, rec = h.view_as(h), h.view_as(h)
            out.retain_grad()
            rec.retain_grad()
            self.states.append(h)
            self.outs.append(out)
            self.recs.append(rec)
            prev = rec
        return torch.stack(self.outs, 1)

    def stats(self) -> dict[str, Tensor]:
        """Per-sample norm over the state, batch mean, ``[T]`` (float64)."""

        def norms(xs: list[Tensor]) -> Tensor:
            g = torch.stack([torch.zeros_like(x) if x.grad is None else x.grad for x in xs], 1)
            return g.reshape(g.shape[0], g.shape[1], -1).norm(dim=-1).mean(0)

        return {
            "total": norms(self.states),
            "direct": norms(self.outs),
            "carried": norms(self.recs),
        }


def mambapy_block(blk, x: Tensor, taps: Taps) -> Tensor:
    """mambapy ``MambaBlock.forward`` (use_cuda=False, no inner layernorms), unrolled."""
    length = x.shape[1]
    cfg = blk.config
    xz = blk.in_proj(x)
    x, z = xz.chunk(2, dim=-1)
    x = F.silu(blk.conv1d(x.transpose(1, 2))[:, :, :length].transpose(1, 2))
    A = -torch.exp(blk.A_log)
    delta, B, C = torch.split(blk.x_proj(x), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
    delta = F.softplus(blk.dt_proj(delta))  # (B, L, ED)
    a = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, ED, N)
    u = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
    hs = taps.unroll(a, u)
    y = (hs @ C.unsqueeze(-1)).squeeze(3) + blk.D * x
    return blk.out_proj(y * F.silu(z))


def hf_mixer(mixer, x: Tensor, taps: Taps) -> Tensor:
    """transformers ``MambaMixer.forward`` (no cache, no mask), unrolled, in [B, L, D, N]."""
    length = x.shape[1]
    proj = mixer.in_proj(x)  # (B, L, 2D)
    hidden, gate = proj.chunk(2, dim=-1)
    hidden = mixer.conv1d(hidden.transpose(1, 2))[..., :length].transpose(1, 2)
    hidden = F.silu(hidden)
    n, r = mixer.ssm_state_size, mixer.time_step_rank
    time_step, B, C = torch.split(mixer.x_proj(hidden), [r, n, n], dim=-1)
    dt = F.softplus(time_step @ mixer.dt_proj.weight.t() + mixer.dt_proj.bias)  # (B, L, D)
    A = -torch.exp(mixer.A_log)  # (D, N)
    a = torch.exp(dt.unsqueeze(-1) * A)
    u = dt.unsqueeze(-1) * B.unsqueeze(2) * hidden.unsqueeze(-1)
    hs = taps.unroll(a, u)
    y = (hs @ C.unsqueeze(-1)).squeeze(-1) + hidden * mixer.D
    return mixer.out_proj(y * F.silu(gate))


def min_gru(module, x: Tensor, taps: Taps) -> Tensor:
    """minGRU-pytorch ``minGRU.forward`` (parallel mode, no previous hidden) in its sequential
    form: ``h_t = (1 - z_t) h_{t-1} + z_t g(h~_t)`` (Feng et al., 2024, appendix B.3)."""
    hidden, gate = module.to_hidden_and_gate(x).chunk(2, dim=-1)
    z = torch.sigmoid(gate)
    g = torch.where(hidden >= 0, hidden + 0.5, torch.sigmoid(hidden))
    hs = taps.unroll(1 - z, z * g)
    return module.to_out(hs)


def min_lstm(module, x: Tensor, taps: Taps) -> Tensor:
    """minGRU-pytorch ``minLSTM.forward`` (parallel mode, no previous hidden) in its sequential
    form: ``h_t = f'_t h_{t-1} + i'_t g(h~_t)`` with ``f' = f / (f + i)``, ``i' = i / (f + i)``
    (Feng et al., 2024, appendix B.3.2)."""
    hidden, f_gate, i_gate = module.to_hidden_and_f_i_gate(x).chunk(3, dim=-1)
    f, i = torch.sigmoid(f_gate), torch.sigmoid(i_gate)
    g = torch.where(hidden >= 0, hidden + 0.5, torch.sigmoid(hidden))
    hs = taps.unroll(f / (f + i), i / (f + i) * g)
    return module.to_out(hs)
