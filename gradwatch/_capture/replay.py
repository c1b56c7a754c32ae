"""The replay of one recorded fused call: forward trajectory, backward walk, statistics.

The recurrence is run again on detached tensors, layer by layer and direction by direction
(`gradwatch._capture.recurrences`), and walked back with the gradients observed at the
call's outputs injected. Unit probes for the propagation ride along (`.probes`); large calls
hold one layer at a time (`.layered`). `gradwatch._capture.fused` records the calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from gradwatch._capture.layered import LazyRecurrence, recomputes
from gradwatch._capture.probes import last_steps, probed_samples, unit_probes
from gradwatch._capture.probes import walk as walk_probes
from gradwatch._capture.raw import Walkable
from gradwatch._capture.recurrences import LayerWeights, Recurrence, make_recurrence
from gradwatch._capture.stats import relative_deviation, sample_norms, sampled_steps, step_mean

if TYPE_CHECKING:
    from gradwatch._capture.fused import FusedCall
    from gradwatch._capture.math_mode import MathMode

__all__ = ["Replay", "replay"]


# ---------------------------------------------------------------------------------- replay
@dataclass
class _Layout:
    """A call's tensors in the replay layout: time-major, batched, original batch order."""

    x: Tensor  # [T, B, I]
    out: Tensor  # [T, B, D*P]
    grad_out: Tensor | None  # [T, B, D*P]
    lengths: Tensor | None  # [B], None when every sequence has T steps
    unbatched: bool


def _to_layout(call: FusedCall, dtype: torch.dtype) -> _Layout:
    mod = call.module
    as_read = call.mode.operand  # the input rounded as the kernel read it

    def pad(data: Tensor) -> Tensor:
        assert isinstance(call.input, PackedSequence)
        return pad_packed_sequence(call.input._replace(data=data))[0]

    grad_out = call.grads.get("out")
    if isinstance(call.input, PackedSequence):
        x, lengths = pad_packed_sequence(call.input)
        assert isinstance(call.output, PackedSequence)
        out = pad(call.output.data)
        grad_out = None if grad_out is None else pad(grad_out)
        return _Layout(as_read(x, dtype), out.to(dtype), _opt(grad_out, dtype), lengths, False)
    x, out = call.input, call.output
    assert isinstance(x, Tensor) and isinstance(out, Tensor)
    if call.lengths is not None:  # padded input packed inside the subclass's forward
        if mod.batch_first:
            x, out = x.transpose(0, 1), out.transpose(0, 1)
            grad_out = None if grad_out is None else grad_out.transpose(0, 1)
        steps = x.shape[0]
        lengths = call.lengths.clamp(0, steps)
        if grad_out is not None:  # padding positions never reach the recurrence
            keep = torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)
            grad_out = grad_out * keep.unsqueeze(-1).to(grad_out.device, grad_out.dtype)
        return _Layout(as_read(x, dtype), out.to(dtype), _opt(grad_out, dtype), lengths, False)
    unbatched = x.dim() == 2
    if unbatched:
        x, out = x.unsqueeze(1), out.unsqueeze(1)
        grad_out = None if grad_out is None else grad_out.unsqueeze(1)
    elif mod.batch_first:
        x, out = x.transpose(0, 1), out.transpose(0, 1)
        grad_out = None if grad_out is None else grad_out.transpose(0, 1)
    return _Layout(as_read(x, dtype), out.to(dtype), _opt(grad_out, dtype), None, unbatched)


def _opt(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype)


def _state(
    x: Tensor | None, unbatched: bool, dtype: torch.dtype, mode: MathMode | None = None
) -> Tensor | None:
    if x is None:
        return None
    x = x.unsqueeze(1) if unbatched else x
    return x.to(dtype) if mode is None else mode.operand(x, dtype)


def _layer_weights(call: FusedCall, dtype: torch.dtype) -> dict[tuple[int, int], LayerWeights]:
    mod = call.module
    by_name = dict(zip(mod._flat_weights_names, call.weights, strict=True))
    result = {}
    for layer in range(mod.num_layers):
        for direction in range(2 if mod.bidirectional else 1):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")

            def get(kind: str, sfx: str = sfx) -> Tensor | None:
                w = by_name.get(kind + sfx)
                return None if w is None else call.mode.operand(w, dtype)

            result[layer, direction] = LayerWeights(
                w_ih=get("weight_ih"),
                w_hh=get("weight_hh"),
                b_ih=get("bias_ih"),
                b_hh=get("bias_hh"),
                w_hr=get("weight_hr"),
            )
    return result


