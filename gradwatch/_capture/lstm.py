"""``nn.LSTM``'s step equations: forward replay and hand-written backward (see `.recurrences`)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradwatch._capture.probes import BLOCK, fused_logs, renormalise
from gradwatch._capture.recurrences import (
    PACKED_ABOVE,
    BackwardResult,
    LayerWeights,
    Recurrence,
    _where,
    _zero_invalid,
    tanh,
)

__all__ = ["BUFFERED_ABOVE", "LSTMRecurrence"]

# Above this size of the walk's pre-activation gradients (bytes), a walk without probes (a large
# call's, see `gradwatch._capture.layered`) writes into whole-sequence buffers over the spent
# coefficients instead of stacking per-step results.
BUFFERED_ABOVE = 4 * 2**20
# Up to this size of the walk's results (bytes, probes included), the walk writes them in place
# into whole-sequence buffers (fewest operations per step: small calls are bound by their
# count); above it, fresh memory for those buffers at every capture costs more (page faults).
IN_PLACE_UP_TO = 4 * 2**20


def _activate(acts: Tensor, split: int) -> None:
    """In place: sigmoid on the first ``split`` gate columns, tanh on the others.

    Where `tanh` is ``2 * sigmoid(2x) - 1`` (CPU float32), one sigmoid runs over the whole
    contiguous tensor: on a column slice it costs about twice as much per element."""
    g = acts[..., split:]
    if acts.device.type != "cpu" or acts.dtype != torch.float32:
        acts[..., :split].sigmoid_()
        tanh(g, out=g)
        return
    g.mul_(2)
    acts.sigmoid_()
    g.mul_(2).sub_(1)


class LSTMRecurrence(Recurrence):
    """``nn.LSTM``: c' = f*c + i*g, h' = o*tanh(c') (times W_hr with ``proj_size``).

    Gate rows are reordered once from PyTorch's (i, f, g, o) to (o, i, f, g): the sigmoid
    gates are then one contiguous block in the forward pass, and the gates driven by dc one
    contiguous block in the backward pass. Per-step backward coefficients are computed for
    all steps at once after the forward pass, leaving few small operations per step.
    """

    gates = 4
    has_cell = True
    per_sample = ("_acts", "_f", "_k_c", "_k_o", "_k_ifg", "_k")

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
        acts = xp  # o, i, f (sigmoid) and g (tanh), computed over the input projections
        tanh_c, cells = xp.new_empty(T, B, H), xp.new_empty(T, B, H)
        outs = xp.new_empty(T, B, h0.shape[-1])
        h, c = h0, c0
        acts_t, cells_t, tanh_c_t, outs_t = (z.unbind() for z in (acts, cells, tanh_c, outs))
        for t in self.order(T):
            at = acts_t[t].add_(self._from_state(h))
            _activate(at, 3 * H)
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
        # one buffer in gate order (o, i, f, g): d(pre-activations) = [dm, dc, dc, dc] * k
        k_all = acts.new_empty(*acts.shape[:-1], 4 * H)
        k_o = torch.mul(tanh_c, o, out=k_all[..., :H])
        self._k_o = torch.addcmul(k_o, k_o, o, value=-1, out=k_o)  # o * (1 - o) * tanh(c)
        k = k_all[..., H:]
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
        self._k_ifg, self._k = k, k_all

    def from_states(self, x, h_prev, c_prev):
        H = self.hidden_size
        self.steps = x.shape[0]
        acts = self._pre_activations(x, h_prev)
        _activate(acts, 3 * H)
        g = acts[..., 3 * H :]
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
        _activate(acts, 3 * H)
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
        if getattr(self, "_spent", False):
            raise RuntimeError("the trajectory was spent by a buffered backward walk")
        H = self.hidden_size
        dm = dh if self.w.w_hr is None else torch.matmul(dh, self.w.w_hr)
        dc_total = torch.addcmul(dc, dm, self._k_c[t])
        d_a = dm.new_empty(*dm.shape[:-1], 4 * H)
        torch.mul(dm, self._k_o[t], out=d_a[..., :H])
        d_ifg = d_a[..., H:].unflatten(-1, (3, H))
        torch.mul(dc_total.unsqueeze(-2), self._k_ifg[t].unflatten(-1, (3, H)), out=d_ifg)
        d_a = _zero_invalid(valid, t, d_a)
        dc_prev = _zero_invalid(valid, t, dc_total * self._f[t])
        return d_a, self._to_state(d_a), dc_prev, dc_total

    def backward(self, direct, dh_n, dc_n, last, valid, input_grad=True, probes=None):
        if valid is not None or self.w.w_hr is not None:
            return super().backward(direct, dh_n, dc_n, last, valid, input_grad, probes)
        # Every sequence covers every step. At small sizes the walk is bound by the number
        # of Python-level operations per step (each op and each tensor view costs about as
        # much as the arithmetic), so the loop takes as few as possible: six, each writing
        # straight into a whole-sequence buffer (``out=``) through views made once, so
        # nothing is stacked afterwards. Probe rounds are a leading dimension
        # ``[1 + R, B, *]`` the coefficients broadcast over (``R = 0`` without probes).
        T, B, H = direct.shape[0], direct.shape[1], self.hidden_size
        if probes is None and direct.numel() * 4 * direct.element_size() > BUFFERED_ABOVE:
            return self._backward_buffered(direct, dh_n, dc_n, last, input_grad)
        if dh_n is not None:
            direct = direct + last * dh_n
        if not T:
            empty, cells = direct.new_empty(0, B, direct.shape[-1]), direct.new_empty(0, B, H)
            return BackwardResult(empty, direct, empty, cells, cells, None)
        L = 1 if probes is None else 1 + probes[0].shape[0]
        if 5 * T * L * B * H * direct.element_size() > IN_PLACE_UP_TO:
            return self._backward_stacked(direct, dc_n, last, input_grad, probes)
        visit = list(reversed(self.order(T)))
        # [total_h, carried_h, total_c, carried_c, direct] x [T, L, B, H]: slices 1: are the
        # probe rounds; the direct gradient of a probe is its unit start, nothing after
        buf = direct.new_empty(5, T, L, B, H)
        total_h, carried_h, total_c, carried_c, full = buf.unbind()
        if probes is None:
            full = direct.unsqueeze(1)
        else:
            full.zero_()
            full[:, 0] = direct
            full[visit[0], 1:] = probes[0]
            carried_c[visit[0], 1:] = probes[1]
        carried_h[visit[0]].zero_()
        if dc_n is not None:
            carried_c[visit[0], 0] = dc_n
        else:
            carried_c[visit[0], 0].zero_()
        # d(pre-activations): kept for dL/dx, else one slot written over at every step
        d_a = direct.new_empty(T if input_grad else 1, L, B, 4 * H)
        d_a_t, d_a_rows = d_a.unbind(), d_a.view(d_a.shape[0], L * B, 4 * H).unbind()
        total_h_t, carried_h_t, total_c_t, carried_c_t, direct_t = (
            x.unbind() for x in (total_h, carried_h, total_c, carried_c, full)
        )
        carried_h_rows = carried_h.view(T, L * B, H).unbind()
        k_c_t, k_t, f_t = (x.unbind() for x in (self._k_c, self._k, self._f))
        into = self._to_state_into()
        log_scale = None if probes is None else direct.new_zeros(T, L - 1, B, dtype=torch.float64)
        for n, t in enumerate(visit):
            s = t if input_grad else 0
            dh = torch.add(direct_t[t], carried_h_t[t], out=total_h_t[t])
            dct = torch.addcmul(carried_c_t[t], dh, k_c_t[t], out=total_c_t[t])
            torch.cat([dh, dct, dct, dct], dim=-1, out=d_a_t[s]).mul_(k_t[t])
            if n + 1 < T:
                nxt = visit[n + 1]
                torch.mul(dct, f_t[t], out=carried_c_t[nxt])
                into(d_a_rows[s], carried_h_rows[nxt])
                if log_scale is not None and (n + 1) % BLOCK == 0:
                    renormalise([carried_h_t[nxt][1:], carried_c_t[nxt][1:]], log_scale[n + 1])
        return self._results(buf, full, d_a if input_grad else None, visit[0], log_scale, last)

    def _results(self, buf, full, d_a, first, log_scale, last):
        """Split the walk's buffers into the data's results and the probes' log norms."""
        total_h, carried_h, total_c, carried_c = buf[:4].unbind()
        carried_c[first, 0] = 0  # the final-state gradient is direct, not carried
        res = BackwardResult(
            total_h[:, 0], full[:, 0], carried_h[:, 0], carried_c[:, 0], total_c[:, 0], None
        )
        if log_scale is not None:
            parts = [total_h[:, 1:], carried_c[:, 1:]]
            starts = last[..., 0] > 0
            res.probe_logs, res.probe_ok = fused_logs(parts, log_scale, self.reverse, None, starts)
        if d_a is not None:
            T, L, B, G = d_a.shape
            rows = d_a.view(T * B, G) if L == 1 else d_a[:, 0].reshape(T * B, G)
            res.grad_input = torch.mm(rows, self.w.w_ih).view(T, B, -1)
        return res

    def _backward_stacked(self, direct, dc_n, last, input_grad, probes):
        """The walk for mid-sized calls: fresh per-step results stacked once at the end.
        Large whole-sequence buffers written step by step would cost a page fault per 4 KiB
        of fresh memory at every capture; per-step tensors reuse the allocator's memory."""
        T, B, H = direct.shape[0], direct.shape[1], self.hidden_size
        visit = list(reversed(self.order(T)))
        dc = dc_n if dc_n is not None else direct.new_zeros(B, H)
        fused = probes is not None and T > 0
        if fused:
            assert probes is not None
            full = direct.new_zeros(T, 1 + probes[0].shape[0], B, direct.shape[2])
            full[:, 0] = direct
            full[visit[0], 1:] = probes[0]
            direct = full
            dc = torch.cat([dc.unsqueeze(0), probes[1]])
        direct_t, k_c_t, k_t, f_t = (x.unbind() for x in (direct, self._k_c, self._k, self._f))
        w = self.w.w_hh
        packed = w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= PACKED_ABOVE
        lead, width = direct.shape[1:-1], direct.shape[-1]
        carry_h = direct.new_zeros(*lead, width)
        total_h, carried_h, total_c, carried_c, d_as = ([] for _ in range(5))
        log_scale = None
        if fused:
            log_scale = direct.new_zeros(T, lead[0] - 1, B, dtype=torch.float64)
        for n, t in enumerate(visit):
            carried_h.append(carry_h)
            carried_c.append(dc)  # the first one: the final-state gradient (direct, below)
            dh = torch.add(direct_t[t], carry_h)
            dct = torch.addcmul(dc, dh, k_c_t[t])
            d_a = torch.cat([dh, dct, dct, dct], dim=-1).mul_(k_t[t])
            total_h.append(dh)
            total_c.append(dct)
            if input_grad:  # the data rows only
                d_as.append(d_a[0] if fused else d_a)
            if n + 1 < T:
                dc = torch.mul(dct, f_t[t])
                carry_h = self._to_state(d_a) if packed or fused else torch.mm(d_a, w)
                if log_scale is not None and (n + 1) % BLOCK == 0:
                    renormalise([carry_h[1:], dc[1:]], log_scale[n + 1])
        lists = [total_h, carried_h, total_c, carried_c, d_as]
        return self._assemble(visit, direct, lists, fused, log_scale, last)

    def _assemble(self, visit, direct, lists, fused, log_scale, last):
        """Stack the per-step results in time order and split the data from the probes."""
        T, H = len(visit), self.hidden_size
        order = slice(None, None, -1) if not self.reverse else slice(None)
        total_h, carried_h, total_c, carried_c = (torch.stack(x[order]) for x in lists[:4])
        data = (lambda x: x[:, 0]) if fused else (lambda x: x)
        data(carried_c)[visit[0]] = 0  # the final-state gradient is direct, not carried
        res = BackwardResult(
            data(total_h), data(direct), data(carried_h), data(carried_c), data(total_c), None
        )
        if log_scale is not None:
            parts = [total_h[:, 1:], carried_c[:, 1:]]
            starts = last[..., 0] > 0
            res.probe_logs, res.probe_ok = fused_logs(parts, log_scale, self.reverse, None, starts)
        if lists[4]:
            d_a = torch.stack(lists[4][order])
            B = d_a.shape[1]
            res.grad_input = torch.mm(d_a.view(T * B, 4 * H), self.w.w_ih).view(T, B, -1)
        return res

    def _backward_buffered(self, direct, dh_n, dc_n, last, input_grad):
        """The same walk for large calls: results written into whole-sequence buffers (no
        per-step tensors stacked afterwards, which would hold everything twice), and the
        cell-state and pre-activation gradients written over coefficients already used."""
        T, B, H = direct.shape[0], direct.shape[1], self.hidden_size
        if dh_n is not None:
            direct = direct + last * dh_n
        visit = list(reversed(self.order(T)))
        total_h, carried_h = torch.empty_like(direct), torch.empty_like(direct)
        # c_t's total gradient overwrites k_c[t] and d(pre-activations) overwrites k[t] once
        # step t is done: the trajectory is then spent (`drop_trajectory` follows)
        total_c, d_a, carried_c = self._k_c, self._k, direct.new_empty(T, B, H)
        k_c, k_t, f = self._k_c.unbind(), self._k.unbind(), self._f.unbind()
        k_o, k_ifg = self._k_o.unbind(), self._k_ifg.unflatten(-1, (3, H)).unbind()
        direct_t, total_h_t, carried_h_t = direct.unbind(), total_h.unbind(), carried_h.unbind()
        carried_c_t = carried_c.unbind()
        into = self._to_state_into()
        if T:
            carried_c_t[visit[0]].zero_()
            carried_h_t[visit[0]].zero_()
        for n, t in enumerate(visit):
            dh = torch.add(direct_t[t], carried_h_t[t], out=total_h_t[t])
            dc = dc_n if n == 0 and dc_n is not None else carried_c_t[t]
            dct = torch.addcmul(dc, dh, k_c[t], out=k_c[t])  # k_c[t] is read before written
            k_o[t].mul_(dh)
            k_ifg[t].mul_(dct.unsqueeze(-2))
            if n + 1 < T:
                nxt = visit[n + 1]
                torch.mul(dct, f[t], out=carried_c_t[nxt])
                into(k_t[t], carried_h_t[nxt])
        self._spent = True
        res = BackwardResult(total_h, direct, carried_h, carried_c, total_c, None)
        if input_grad:
            res.grad_input = torch.mm(d_a.view(T * B, 4 * H), self.w.w_ih).view(T, B, -1)
        return res

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
