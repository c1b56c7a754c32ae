"""Step equations of PyTorch's recurrent cells: forward replay and hand-written backward.

One `Recurrence` replays one layer and one direction of a fused ``nn.RNN``/``nn.LSTM``/
``nn.GRU`` call on detached tensors. The forward pass recomputes the trajectory (and keeps
what the backward needs); the backward pass injects the gradients observed at the module's
outputs and walks the recurrence back step by step, exactly as autograd would through the
fused kernel, but without computing any parameter gradient.

Conventions (PyTorch's, row-vector batches):

* tensors are time-major: inputs ``[T, B, I]``, states ``[B, H]`` (``[B, P]`` for the
  projected LSTM output), ``valid`` is a ``[T, B, 1]`` boolean mask (``None`` = all valid);
* ``reverse=True`` processes ``t = T-1 .. 0``; with variable lengths an invalid step keeps
  the state unchanged, which reproduces the packed-sequence semantics in both directions;
* gate order: LSTM ``i, f, g, o``; GRU ``r, z, n`` with ``n = tanh(x_n + r * (W_hn h + b_hn))``.

All methods run under ``torch.no_grad()`` from the caller; nothing here touches parameters
or the random number generator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch._capture.probes import BLOCK, fused_logs, renormalise

__all__ = ["BackwardResult", "LayerWeights", "Recurrence", "make_recurrence"]


@dataclass(frozen=True)
class LayerWeights:
    """Weights of one layer and direction, detached, in the replay dtype."""

    w_ih: Tensor  # [G*H, I]
    w_hh: Tensor  # [G*H, P]
    b_ih: Tensor | None  # [G*H]
    b_hh: Tensor | None  # [G*H]
    w_hr: Tensor | None = None  # [P, H], LSTM with proj_size only


@dataclass
class BackwardResult:
    """Per-step gradients of one layer/direction, stacked in time order ``[T, B, *]``."""

    total_h: Tensor  # dL/dh_t, everything reaching h_t
    direct_h: Tensor  # the part injected from outside the recurrence
    carried_h: Tensor  # the h part arriving from the neighbouring step
    carried_c: Tensor | None  # LSTM: the c part arriving from the neighbouring step
    total_c: Tensor | None  # LSTM: dL/dc_t
    grad_input: Tensor | None  # dL/dx_t for the layer below, [T, B, I], when asked for
    # probes walked alongside (`gradwatch._capture.probes.fused_logs`): log norms [R, T, B]
    # and whether their range was safe (device bool); None without probes
    probe_logs: Tensor | None = None
    probe_ok: Tensor | None = None


# Below this many weight elements a plain ``torch.mm`` beats oneDNN's packed product on the
# CPU (measured: 4.6 vs 16 us at hidden 25, 49 vs 53 us at 128; packed wins from ~256).
PACKED_ABOVE = 2**17


def right_product(w: Tensor) -> Callable[[Tensor], Tensor]:
    """``x -> x @ w.t()`` for the per-step products of the replay (``x`` is 2-D).

    On the CPU in float32, for large weights, this goes through oneDNN with the weight packed
    once (PyTorch's own fused RNN kernels do the same), faster than ``torch.mm`` there; for
    small weights, elsewhere, or if that path is unavailable in this build, ``torch.mm``.
    """
    if (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.numel() >= PACKED_ABOVE
        and torch.backends.mkldnn.is_available()
    ):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 32)

            def packed_product(x: Tensor) -> Tensor:
                return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

            packed_product(w.new_zeros(1, w.shape[1]))  # probe once
            return packed_product
        except (RuntimeError, AttributeError):
            pass
    w_t = w.t()
    return lambda x: torch.mm(x, w_t)


def tanh(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``tanh``, on the CPU in float32 as ``2 * sigmoid(2x) - 1``.

    PyTorch's CPU float32 ``tanh`` is about 8x slower than ``sigmoid`` (it is not vectorised
    in current builds) and would be the largest single cost of the replay. The identity is
    exact; in float32 its absolute error stays below 2e-7 (vs 3e-8), well inside the
    replay's fidelity tolerance. Elsewhere (CUDA, float64) ``torch.tanh`` is used.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.tanh(x, out=out) if out is not None else torch.tanh(x)
    y = torch.mul(x, 2, out=out) if out is not None else x * 2
    return y.sigmoid_().mul_(2).sub_(1)


def _where(valid: Tensor | None, t: int, new: Tensor, old: Tensor) -> Tensor:
    return new if valid is None else torch.where(valid[t], new, old)


def _zero_invalid(valid: Tensor | None, t: int, x: Tensor) -> Tensor:
    return x if valid is None else x * valid[t]


class Recurrence:
    """Forward trajectory and backward walk of one layer and direction."""

    gates: int = 1
    has_cell: bool = False
    #: the recorded per-sample tensors `step_back` reads (time first, then the batch)
    per_sample: tuple[str, ...] = ()

    def __init__(self, weights: LayerWeights, reverse: bool) -> None:
        self.w = weights
        self.reverse = reverse
        self._packed: dict[str, Callable[[Tensor], Tensor]] = {}
        self.hidden_size = weights.w_hh.shape[0] // self.gates
        self.steps = 0

    # -- helpers ---------------------------------------------------------------------------
    def _from_state(self, h: Tensor) -> Tensor:
        """``h @ W_hh^T`` (weights packed on first use)."""
        if "from" not in self._packed:
            self._packed["from"] = right_product(self.w.w_hh)
        return self._packed["from"](h)

    def _to_state(self, d_a: Tensor) -> Tensor:
        """``d_a @ W_hh``, for ``[..., G*H]`` (probe slices lead the batch in the walk)."""
        if "to" not in self._packed:
            self._packed["to"] = right_product(self.w.w_hh.t())
        if d_a.dim() == 2:
            return self._packed["to"](d_a)
        flat = self._packed["to"](d_a.reshape(-1, d_a.shape[-1]))
        return flat.view(*d_a.shape[:-1], flat.shape[-1])

    def _to_state_into(self) -> Callable[[Tensor, Tensor], None]:
        """``(d_a, out) -> out = d_a @ W_hh`` for 2-D rows: ``torch.mm`` writing in place
        where it is the faster product, else the packed product and a copy."""
        w = self.w.w_hh
        if w.dtype == torch.float32 and w.device.type == "cpu" and w.numel() >= PACKED_ABOVE:
            return lambda d_a, out: out.copy_(self._to_state(d_a))
        return lambda d_a, out: torch.mm(d_a, w, out=out)

    def samples(self, select: slice) -> Recurrence | None:
        """The same recurrence over the samples ``select`` of the batch only (views, no
        copies), for walking probes on a few samples; ``None`` where it cannot."""
        if not self.per_sample or getattr(self, "_spent", False):
            return None
        view = copy.copy(self)
        for name in self.per_sample:
            v = getattr(self, name, None)
            if isinstance(v, Tensor):
                setattr(view, name, v[:, select])
            elif isinstance(v, list):  # per-step tensors [B, ...]
                setattr(view, name, [x[select] for x in v])
        return view

    def order(self, steps: int) -> range:
        """Time indices in the order the forward pass visits them."""
        return range(steps - 1, -1, -1) if self.reverse else range(steps)

    def project_inputs(self, x: Tensor, fold_hh_bias: bool = True) -> Tensor:
        """All input projections at once: one large matrix product instead of T small ones."""
        bias = self.w.b_ih
        if fold_hh_bias and self.w.b_hh is not None:
            bias = self.w.b_hh if bias is None else bias + self.w.b_hh
        flat = x.reshape(-1, x.shape[-1])
        w_t = self.w.w_ih.t()
        xp = torch.mm(flat, w_t) if bias is None else torch.addmm(bias, flat, w_t)
        return xp.view(*x.shape[:-1], xp.shape[-1])  # explicit: the batch may be empty

    def drop_trajectory(self) -> None:
        """Release the recorded trajectory (keep the weights): see `gradwatch._capture.
        layered.LazyRecurrence`."""
        for name, value in list(vars(self).items()):
            if name.startswith("_") and name != "_packed" and isinstance(value, Tensor | list):
                setattr(self, name, None)

    # -- what the diagnostics read (the `gradwatch._capture.raw.Walkable` protocol) ---------
    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Widths of the state parts: ``(P,)``, or ``(P, H)`` with the LSTM cell state."""
        out = self.w.w_hh.shape[1]
        return (out, self.hidden_size) if self.has_cell else (out,)

    @property
    def gated(self) -> bool:
        return self.gates > 1

    @property
    def weight(self) -> Tensor:
        return self.w.w_hh

    def recurrent_matrix(self) -> Tensor:
        """The map from the previous output to the pre-activations (``W_hh``, or
        ``W_hh @ W_hr`` for an LSTM with projections)."""
        w = self.w.w_hh
        return w if self.w.w_hr is None else w @ self.w.w_hr

    def candidate_block(self) -> Tensor:
        """The square block of `recurrent_matrix` feeding the state nonlinearity."""
        return self.recurrent_matrix()

    def forget_bias(self) -> Tensor | None:
        """LSTM: mean effective forget-gate bias ``b_if + b_hf``; ``None`` otherwise."""
        return None

    def trajectory(self, steps: Tensor) -> dict[str, Tensor]:
        """Values along the replayed trajectory at the given timesteps, ``[S, B, H]`` each:
        ``derivative`` of the state nonlinearity, gate values by name, and a ``relu`` key
        when the nonlinearity is a ReLU."""
        raise NotImplementedError

    def from_states(self, x: Tensor, h_prev: Tensor, c_prev: Tensor | None) -> Tensor:
        """Set up the trajectory from recorded steps, as a cell loop leaves them: the inputs
        ``x`` and the states each step started from (``[T, B, *]``), every step computed
        from its real previous state at once. Returns the recomputed outputs ``[T, B, P]``
        (to check them against the recorded ones)."""
        raise NotImplementedError

    def _pre_activations(self, x: Tensor, h_prev: Tensor, fold_hh_bias: bool = True) -> Tensor:
        """``x W_ih^T + h_prev W_hh^T + b`` for all steps: two large matrix products."""
        pre = self.project_inputs(x, fold_hh_bias)
        pre.view(-1, pre.shape[-1]).addmm_(h_prev.reshape(-1, h_prev.shape[-1]), self.w.w_hh.t())
        return pre

    # -- interface -----------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor | None,
        valid: Tensor | None,
        known_out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Replay the layer. Returns (outputs [T, B, P] zero where invalid, h_n, c_n).

        ``known_out`` are the layer's real outputs when they are visible (the top layer of a
        call): a recurrence may then compute every step from the real previous state at
        once instead of one step after the other.
        """
        raise NotImplementedError

    def step_back(
        self, t: int, dh: Tensor, dc: Tensor | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Back through the step that produced h_t.

        ``dh`` is the total gradient at h_t, ``dc`` (LSTM) the gradient at c_t from outside
        the step (carried from the next step, plus the final-state gradient). Returns
        ``(d_xp, dh_prev, dc_prev, dc_total)``: the gradient at the input projection of step t,
        at the previous state, and (LSTM) the total gradient at c_t.
        """
        raise NotImplementedError

    def backward(
        self,
        direct: Tensor,
        dh_n: Tensor | None,
        dc_n: Tensor | None,
        last: Tensor,
        valid: Tensor | None,
        input_grad: bool = True,
        probes: list[Tensor] | None = None,
    ) -> BackwardResult:
        """Walk the recurrence back with ``direct`` [T, B, P] injected at the outputs.

        ``last`` [T, B, 1] marks each sequence's final step in processing order, where the
        final-state gradients ``dh_n`` / ``dc_n`` enter. ``input_grad`` asks for dL/dx (one
        large matrix product), needed to feed the layer below. ``probes`` (`gradwatch.
        _capture.probes.unit_probes`, ``[R, B, n]`` per state part) are walked alongside as
        extra batch slices, entering where ``last`` marks: no extra operation per step.
        """
        steps, batch = direct.shape[0], direct.shape[1]
        if dh_n is not None:
            direct = direct + last * dh_n
        lead: tuple[int, ...] = (batch,)
        dc_start = dc_n
        if probes is not None:  # slices: [0] the data, [1:] the probe rounds
            direct = _with_probe_slices(direct, last.unsqueeze(1) * probes[0])
            lead = (direct.shape[1], batch)
            if self.has_cell:
                data_c = dc_n if dc_n is not None else probes[1].new_zeros(probes[1].shape[1:])
                dc_start = torch.cat([data_c.unsqueeze(0), probes[1]])
        carry_h = direct.new_zeros(*lead, direct.shape[-1])
        carry_c = direct.new_zeros(*lead, self.hidden_size) if self.has_cell else None
        total_h, carried_h, carried_c, total_c, state_c = [], [], [], [], []
        d_xp: list[Tensor] = [direct.new_empty(0)] * steps
        log_scale = None
        if probes is not None:
            log_scale = direct.new_zeros(steps, *probes[0].shape[:2], dtype=torch.float64)
        for n, t in enumerate(reversed(self.order(steps))):
            carry_h = _zero_invalid(valid, t, carry_h)
            dh = direct[t] + carry_h
            total_h.append(dh)
            carried_h.append(carry_h)
            dc_in = None
            if carry_c is not None:
                carry_c = _zero_invalid(valid, t, carry_c)
                carried_c.append(carry_c)
                dc_in = carry_c if dc_start is None else carry_c + last[t] * dc_start
                state_c.append(dc_in)
            d_xp[t], carry_h, carry_c, dc_total = self.step_back(t, dh, dc_in, valid)
            if dc_total is not None:
                total_c.append(dc_total)
            if log_scale is not None and (n + 1) % BLOCK == 0 and n + 1 < steps:
                parts = [carry_h[1:]] if carry_c is None else [carry_h[1:], carry_c[1:]]
                renormalise(parts, log_scale[n + 1])
        time_order = slice(None) if self.reverse else slice(None, None, -1)

        def stack(items: list[Tensor]) -> Tensor:
            return torch.stack(items[time_order])

        stacked = [stack(total_h), stack(carried_h)]
        cells = [stack(carried_c), stack(total_c)] if self.has_cell else [None, None]
        result = BackwardResult(
            total_h=stacked[0],
            direct_h=direct,
            carried_h=stacked[1],
            carried_c=cells[0],
            total_c=cells[1],
            grad_input=None,
        )
        if log_scale is not None:
            parts = [stacked[0][:, 1:]]
            if self.has_cell:
                parts.append(stack(state_c)[:, 1:])
            mask = None if valid is None else valid[..., 0]
            starts = last[..., 0] > 0
            result.probe_logs, result.probe_ok = fused_logs(
                parts, log_scale, self.reverse, mask, starts
            )
            result = _data_slice(result)
        if input_grad:
            d_x = torch.stack(d_xp)
            result.grad_input = torch.matmul(d_x if probes is None else d_x[:, 0], self.w.w_ih)
        return result