@dataclass
class Replay:
    """Everything the replay of one call produced."""

    recurrences: dict[tuple[int, int], Walkable]  # (layer, direction) -> trajectory
    valid: Tensor | None  # [T, B] mask, None when every sequence covers every step
    lengths: Tensor  # [B]
    stats: dict[str, Tensor]  # total / carried / direct / cell_total: [L, D, T], on device
    grad_input: Tensor | None  # dL/dx of the bottom layer [T, B, I], when asked for
    fidelity: Tensor  # device scalar
    dtype: torch.dtype
    # (layer, direction) -> log norms [R, T, B] of the unit probes walked back (`.probes`)
    walked: dict[tuple[int, int], Tensor] = field(default_factory=dict)


def replay(
    call: FusedCall,
    input_grad: bool = False,
    probes: bool = False,
    recompute: bool | None = None,
) -> Replay:
    """Replay the forward trajectory and the backward walk of one call.

    ``input_grad`` also computes dL/dx of the bottom layer (used to validate the replay).
    ``probes`` also walks unit probes back through every layer (`Replay.walked`, the raw
    data of the propagation curve): alongside the backward walk, as extra batch slices, or
    step by step after it for large calls. ``recompute`` holds one layer at a time
    (`gradwatch._capture.layered`; default: only for large calls).
    The replay computes as the kernel did (`MathMode`): float64 for float64 weights, else
    float32 math on operands rounded to the call's storage dtype (float16 / bfloat16 under
    autocast), with TF32 matrix products where cuDNN was allowed TF32; also when called
    inside an autocast region (the end of a backward pass under AMP). It records no graph.
    """
    device_type = call.weights[0].device.type if call.weights else "cpu"
    with torch.no_grad(), torch.autocast(device_type, enabled=False), call.mode.context():
        return _replay(call, input_grad, probes, recompute)


@dataclass
class _Setup:
    """What every layer's replay shares."""

    call: FusedCall
    lay: _Layout
    weights: dict[tuple[int, int], LayerWeights]
    h0: Tensor
    c0: Tensor | None
    valid: Tensor | None  # [T, B, 1]
    num_dir: int
    out_size: int

    def run_layer(self, layer: int, layer_input: Tensor) -> list[tuple[Recurrence, tuple]]:
        """Replay one layer forward: per direction, its recurrence and (out, h_n, c_n)."""
        mod = self.call.module
        result = []
        for d in range(self.num_dir):
            k = layer * self.num_dir + d
            rec = make_recurrence(mod.mode, self.weights[layer, d], reverse=d == 1)
            # the top layer's outputs are the call's outputs: visible, so every step can be
            # computed from the real previous state at once
            known = None
            if layer == mod.num_layers - 1:
                known = self.lay.out[..., d * self.out_size : (d + 1) * self.out_size]
            cell0 = None if self.c0 is None else self.c0[k]
            out = rec.forward(layer_input, self.h0[k], cell0, self.valid, known_out=known)
            result.append((rec, out))
        return result


