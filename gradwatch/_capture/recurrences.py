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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

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


def right_product(w: Tensor) -> Callable[[Tensor], Tensor]:
    """``x -> x @ w.t()`` for the small per-step products of the replay.

    On the CPU in float32 this goes through oneDNN with the weight packed once, about twice
    as fast as ``torch.mm`` for these shapes (PyTorch's own fused RNN kernels do the same);
    elsewhere, or if that path is unavailable in this build, it falls back to ``torch.mm``.
    """
    if w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
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
        """``d_a @ W_hh``."""
        if "to" not in self._packed:
            self._packed["to"] = right_product(self.w.w_hh.t())
        return self._packed["to"](d_a)

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
        return xp.view(*x.shape[:-1], -1)

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
    ) -> BackwardResult:
        """Walk the recurrence back with ``direct`` [T, B, P] injected at the outputs.

        ``last`` [T, B, 1] marks each sequence's final step in processing order, where the
        final-state gradients ``dh_n`` / ``dc_n`` enter. ``input_grad`` asks for dL/dx (one
        large matrix product), needed to feed the layer below.
        """
        steps, batch = direct.shape[0], direct.shape[1]
        if dh_n is not None:
            direct = direct + last * dh_n
        carry_h = direct.new_zeros(batch, direct.shape[2])
        carry_c = direct.new_zeros(batch, self.hidden_size) if self.has_cell else None
        total_h, carried_h, carried_c, total_c = [], [], [], []
        d_xp: list[Tensor] = [direct.new_empty(0)] * steps
        for t in reversed(self.order(steps)):
            carry_h = _zero_invalid(valid, t, carry_h)
            dh = direct[t] + carry_h
            total_h.append(dh)
            carried_h.append(carry_h)
            dc_in = None
            if carry_c is not None:
                carry_c = _zero_invalid(valid, t, carry_c)
                carried_c.append(carry_c)
                dc_in = carry_c if dc_n is None else carry_c + last[t] * dc_n
            d_xp[t], carry_h, carry_c, dc_total = self.step_back(t, dh, dc_in, valid)
            if dc_total is not None:
                total_c.append(dc_total)
        time_order = slice(None) if self.reverse else slice(None, None, -1)

        def stack(items: list[Tensor]) -> Tensor:
            return torch.stack(items[time_order])

        grad_input = torch.matmul(torch.stack(d_xp), self.w.w_ih) if input_grad else None
        return BackwardResult(
            total_h=stack(total_h),
            direct_h=direct,
            carried_h=stack(carried_h),
            carried_c=stack(carried_c) if self.has_cell else None,
            total_c=stack(total_c) if self.has_cell else None,
            grad_input=grad_input,
        )


class SimpleRecurrence(Recurrence):
    """``nn.RNN``: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu."""

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


