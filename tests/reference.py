"""Independent autograd reference for per-timestep hidden-state gradients.

The fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (and the ``*Cell`` modules) are
re-implemented step by step from the module's own parameters. Every hidden state
``h_t`` is consumed through two identity views, one feeding the next step
("recurrence") and one feeding everything else (the layer output and the final
state ``h_n``), so after ``backward`` the gradient of each part can be read
separately, without subtraction:

* ``total``   -- grad of ``h_t`` itself (everything reaching it);
* ``direct``  -- grad of the "outside" view;
* ``carried`` -- grad of the recurrence view (and, for LSTM, of the recurrence
  view of ``c_t``; combined as ``sqrt(|dh|^2 + |dc|^2)`` per sample);
* ``cell_total`` (LSTM) -- grad of ``c_t`` itself.

Variable lengths are handled by unrolling every sample separately over its own
length, which gives PackedSequence semantics without any masking in the graph.

The statistic reported per (layer, direction, t) is the L2 norm over hidden
units per sample, averaged over the samples valid at ``t`` (``t < len_b``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = [
    "CellReference",
    "RefResult",
    "cell_step",
    "reference_unroll",
]


def _tap(t: torch.Tensor) -> torch.Tensor:
    """Identity view of ``t`` whose gradient is retained (if it can have one)."""
    v = t.view_as(t)
    if v.requires_grad:
        v.retain_grad()
    return v


def _keep(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t.retain_grad()
    return t


def _grad(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.grad is None:
        return torch.zeros_like(t)
    return t.grad


def _kind(module: nn.Module) -> str:
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "LSTM"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "GRU"
    if isinstance(module, nn.RNN):
        return "RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"
    if isinstance(module, nn.RNNCell):
        return "RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"
    raise TypeError(f"unsupported module {type(module).__name__}")


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ w.t()
    if b is not None:
        y = y + b
    return y


def cell_step(kind, params, x, h, c=None):
    """One step of a recurrence, written out by hand.

    ``params`` = (w_ih, w_hh, b_ih, b_hh, w_hr); biases / w_hr may be None.
    Returns ``h_new`` (and ``c_new`` for LSTM) as plain tensors.
    """
    w_ih, w_hh, b_ih, b_hh, w_hr = params
    gi = _linear(x, w_ih, b_ih)
    gh = _linear(h, w_hh, b_hh)
    if kind == "RNN_TANH":
        return torch.tanh(gi + gh), None
    if kind == "RNN_RELU":
        return torch.relu(gi + gh), None
    if kind == "GRU":
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    if kind == "LSTM":
        g_all = gi + gh
        i, f, g, o = g_all.chunk(4, dim=-1)
        i = torch.sigmoid(i)
        f = torch.sigmoid(f)
        g = torch.tanh(g)
        o = torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        return h_new, c_new
    raise ValueError(kind)


def _layer_params(module: nn.Module, layer: int, direction: int):
    sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")

    def get(name):
        return getattr(module, name + sfx, None)

    bias = module.bias
    w_hr = get("weight_hr") if getattr(module, "proj_size", 0) > 0 else None
    return (
        get("weight_ih"),
        get("weight_hh"),
        get("bias_ih") if bias else None,
        get("bias_hh") if bias else None,
        w_hr,
    )


@dataclass
class _Step:
    """Taps for one (layer, direction, t, sample)."""

    h: torch.Tensor  # raw h_t          -> total
    h_out: torch.Tensor  # outside view -> direct
    h_rec: torch.Tensor  # recurrence view -> carried
    c: torch.Tensor | None = None  # raw c_t -> cell_total
    c_rec: torch.Tensor | None = None  # recurrence view of c_t


def _norm_rows(v: torch.Tensor) -> torch.Tensor:
    return v.detach().double().reshape(v.shape[0], -1).norm(dim=1)


@dataclass
class RefResult:
    """Reference outputs plus the taps needed to read gradients after backward."""

    output: torch.Tensor
    h_n: torch.Tensor
    c_n: torch.Tensor | None
    num_layers: int
    num_directions: int
    steps: int
    lengths: list[int]
    is_lstm: bool
    hidden_size: int
    out_size: int
    # taps[layer][direction][b][t] -> _Step (only t < lengths[b])
    taps: list = field(repr=False, default_factory=list)

    # -- per-sample gradient vectors -------------------------------------------------
    def vectors(self) -> dict[str, torch.Tensor]:
        """Per-sample gradient vectors, shape [L, D, T, B, H] (zeros where invalid).

        Keys: ``total``, ``direct``, ``carried_h`` and for LSTM ``carried_c``,
        ``cell_total``.
        """
        L, D, T, B = self.num_layers, self.num_directions, self.steps, len(self.lengths)
        dt = self.output.dtype
        out = {
            "total": torch.zeros(L, D, T, B, self.out_size, dtype=dt),
            "direct": torch.zeros(L, D, T, B, self.out_size, dtype=dt),
            "carried_h": torch.zeros(L, D, T, B, self.out_size, dtype=dt),
        }
        if self.is_lstm:
            out["carried_c"] = torch.zeros(L, D, T, B, self.hidden_size, dtype=dt)
            out["cell_total"] = torch.zeros(L, D, T, B, self.hidden_size, dtype=dt)
        for k in range(L):
            for d in range(D):
                for b in range(B):
                    for t, s in enumerate(self.taps[k][d][b]):
                        out["total"][k, d, t, b] = _grad(s.h).detach().reshape(-1)
                        out["direct"][k, d, t, b] = _grad(s.h_out).detach().reshape(-1)
                        out["carried_h"][k, d, t, b] = _grad(s.h_rec).detach().reshape(-1)
                        if self.is_lstm:
                            out["carried_c"][k, d, t, b] = _grad(s.c_rec).detach().reshape(-1)
                            out["cell_total"][k, d, t, b] = _grad(s.c).detach().reshape(-1)
        return out

    def valid_mask(self) -> torch.Tensor:
        """[T, B] bool: sample b is valid at t."""
        lens = torch.tensor(self.lengths)
        return torch.arange(self.steps)[:, None] < lens[None, :]

    # -- the statistics ------------------------------------------------------------
    def stats(self) -> dict[str, torch.Tensor | None]:
        """``total``, ``direct``, ``carried``, ``cell_total`` as float32 [L, D, T]."""
        v = self.vectors()
        mask = self.valid_mask().double()  # [T, B]
        count = mask.sum(dim=1).clamp(min=1)  # [T]

        def stat(norms):  # norms: [L, D, T, B]
            return ((norms * mask).sum(dim=-1) / count).float()

        def norms(x):
            return x.double().norm(dim=-1)

        res = {
            "total": stat(norms(v["total"])),
            "direct": stat(norms(v["direct"])),
        }
        carried = norms(v["carried_h"]) ** 2
        if self.is_lstm:
            carried = carried + norms(v["carried_c"]) ** 2
            res["cell_total"] = stat(norms(v["cell_total"]))
        else:
            res["cell_total"] = None
        res["carried"] = stat(carried.sqrt())
        return res


def reference_unroll(module: nn.Module, x, lengths=None, hx=None) -> RefResult:
    """Unroll a fused ``nn.RNN``/``nn.LSTM``/``nn.GRU`` with autograd taps.

    ``x``: padded input ``[T, B, I]`` (``[B, T, I]`` if ``module.batch_first``),
    unbatched ``[T, I]``, or a ``PackedSequence`` (unpacked here). ``lengths``:
    per-sample lengths (defaults to ``T`` for all). ``hx``: ``h0`` or ``(h0, c0)``
    shaped like PyTorch's. Returns a :class:`RefResult` whose ``output`` has the
    module's padded layout with ``T = x``'s time dimension (zeros at ``t >= len_b``).
    """
    kind = _kind(module)
    is_lstm = kind == "LSTM"
    bf = module.batch_first
    if isinstance(x, PackedSequence):
        x, lens_t = pad_packed_sequence(x, batch_first=bf)
        if lengths is None:
            lengths = lens_t
    unbatched = x.dim() == 2
    if unbatched:
        if lengths is not None:
            raise ValueError("lengths make no sense for unbatched input")
        xs = x.unsqueeze(1)  # [T, 1, I]
    else:
        xs = x.transpose(0, 1) if bf else x  # [T, B, I]
    T, B = xs.shape[0], xs.shape[1]
    if lengths is None:
        lengths = [T] * B
    lengths = [int(v) for v in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if len(lengths) != B or min(lengths) < 1 or max(lengths) > T:
        raise ValueError(f"bad lengths {lengths} for T={T}, B={B}")

    L = module.num_layers
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    P = module.proj_size if is_lstm and module.proj_size > 0 else H

    h0 = c0 = None
    if hx is not None:
        if is_lstm:
            h0, c0 = hx
        else:
            h0 = hx
        if unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
    dtype, device = xs.dtype, xs.device

    taps = [[[[] for _ in range(B)] for _ in range(D)] for _ in range(L)]
    final_h = [[None] * B for _ in range(L * D)]
    final_c = [[None] * B for _ in range(L * D)]
    # layer input per sample: list over t of [1, features]
    layer_in = [[xs[t, b : b + 1] for t in range(lengths[b])] for b in range(B)]
    for k in range(L):
        next_in = [[None] * lengths[b] for b in range(B)]
        outs = [[[None] * lengths[b] for b in range(B)] for _ in range(D)]
        for d in range(D):
            params = _layer_params(module, k, d)
            idx = k * D + d
            for b in range(B):
                n = lengths[b]
                h = (
                    h0[idx, b : b + 1]
                    if h0 is not None
                    else torch.zeros(1, P, dtype=dtype, device=device)
                )
                c = None
                if is_lstm:
                    c = (
                        c0[idx, b : b + 1]
                        if c0 is not None
                        else torch.zeros(1, H, dtype=dtype, device=device)
                    )
                order = range(n) if d == 0 else range(n - 1, -1, -1)
                step_taps = [None] * n
                for t in order:
                    h_raw, c_raw = cell_step(kind, params, layer_in[b][t], h, c)
                    _keep(h_raw)
                    h_out = _tap(h_raw)
                    h_rec = _tap(h_raw)
                    c_rec = None
                    if is_lstm:
                        _keep(c_raw)
                        c_rec = _tap(c_raw)
                    step_taps[t] = _Step(h=h_raw, h_out=h_out, h_rec=h_rec, c=c_raw, c_rec=c_rec)
                    outs[d][b][t] = h_out
                    h, c = h_rec, c_rec
                taps[k][d][b] = step_taps
                last = step_taps[n - 1] if d == 0 else step_taps[0]
                final_h[idx][b] = last.h_out
                final_c[idx][b] = last.c
        for b in range(B):
            for t in range(lengths[b]):
                next_in[b][t] = torch.cat([outs[d][b][t] for d in range(D)], dim=-1)
        layer_in = next_in

    # assemble the padded output
    per_sample = []
    for b in range(B):
        seq = torch.cat(layer_in[b], dim=0)  # [len_b, D*P]
        if lengths[b] < T:
            pad = torch.zeros(T - lengths[b], D * P, dtype=seq.dtype, device=seq.device)
            seq = torch.cat([seq, pad], dim=0)
        per_sample.append(seq)
    output = torch.stack(per_sample, dim=1)  # [T, B, D*P]
    h_n = torch.stack([torch.cat(final_h[i], dim=0) for i in range(L * D)], dim=0)
    c_n = (
        torch.stack([torch.cat(final_c[i], dim=0) for i in range(L * D)], dim=0)
        if is_lstm
        else None
    )
    if unbatched:
        output = output.squeeze(1)
        h_n = h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    elif bf:
        output = output.transpose(0, 1)
    return RefResult(
        output=output,
        h_n=h_n,
        c_n=c_n,
        num_layers=L,
        num_directions=D,
        steps=T,
        lengths=lengths,
        is_lstm=is_lstm,
        hidden_size=H,
        out_size=P,
        taps=taps,
    )


class CellReference:
    """Reference for a user loop over ``nn.RNNCell``/``nn.LSTMCell``/``nn.GRUCell``.

    Use it in place of the cell in the loop, feeding back what it returned::

        ref = CellReference(cell)
        state = hx                       # None, h0, or (h0, c0)
        for t in range(T):
            state = ref(x[t], state)     # h, or (h, c) for LSTM

    The state handed back must be exactly what the previous call returned (or the
    initial state on the first call); that consumption is the recurrence. The
    returned ``h`` is the "outside" view; for LSTM the returned ``c`` is the raw
    ``c_t`` (its outside use counts in ``cell_total`` only, as ``c_n`` does for
    the fused LSTM). Statistics have shape ``[1, 1, T]``, T = number of calls.
    """

    def __init__(self, cell: nn.Module):
        self.cell = cell
        self.kind = _kind(cell)
        self.is_lstm = self.kind == "LSTM"
        self.params = (
            cell.weight_ih,
            cell.weight_hh,
            cell.bias_ih if cell.bias else None,
            cell.bias_hh if cell.bias else None,
            None,
        )
        self.taps: list[_Step] = []
        self._returned = None  # what the previous call handed out
        self._rec = None  # the matching recurrence views

    def __call__(self, x, state=None):
        unbatched = x.dim() == 1
        if unbatched:
            x = x.unsqueeze(0)
        B = x.shape[0]
        H = self.cell.hidden_size
        if self._is_previous(state):
            h, c = self._rec
        else:
            if self.taps:
                raise ValueError("state must be the previous call's return value")
            if state is None:
                h = torch.zeros(B, H, dtype=x.dtype, device=x.device)
                c = torch.zeros(B, H, dtype=x.dtype, device=x.device) if self.is_lstm else None
            elif self.is_lstm:
                h, c = state
            else:
                h, c = state, None
            if unbatched and state is not None:
                h = h.unsqueeze(0)
                c = c.unsqueeze(0) if c is not None else None
        h_raw, c_raw = cell_step(self.kind, self.params, x, h, c)
        _keep(h_raw)
        h_out = _tap(h_raw)
        h_rec = _tap(h_raw)
        c_rec = None
        if self.is_lstm:
            _keep(c_raw)
            c_rec = _tap(c_raw)
        self.taps.append(_Step(h=h_raw, h_out=h_out, h_rec=h_rec, c=c_raw, c_rec=c_rec))
        self._rec = (h_rec, c_rec)
        if unbatched:
            h_ret = h_out.squeeze(0)
            c_ret = c_raw.squeeze(0) if c_raw is not None else None
        else:
            h_ret, c_ret = h_out, c_raw
        ret = (h_ret, c_ret) if self.is_lstm else h_ret
        self._returned = ret
        return ret

    def _is_previous(self, state) -> bool:
        prev = self._returned
        if state is None or prev is None:
            return False
        if self.is_lstm:
            return state[0] is prev[0] and state[1] is prev[1]
        return state is prev

    def stats(self) -> dict[str, torch.Tensor | None]:
        """``total``, ``direct``, ``carried``, ``cell_total`` as float32 [1, 1, T]."""

        def stat(per_step):
            return torch.stack(per_step).mean(dim=1).float().reshape(1, 1, -1)

        total, direct, carried, cell = [], [], [], []
        for s in self.taps:
            total.append(_norm_rows(_grad(s.h)))
            direct.append(_norm_rows(_grad(s.h_out)))
            sq = _norm_rows(_grad(s.h_rec)) ** 2
            if self.is_lstm:
                sq = sq + _norm_rows(_grad(s.c_rec)) ** 2
                cell.append(_norm_rows(_grad(s.c)))
            carried.append(sq.sqrt())
        return {
            "total": stat(total),
            "direct": stat(direct),
            "carried": stat(carried),
            "cell_total": stat(cell) if self.is_lstm else None,
        }