def _replay(call: FusedCall, input_grad: bool, probes: bool, recompute: bool | None) -> Replay:
    mod = call.module
    dtype = torch.float64 if call.weights[0].dtype == torch.float64 else torch.float32
    lay = _to_layout(call, dtype)
    steps, batch = lay.x.shape[0], lay.x.shape[1]
    num_dir = 2 if mod.bidirectional else 1
    out_size = mod.proj_size if mod.proj_size > 0 else mod.hidden_size
    if recompute is None:
        recompute = recomputes(mod, steps, batch, lay.x.element_size())

    # lengths live on the CPU (packed sequences keep them there): no device sync to test them
    device = lay.x.device
    valid2 = None
    if lay.lengths is not None and bool((lay.lengths < steps).any()):
        valid2 = torch.arange(steps).unsqueeze(1) < lay.lengths.unsqueeze(0)  # [T, B]
        valid2 = valid2.to(device)
    valid = None if valid2 is None else valid2.unsqueeze(-1)
    lengths = lay.lengths if lay.lengths is not None else torch.full((batch,), steps)
    time = torch.arange(steps, device=device).view(steps, 1, 1)
    ends = (lengths - 1).to(device).view(1, batch, 1)
    last = [(time == ends).to(dtype), (time == 0).to(dtype)]

    h0 = _state(call.hx, lay.unbatched, dtype, call.mode)
    c0 = _state(call.cx, lay.unbatched, dtype, call.mode)
    if h0 is None:
        h0 = lay.x.new_zeros(mod.num_layers * num_dir, batch, out_size)
    if c0 is None and mod.mode == "LSTM":
        c0 = lay.x.new_zeros(mod.num_layers * num_dir, batch, mod.hidden_size)
    setup = _Setup(call, lay, _layer_weights(call, dtype), h0, c0, valid, num_dir, out_size)

    # Forward replay, bottom-up. Inter-layer dropout is not replayed (its masks are unseen).
    # With `recompute`, a layer below the top keeps only its outputs here (see `.layered`).
    recs: dict[tuple[int, int], Walkable] = {}
    inputs, h_n, c_n = [lay.x], [], []
    for layer in range(mod.num_layers):
        done = setup.run_layer(layer, inputs[-1])
        if not recompute or layer == mod.num_layers - 1:
            recs.update({(layer, d): rec for d, (rec, _) in enumerate(done)})
        inputs.append(torch.cat([out[0] for _, out in done], dim=-1))
        h_n.extend(out[1] for _, out in done)
        c_n.extend(out[2] for _, out in done)
        del done
    layer_input = inputs[-1]

    # Fidelity on every final state and on up to 32 evenly spaced output steps: a forward that
    # differs from the replay's deviates everywhere, and the full comparison costs as much as
    # several replay passes.
    probe = sampled_steps(steps, device) if steps else slice(None)
    replayed, real = [layer_input[probe]], [lay.out[probe]]
    if call.h_n is not None:  # a subclass may not return its final state
        replayed.append(torch.stack(h_n))
        real.append(_real_state(call.h_n, lay, dtype))
    if call.c_n is not None:
        replayed.append(torch.stack(c_n))
        real.append(_real_state(call.c_n, lay, dtype))
    fidelity = relative_deviation(replayed, real)
    del replayed, h_n, c_n

    walk = _Walk(setup, inputs, recs, valid2, lengths, last, probes, recompute)
    grad_below = walk.run(input_grad)
    if grad_below is not None and lay.unbatched:
        grad_below = grad_below.squeeze(1)
    return Replay(recs, valid2, lengths, walk.stats, grad_below, fidelity, dtype, walk.walked)