class LSTMRecurrence(Recurrence):
    """``nn.LSTM``: c' = f*c + i*g, h' = o*tanh(c') (times W_hr with ``proj_size``).

    Gate rows are reordered once from PyTorch's (i, f, g, o) to (o, i, f, g): the sigmoid
    gates are then one contiguous block in the forward pass, and the gates driven by dc one
    contiguous block in the backward pass. Per-step backward coefficients are computed for
    all steps at once after the forward pass, leaving few small operations per step.
    """

    gates = 4
    has_cell = True

    def __init__(self, weights: LayerWeights, reverse: bool) -> None:
        H = weights.w_hh.shape[0] // 4
        perm = torch.cat([torch.arange(3 * H, 4 * H), torch.arange(0, 3 * H)])

        def rows(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[perm]

        w = weights
        super().__init__(
            LayerWeights(rows(w.w_ih), rows(w.w_hh), rows(w.b_ih), rows(w.b_hh), w.w_hr), reverse
        )

    def forward(self, x, h0, c0, valid, known_out=None):
        if known_out is not None and valid is None and self.w.w_hr is None:
            return self._forward_known(x, h0, c0, known_out)
        xp = self.project_inputs(x)
        T, B, H = x.shape[0], x.shape[1], self.hidden_size
        self.steps = T
        w_hr_t = None if self.w.w_hr is None else self.w.w_hr.t()
        acts = xp.new_empty(T, B, 4 * H)  # o, i, f (sigmoid) and g (tanh)
        tanh_c, cells = xp.new_empty(T, B, H), xp.new_empty(T, B, H)
        outs = xp.new_empty(T, B, h0.shape[-1])
        h, c = h0, c0
        xp_t, acts_t, cells_t, tanh_c_t, outs_t = (
            z.unbind() for z in (xp, acts, cells, tanh_c, outs)
        )
        for t in self.order(T):
            a = self._from_state(h).add_(xp_t[t])
            at = acts_t[t]
            torch.sigmoid(a[:, : 3 * H], out=at[:, : 3 * H])
            tanh(a[:, 3 * H :], out=at[:, 3 * H :])
            o, i, f, g = at[:, :H], at[:, H : 2 * H], at[:, 2 * H : 3 * H], at[:, 3 * H :]
            if valid is None:  # write straight into the trajectory buffers
                c = torch.addcmul(f * c, i, g, out=cells_t[t])
                tanh(c, out=tanh_c_t[t])
                if w_hr_t is None:
                    h = torch.mul(o, tanh_c_t[t], out=outs_t[t])
                else:
                    h = torch.mm(o * tanh_c_t[t], w_hr_t, out=outs_t[t])
                continue
            c_new = torch.addcmul(f * c, i, g)
            tanh(c_new, out=tanh_c[t])
            h_new = o * tanh_c[t]
            if w_hr_t is not None:
                h_new = torch.mm(h_new, w_hr_t)
            h, c = _where(valid, t, h_new, h), _where(valid, t, c_new, c)
            outs[t], cells[t] = h, c
        self._coefficients(acts, cells, tanh_c, c0)
        out = outs if valid is None else outs * valid
        return out, h, c

    def _coefficients(
        self, acts: Tensor, cells: Tensor, tanh_c: Tensor, c0: Tensor, c_prev: Tensor | None = None
    ) -> None:
        """Per-step backward coefficients for all steps at once (few whole-sequence passes:
        these are memory-bound, and the replay is cheap only if they stay few)."""
        H = self.hidden_size
        o, i, f, g = (
            acts[..., :H],
            acts[..., H : 2 * H],
            acts[..., 2 * H : 3 * H],
            acts[..., 3 * H :],
        )
        self._acts, self._f = acts, f
        one = acts.new_ones(())
        self._k_c = torch.addcmul(one, tanh_c, tanh_c, value=-1).mul_(o)  # dc += dm * k_c
        k_o = tanh_c * o
        self._k_o = torch.addcmul(k_o, k_o, o, value=-1)  # d(pre-activation of o) = dm * k_o
        k = acts.new_empty(*acts.shape[:-1], 3 * H)
        k_i, k_f, k_g = k[..., :H], k[..., H : 2 * H], k[..., 2 * H :]
        torch.addcmul(i, i, i, value=-1, out=k_i).mul_(g)  # g * i * (1 - i)
        torch.addcmul(f, f, f, value=-1, out=k_f)  # f * (1 - f), times c_(t-1) below
        # the cell state each step started from: given, or the neighbour in processing order
        if c_prev is not None:
            k_f.mul_(c_prev)
        else:
            first, rest = (
                (slice(-1, None), slice(None, -1))
                if self.reverse
                else (slice(0, 1), slice(1, None))
            )
            k_f[rest].mul_(cells[1:] if self.reverse else cells[:-1])
            k_f[first].mul_(c0)
        torch.addcmul(one, g, g, value=-1, out=k_g).mul_(i)  # i * (1 - g^2)
        self._k_ifg = k

    def from_states(self, x, h_prev, c_prev):
        H = self.hidden_size
        self.steps = x.shape[0]
        acts = self._pre_activations(x, h_prev)
        acts[..., : 3 * H].sigmoid_()
        g = acts[..., 3 * H :]
        tanh(g, out=g)
        cells = torch.addcmul(acts[..., 2 * H : 3 * H] * c_prev, acts[..., H : 2 * H], g)
        tanh_c = tanh(cells)
        self._coefficients(acts, cells, tanh_c, c_prev[0], c_prev=c_prev)
        return acts[..., :H] * tanh_c

    def _forward_known(self, x: Tensor, h0: Tensor, c0: Tensor, known_out: Tensor):
        """Every step from the real previous output at once: one large matrix product for
        all pre-activations and whole-sequence elementwise ops; only the cell-state scan
        ``c_t = f_t c_(t-1) + i_t g_t`` (one fused op per step) stays sequential."""
        T, H = x.shape[0], self.hidden_size
        self.steps = T
        acts = self.project_inputs(x)
        # + h_(t-1) W_hh^T: the real previous outputs, and h0 where the sequence starts
        w_t = self.w.w_hh.t()
        head, body, known = (
            (acts[-1], acts[:-1], known_out[1:])
            if self.reverse
            else (acts[0], acts[1:], known_out[:-1])
        )
        body.view(-1, 4 * H).addmm_(known.reshape(-1, known.shape[-1]), w_t)
        head.addmm_(h0, w_t)
        acts[..., : 3 * H].sigmoid_()
        g = acts[..., 3 * H :]
        tanh(g, out=g)
        ig = acts[..., H : 2 * H] * acts[..., 3 * H :]
        f = acts[..., 2 * H : 3 * H]
        cells = torch.empty_like(ig)
        ig_t, f_t, cells_t = ig.unbind(), f.unbind(), cells.unbind()
        c = c0
        for t in self.order(T):
            c = torch.addcmul(ig_t[t], f_t[t], c, out=cells_t[t])
        tanh_c = tanh(cells)
        outs = acts[..., :H] * tanh_c
        self._coefficients(acts, cells, tanh_c, c0)
        return outs, c.new_empty(0) if T == 0 else outs[self.order(T)[-1]], c

    def step_back(self, t, dh, dc, valid):
        H = self.hidden_size
        dm = dh if self.w.w_hr is None else torch.mm(dh, self.w.w_hr)
        dc_total = torch.addcmul(dc, dm, self._k_c[t])
        d_a = dm.new_empty(dm.shape[0], 4 * H)
        torch.mul(dm, self._k_o[t], out=d_a[:, :H])
        d_ifg = d_a[:, H:].view(-1, 3, H)
        torch.mul(dc_total.unsqueeze(1), self._k_ifg[t].view(-1, 3, H), out=d_ifg)
        d_a = _zero_invalid(valid, t, d_a)
        dc_prev = _zero_invalid(valid, t, dc_total * self._f[t])
        return d_a, self._to_state(d_a), dc_prev, dc_total

    def backward(self, direct, dh_n, dc_n, last, valid, input_grad=True):
        if valid is not None or self.w.w_hr is not None:
            return super().backward(direct, dh_n, dc_n, last, valid, input_grad)
        # Every sequence covers every step: the generic walk with each step's results
        # written straight into whole-sequence buffers, and per-step views taken once
        # (``unbind``) rather than indexed step by step: at small sizes the replay is bound
        # by the number of operations, not by arithmetic.
        T, B, H = direct.shape[0], direct.shape[1], self.hidden_size
        if dh_n is not None:
            direct = direct + last * dh_n
        total_h = torch.empty_like(direct)
        total_c, carried_c = direct.new_empty(T, B, H), direct.new_empty(T, B, H)
        d_a = direct.new_empty(T, B, 4 * H)
        d_a_o, d_a_ifg = d_a[..., :H].unbind(), d_a[..., H:].view(T, B, 3, H).unbind()
        k_c, k_o, f = self._k_c.unbind(), self._k_o.unbind(), self._f.unbind()
        k_ifg = self._k_ifg.view(T, B, 3, H).unbind()
        direct_t, total_h_t, total_c_t = direct.unbind(), total_h.unbind(), total_c.unbind()
        carried_c_t = carried_c.unbind()
        visit = list(reversed(self.order(T)))
        carried_h: list[Tensor] = [direct.new_empty(0)] * T
        carry_h = direct.new_zeros(B, direct.shape[2])
        if T:  # nothing arrives at the last step from beyond it
            carried_c_t[visit[0]].zero_()
        for n, t in enumerate(visit):
            carried_h[t] = carry_h
            dh = torch.add(direct_t[t], carry_h, out=total_h_t[t])
            # the final cell-state gradient enters at the first visited step (the last one)
            dc = dc_n if n == 0 and dc_n is not None else carried_c_t[t]
            dc_total = torch.addcmul(dc, dh, k_c[t], out=total_c_t[t])
            torch.mul(dh, k_o[t], out=d_a_o[t])
            torch.mul(dc_total.unsqueeze(1), k_ifg[t], out=d_a_ifg[t])
            if n + 1 < T:
                torch.mul(dc_total, f[t], out=carried_c_t[visit[n + 1]])
                carry_h = self._to_state(d_a[t])
        grad_input = None
        if input_grad:
            grad_input = torch.mm(d_a.view(T * B, 4 * H), self.w.w_ih).view(T, B, -1)
        stacked = torch.stack(carried_h) if T else torch.empty_like(direct)
        return BackwardResult(total_h, direct, stacked, carried_c, total_c, grad_input)

    # rows are in (o, i, f, g) order here
    def candidate_block(self):
        H = self.hidden_size
        return self.recurrent_matrix()[3 * H :]

    def forget_bias(self):
        H = self.hidden_size
        parts = [b[2 * H : 3 * H] for b in (self.w.b_ih, self.w.b_hh) if b is not None]
        return sum(parts[1:], parts[0]).mean() if parts else self.w.w_hh.new_zeros(())

    def trajectory(self, steps):
        H = self.hidden_size
        a = self._acts[steps]
        g = a[..., 3 * H :]
        return {
            "derivative": 1 - g * g,
            "forget": a[..., 2 * H : 3 * H],
            "input": a[..., H : 2 * H],
            "output": a[..., :H],
        }


class GRURecurrence(Recurrence):
    """``nn.GRU``: h' = (1 - z) * n + z * h."""

    gates = 3

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
        d_x = _zero_invalid(valid, t, torch.cat([dar, daz, dan], dim=1))
        d_h = _zero_invalid(valid, t, torch.cat([dar, daz, dan * r], dim=1))
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
        return LSTMRecurrence(weights, reverse)
    if mode == "GRU":
        return GRURecurrence(weights, reverse)
    if mode in ("RNN_TANH", "RNN_RELU"):
        return SimpleRecurrence(weights, reverse, "relu" if mode == "RNN_RELU" else "tanh")
    raise ValueError(f"unsupported recurrent mode {mode!r}")
