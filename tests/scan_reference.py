"""Independent float64 reference for diagonal linear recurrences ``h_t = a_t * h_{t-1} + u_t``.

The recurrence is unrolled step by step with autograd. Every state ``h_t`` is consumed through
two identity views, one feeding the next step ("carried") and one feeding everything else
("direct"), and ``retain_grad`` on the state itself gives the total; so the three parts are
read separately after ``backward``, without any of the identities the library relies on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def unroll_reference(
    a: Tensor, u: Tensor, outside: Callable[[Tensor], Tensor], h0: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-sample gradient vectors ``[B, T, S]`` (float64) of ``total``, ``direct``, ``carried``.

    ``a`` and ``u`` are ``[B, T, *S]`` with time in dimension 1 (``a`` may broadcast); the loss
    is ``outside(h)`` for the stacked states ``h`` ``[B, T, *S]``. Complex values are allowed.
    """
    dtype = torch.complex128 if (a.is_complex() or u.is_complex()) else torch.float64
    a = a.detach().to(dtype).expand(u.shape)
    u = u.detach().to(dtype)
    states, outs, recs = [], [], []
    prev = torch.zeros_like(u[:, 0]) if h0 is None else h0.detach().to(dtype)
    for t in range(u.shape[1]):
        h = a[:, t] * prev + u[:, t].clone().requires_grad_(True)
        h.retain_grad()
        out, rec = h.view_as(h), h.view_as(h)
        out.retain_grad()
        rec.retain_grad()
        states.append(h)
        outs.append(out)
        recs.append(rec)
        prev = rec
    loss = outside(torch.stack(outs, 1))
    if loss.is_complex():
        loss = loss.real
    loss.backward()

    def grads(xs: list[Tensor]) -> Tensor:
        g = [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]
        return torch.stack(g, 1).reshape(u.shape[0], u.shape[1], -1)

    return {"total": grads(states), "direct": grads(outs), "carried": grads(recs)}


def stats(vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The report's statistic: per-sample L2 norm over the state, mean over the batch, [T]."""
    return {k: v.abs().norm(dim=-1).mean(0) for k, v in vectors.items()}