def _with_probe_slices(direct: Tensor, probe_h: Tensor) -> Tensor:
    """``[T, 1 + R, B, P]``: the data's injected gradient, then each probe round's."""
    return torch.cat([direct.unsqueeze(1), probe_h], dim=1)


def _data_slice(res: BackwardResult) -> BackwardResult:
    """The data slice ``[:, 0]`` of a walk that carried probe slices alongside."""

    def first(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[:, 0]

    return BackwardResult(
        total_h=res.total_h[:, 0],
        direct_h=res.direct_h[:, 0],
        carried_h=res.carried_h[:, 0],
        carried_c=first(res.carried_c),
        total_c=first(res.total_c),
        grad_input=res.grad_input,
        probe_logs=res.probe_logs,
        probe_ok=res.probe_ok,
    )


class SimpleRecurrence(Recurrence):
    """``nn.RNN``: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu."""

    per_sample = ("_h",)

    def __init__(self, weights: LayerWeights, reverse: bool, nonlinearity: str) -> None:
        super().__init__(weights, reverse)
        self.relu = nonlinearity == "relu"

    def forward(self, x, h0, c0, valid, known_out=None):
        xp = self.project_inputs(x)
        self.steps = x.shape[0]
        act = torch.relu if self.relu else tanh
        outs: list[Tensor] = [xp.new_empty(0)] * self.steps
        h = h0
        for t in self.order(self.steps):
            h = _where(valid, t, act(self._from_state(h).add_(xp[t])), h)
            outs[t] = h
        self._h = torch.stack(outs)
        out = self._h if valid is None else self._h * valid
        return out, h, None

    def step_back(self, t, dh, dc, valid):
        h = self._h[t]
        da = dh * (h > 0) if self.relu else dh * (1 - h * h)
        da = _zero_invalid(valid, t, da)
        return da, self._to_state(da), None, None

    def from_states(self, x, h_prev, c_prev):
        self.steps = x.shape[0]
        pre = self._pre_activations(x, h_prev)
        self._h = torch.relu(pre) if self.relu else tanh(pre, out=pre)
        return self._h

    def trajectory(self, steps):
        h = self._h[steps]
        if self.relu:
            return {"derivative": (h > 0).to(h.dtype), "relu": h}
        return {"derivative": 1 - h * h}


class GRURecurrence(Recurrence):
    """``nn.GRU``: h' = (1 - z) * n + z * h."""

    gates = 3
    per_sample = ("_acts", "_hn", "_h_prev")

    def forward(self, x, h0, c0, valid, known_out=None):
        xp = self.project_inputs(x, fold_hh_bias=False)
        self.steps = x.shape[0]
        H = self.hidden_size
        empty = xp.new_empty(0)
        acts, hn, h_prev, outs = ([empty] * self.steps for _ in range(4))
        h = h0
        for t in self.order(self.steps):
            gh = self._from_state(h)
            if self.w.b_hh is not None:
                gh = gh + self.w.b_hh
            rz = torch.sigmoid(xp[t, :, : 2 * H] + gh[:, : 2 * H])
            r, z = rz[:, :H], rz[:, H:]
            n = tanh(xp[t, :, 2 * H :] + r * gh[:, 2 * H :])
            h_new = n + z * (h - n)
            acts[t] = torch.cat([rz, n], dim=1)
            hn[t], h_prev[t] = gh[:, 2 * H :], h
            h = _where(valid, t, h_new, h)
            outs[t] = h
        self._acts, self._hn, self._h_prev = torch.stack(acts), torch.stack(hn), h_prev
        out = torch.stack(outs)
        if valid is not None:
            out = out * valid
        return out, h, None

    def step_back(self, t, dh, dc, valid):
        H = self.hidden_size
        a = self._acts[t]
        r, z, n = a[:, :H], a[:, H : 2 * H], a[:, 2 * H :]
        dan = dh * (1 - z) * (1 - n * n)
        dar = dan * self._hn[t] * r * (1 - r)
        daz = dh * (self._h_prev[t] - n) * z * (1 - z)
        d_x = _zero_invalid(valid, t, torch.cat([dar, daz, dan], dim=-1))
        d_h = _zero_invalid(valid, t, torch.cat([dar, daz, dan * r], dim=-1))
        dh_prev = self._to_state(d_h) + _zero_invalid(valid, t, dh * z)
        return d_x, dh_prev, None, None

    def from_states(self, x, h_prev, c_prev):
        H = self.hidden_size
        self.steps = x.shape[0]
        xp = self.project_inputs(x, fold_hh_bias=False)
        gh = torch.matmul(h_prev, self.w.w_hh.t())
        if self.w.b_hh is not None:
            gh = gh + self.w.b_hh
        rz = torch.sigmoid(xp[..., : 2 * H] + gh[..., : 2 * H])
        n = tanh(xp[..., 2 * H :] + rz[..., :H] * gh[..., 2 * H :])
        self._acts, self._hn, self._h_prev = torch.cat([rz, n], -1), gh[..., 2 * H :], h_prev
        z = rz[..., H:]
        return n + z * (h_prev - n)

    def candidate_block(self):
        H = self.hidden_size
        return self.w.w_hh[2 * H :]

    def trajectory(self, steps):
        H = self.hidden_size
        a = self._acts[steps]
        n = a[..., 2 * H :]
        return {"derivative": 1 - n * n, "update": a[..., H : 2 * H], "reset": a[..., :H]}


def make_recurrence(mode: str, weights: LayerWeights, reverse: bool) -> Recurrence:
    """The recurrence for an ``nn.RNNBase.mode`` (``LSTM``, ``GRU``, ``RNN_TANH``, ``RNN_RELU``)."""
    if mode == "LSTM":
        from gradwatch._capture.lstm import LSTMRecurrence  # it builds on this module

        return LSTMRecurrence(weights, reverse)
    if mode == "GRU":
        return GRURecurrence(weights, reverse)
    if mode in ("RNN_TANH", "RNN_RELU"):
        return SimpleRecurrence(weights, reverse, "relu" if mode == "RNN_RELU" else "tanh")
    raise ValueError(f"unsupported recurrent mode {mode!r}")
