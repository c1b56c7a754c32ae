"""A small float64 unrolled reference for benchmarks/gpu_check.py: dL/dh_t by autograd.

Independent of gradwatch's replay: the module's step equations written out (PyTorch's
documented gate order) and unrolled in float64 with ``retain_grad`` on every state, for any
fused configuration (layers, directions, ``proj_size``, variable lengths).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _step(mode: str, p: dict[str, Tensor], x: Tensor, h: Tensor, c: Tensor | None):
    gi = x @ p["w_ih"].t() + p.get("b_ih", 0)
    gh = h @ p["w_hh"].t() + p.get("b_hh", 0)
    if mode in ("RNN_TANH", "RNN_RELU"):
        a = gi + gh
        return (torch.tanh(a) if mode == "RNN_TANH" else torch.relu(a)), None
    if mode == "GRU":
        r_i, z_i, n_i = gi.chunk(3, 1)
        r_h, z_h, n_h = gh.chunk(3, 1)
        r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * n_h)
        return (1 - z) * n + z * h, None
    i, f, g, o = (gi + gh).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if "w_hr" in p:
        h = h @ p["w_hr"].t()
    return h, c


def reference_totals(
    module: nn.RNNBase, x: Tensor, lengths: Tensor | None, r: Tensor, s: Tensor
) -> Tensor:
    """Mean over valid samples of ``||dL/dh_t||`` per layer, direction and step ``[L, D, T]``
    for ``L = sum(out * r) + sum(h_n * s)``; ``x`` is time-major ``[T, B, I]``."""
    mode, dirs = module.mode, 2 if module.bidirectional else 1
    T, B = x.shape[0], x.shape[1]
    lengths = torch.full((B,), T) if lengths is None else lengths
    valid = (torch.arange(T).view(T, 1) < lengths.view(1, B)).double().unsqueeze(-1)
    params = {
        n: w.detach().double()
        for n, w in zip(module._flat_weights_names, module._flat_weights, strict=True)
    }
    out_size = module.proj_size or module.hidden_size
    inp = x.double().requires_grad_()  # so that every state is part of a graph
    states: list[list[list[Tensor]]] = []
    finals = []
    for layer in range(module.num_layers):
        outs, per_dir = [], []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            p = {
                k: params[k + sfx]
                for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
                if k + sfx in params
            }
            p = {k.replace("weight", "w").replace("bias", "b"): v for k, v in p.items()}
            h = x.new_zeros(B, out_size, dtype=torch.float64)
            c = x.new_zeros(B, module.hidden_size, dtype=torch.float64) if mode == "LSTM" else None
            hs: list[Tensor] = [h] * T
            for t in range(T - 1, -1, -1) if d else range(T):
                h_new, c_new = _step(mode, p, inp[t], h, c)
                m = valid[t]
                h = m * h_new + (1 - m) * h
                c = None if c is None else m * c_new + (1 - m) * c
                h.retain_grad()
                hs[t] = h
            per_dir.append(hs)
            outs.append(torch.stack(hs) * valid)
            finals.append(h)
        states.append(per_dir)
        inp = torch.cat(outs, -1)
    loss = (inp * r.double()).sum() + (torch.stack(finals) * s.double()).sum()
    loss.backward()
    totals = torch.zeros(module.num_layers, dirs, T, dtype=torch.float64)
    for layer, per_dir in enumerate(states):
        for d, hs in enumerate(per_dir):
            norms = torch.stack([h.grad.norm(dim=-1) for h in hs])  # [T, B]
            totals[layer, d] = (norms * valid[..., 0]).sum(1) / valid[..., 0].sum(1).clamp_min(1)
    return totals