class _Walk:
    """The backward walk, top-down, with the observed output gradients injected."""

    def __init__(self, setup, inputs, recs, valid2, lengths, last, probes, recompute) -> None:
        self.setup, self.inputs, self.recs = setup, inputs, recs
        self.valid2, self.lengths, self.last = valid2, lengths, last
        self.probes, self.recompute = probes, recompute
        mod, lay = setup.call.module, setup.lay
        shape = (mod.num_layers, setup.num_dir, lay.x.shape[0])
        new = lay.x.new_zeros
        self.stats = {k: new(shape, dtype=torch.float32) for k in ("total", "carried", "direct")}
        if mod.mode == "LSTM":
            self.stats["cell_total"] = new(shape, dtype=torch.float32)
        self.walked: dict[tuple[int, int], Tensor] = {}

    def run(self, input_grad: bool) -> Tensor | None:
        setup, call = self.setup, self.setup.call
        mod, lay = call.module, setup.lay
        dtype = lay.x.dtype
        grad_hn = _state(call.grads.get("h_n"), lay.unbatched, dtype)
        grad_cn = _state(call.grads.get("c_n"), lay.unbatched, dtype)
        direct = lay.grad_out
        if direct is None:
            direct = lay.x.new_zeros(*lay.x.shape[:2], setup.num_dir * setup.out_size)
        grad_below = None
        for layer in reversed(range(mod.num_layers)):
            if (layer, 0) not in self.recs:  # replayed again, as in the first pass
                done = setup.run_layer(layer, self.inputs[layer])
                self.recs.update({(layer, d): rec for d, (rec, _) in enumerate(done)})
                del done
            grad_below = None
            for d in range(setup.num_dir):
                k = layer * setup.num_dir + d
                gi = self._layer(
                    layer,
                    d,
                    direct[..., d * setup.out_size : (d + 1) * setup.out_size],
                    None if grad_hn is None else grad_hn[k],
                    None if grad_cn is None else grad_cn[k],
                    layer > 0 or input_grad,
                )
                if gi is not None:
                    grad_below = gi if grad_below is None else grad_below + gi
            direct = grad_below
        return grad_below

    def _layer(self, layer, d, direct, dh_n, dc_n, input_grad) -> Tensor | None:
        rec = self.recs[layer, d]
        assert isinstance(rec, Recurrence)
        valid, valid2 = self.setup.valid, self.valid2
        # probes ride along the backward walk, except for large calls (they would double
        # its buffers) and large states (they would double its matrix products): those are
        # walked step by step just before, on a few samples where the recurrence allows it
        batch = self.lengths.numel()
        select = probed_samples(batch, rec.hidden_size)
        few = rec.samples(select) if select != slice(None) else None
        fused = self.probes and not self.recompute and few is None and bool(batch)
        unit, logs = None, None
        if self.probes and batch:
            x = self.setup.lay.x
            if few is not None:
                count = len(range(batch)[select])
                unit = unit_probes(count, rec.state_sizes, x.device, x.dtype)
                logs = self._few_probes(few, unit, select, d)
            else:
                unit = unit_probes(batch, rec.state_sizes, x.device, x.dtype)
                if not fused:  # step by step, before the backward walk may spend the trajectory
                    logs = self._walk_probes(rec, unit)
        res = rec.backward(
            direct, dh_n, dc_n, self.last[d], valid, input_grad, unit if fused else None
        )
        stats = self.stats
        stats["total"][layer, d] = step_mean(sample_norms(res.total_h), valid2)
        stats["direct"][layer, d] = step_mean(sample_norms(res.direct_h), valid2)
        carry = sample_norms(res.carried_h)
        if res.carried_c is not None:
            carry = torch.hypot(carry, sample_norms(res.carried_c))
        stats["carried"][layer, d] = step_mean(carry, valid2)
        if "cell_total" in stats and res.total_c is not None:
            stats["cell_total"][layer, d] = step_mean(sample_norms(res.total_c), valid2)
        grad_input = res.grad_input
        if fused:
            logs = res.probe_logs
            # outside the range a block keeps exact (or non-finite): walk it step by step
            if logs is None or res.probe_ok is None or not bool(res.probe_ok):
                logs = self._walk_probes(rec, unit)
        del res
        if logs is not None:
            self.walked[layer, d] = logs
        if self.recompute or getattr(rec, "_spent", False):
            self.recs[layer, d] = LazyRecurrence(rec, partial(self._rebuild, layer, d))
        return grad_input

    def _few_probes(self, few: Recurrence, unit: list[Tensor], select: slice, d: int) -> Tensor:
        """The probes of a few samples (``few``: the recurrence's views of them), walked
        the way the capture walks them, as extra rows beside a zero data gradient (a few
        operations per step, renormalised every `BLOCK` steps); step by step where a
        block's range is not safe."""
        valid = self.setup.valid
        x = self.setup.lay.x
        zero = x.new_zeros(few.steps, len(unit[0][0]), self.setup.out_size)
        res = few.backward(
            zero,
            None,
            None,
            self.last[d][:, select],
            None if valid is None else valid[:, select],
            False,
            unit,
        )
        if res.probe_logs is None or res.probe_ok is None or not bool(res.probe_ok):
            return self._walk_probes(few, unit, select)
        return res.probe_logs

    def _walk_probes(self, rec: Recurrence, unit: list[Tensor], select=slice(None)) -> Tensor:
        lengths = self.lengths[select]
        last = last_steps(rec.reverse, lengths.to(rec.weight.device), rec.steps)
        valid2 = None if self.valid2 is None else self.valid2[:, select]
        return walk_probes(rec, valid2, last, unit)

    def _rebuild(self, layer: int, d: int) -> Recurrence:
        call = self.setup.call
        device_type = call.weights[0].device.type if call.weights else "cpu"
        with torch.no_grad(), torch.autocast(device_type, enabled=False), call.mode.context():
            return self.setup.run_layer(layer, self.inputs[layer])[d][0]


def _real_state(x: Tensor, lay: _Layout, dtype: torch.dtype) -> Tensor:
    return (x.unsqueeze(1) if lay.unbatched else x).to(dtype)
