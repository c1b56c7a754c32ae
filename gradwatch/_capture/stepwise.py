"""Exact per-step gradients for recurrences unrolled by user code: cell loops and marked states.

Here every step's state is a real tensor in the autograd graph, so hooks give the exact
values directly: a tensor hook on the state gives the total, and post-hooks on the autograd
nodes of the next step that read the state give the carried part (see
``Trace._hook_carried``); the direct part is their difference. The state itself is passed on
untouched: an identity view in between would change the order in which autograd sums the
gradient contributions, and with it the last bits of the parameter gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch._analysis.quantities import fused_quantities, stepwise_quantities, to_host
from gradwatch._analysis.report import ModuleReport
from gradwatch._analysis.verdicts import Thresholds, diagnose
from gradwatch._capture.recurrences import LayerWeights, make_recurrence
from gradwatch._capture.stats import relative_deviation, sample_norms

__all__ = ["StepSequence", "build_step_report"]

_CELL_MODES = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU", nn.RNNCell: "RNN_TANH"}


@dataclass
class Step:
    """One step of a step-wise recurrence: what its hooks saw."""

    total_h: Tensor | None = None  # gradient at the step's hidden state (all consumers)
    total_c: Tensor | None = None  # LSTMCell: gradient at c_t from outside the cell call
    carried: list[Tensor | None] = field(default_factory=list)  # from the next step's nodes
    # cells: the step's input, the state it started from and its outputs (detached), for
    # the path c_t -> h_t of an LSTMCell and for the propagation diagnostics
    x: Tensor | None = None
    hx: tuple[Tensor, ...] | None = None
    h: Tensor | None = None
    c: Tensor | None = None
    c_hook_has_h_path: bool = False  # whether the hook on c_t already sees the h_t path

    def add(self, slot: str, grad: Tensor) -> None:
        """Accumulate a hooked gradient (several backward passes may reach the same step)."""
        old = getattr(self, slot)
        setattr(self, slot, grad if old is None else old + grad)


@dataclass
class StepSequence:
    """The steps of one unrolled sequence (one name in the report)."""

    name: str
    module_name: str
    kind: str
    module: nn.Module | None = None
    steps: list[Step] = field(default_factory=list)
    outputs: tuple[Tensor, ...] = ()  # the last step's output tensors, to detect continuation
    forward_index: int = 0  # which forward pass of the traced model the sequence belongs to
    on_grad: Callable[[], None] | None = None  # told whenever a hooked gradient arrives
    handles: list[Any] = field(default_factory=list)

    def hook(self, tensor: Tensor, store: Callable[[Tensor], None]) -> None:
        """Register a gradient hook that passes the gradient to ``store`` and changes nothing."""

        def fn(grad: Tensor | None) -> None:
            if grad is None:  # an unused output of a multi-output node
                return
            try:
                store(grad.detach().clone())
                if self.on_grad is not None:
                    self.on_grad()
            except Exception:  # monitoring must never crash training: the step reads zero
                pass

        self.handles.append(tensor.register_hook(fn))

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.steps.clear()
        self.outputs = ()
        self.module = None


def _norms(x: Tensor | None, like: Tensor) -> Tensor:
    """Per-sample norms of a step gradient; zeros where no gradient arrived."""
    if x is None:
        size = like.shape[0] if like.dim() > 1 else 1
        return torch.zeros(size, dtype=torch.float64, device=like.device)
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return sample_norms(x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1))


def consumes(out: Tensor, source: Tensor, depth: int = 4) -> bool:
    """Whether ``out``'s autograd graph reads ``source`` within ``depth`` nodes.

    ``nn.LSTMCell`` is a composite of autograd ops on some devices (h = o * tanh(c) then
    reads c, so a hook on c sees the h path) and a single fused node on others (it does not).
    """
    target, frontier = source.grad_fn, [out.grad_fn]
    for _ in range(depth):
        nxt = []
        for fn in frontier:
            if fn is None:
                continue
            for child, _ in fn.next_functions:
                if child is target:
                    return True
                nxt.append(child)
        frontier = nxt
    return False


# Largest deviation of the recomputed cell outputs from the recorded ones for the propagation
# curve to be trusted (recorded under autocast, outputs are low precision: looser).
_CELL_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}


def _cell_trajectory(seq: StepSequence, device: torch.device):
    """The cell's recurrence set up from the recorded steps, the deviation of its recomputed
    outputs from the recorded ones (device scalar), the weight that keys the power
    iterations and the batch size; ``None`` when the steps cannot be stacked (varying batch,
    missing records)."""
    cell, steps = seq.module, seq.steps
    mode = next((m for cls, m in _CELL_MODES.items() if isinstance(cell, cls)), None)
    if mode is None or not steps:
        return None
    if any(st.x is None or st.hx is None or st.h is None for st in steps):
        return None
    if mode == "RNN_TANH" and getattr(cell, "nonlinearity", "tanh") == "relu":
        mode = "RNN_RELU"
    dtype = torch.float64 if cell.weight_hh.dtype == torch.float64 else torch.float32

    def stacked(parts: list[Tensor]) -> Tensor:
        return torch.stack(
            [(p if p.dim() == 2 else p.unsqueeze(0)).to(device, dtype) for p in parts]
        )

    try:
        x = stacked([st.x for st in steps])
        h_prev = stacked([st.hx[0] for st in steps])
        c_prev = stacked([st.hx[1] for st in steps]) if mode == "LSTM" else None
        real = stacked([st.h for st in steps])
    except RuntimeError:  # steps of different batch sizes
        return None

    def weight(name: str) -> Tensor | None:
        w = getattr(cell, name, None)
        return None if w is None else w.detach().to(device, dtype)

    weights = LayerWeights(
        weight("weight_ih"), weight("weight_hh"), weight("bias_ih"), weight("bias_hh")
    )
    rec = make_recurrence(mode, weights, reverse=False)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        out = rec.from_states(x, h_prev, c_prev)
        deviation = relative_deviation([out], [real])
    return rec, deviation, cell.weight_hh, x.shape[1]


def _lstm_cell_path(cell: nn.LSTMCell, step: Step, dh: Tensor) -> Tensor:
    """The gradient reaching c_t through h_t = o * tanh(c_t) inside the same cell call."""
    assert step.x is not None and step.hx is not None and step.c is not None
    dtype = torch.float64 if cell.weight_hh.dtype == torch.float64 else torch.float32
    H = cell.hidden_size
    x, h = step.x.to(dtype), step.hx[0].to(dtype)
    pre_o = x @ cell.weight_ih[3 * H :].detach().to(dtype).t()
    pre_o = pre_o + h @ cell.weight_hh[3 * H :].detach().to(dtype).t()
    if cell.bias:
        pre_o = pre_o + (cell.bias_ih[3 * H :] + cell.bias_hh[3 * H :]).detach().to(dtype)
    tc = torch.tanh(step.c.to(dtype))
    return dh.to(dtype) * torch.sigmoid(pre_o) * (1 - tc * tc)


def build_step_report(seq: StepSequence, thresholds: Thresholds | None = None) -> ModuleReport:
    """Reduce the hooked per-step gradients of one sequence to a report.

    Per-step values stay on the gradients' device; all of them reach the host in one copy.
    """
    T = len(seq.steps)
    first = next((s.x for s in seq.steps if s.x is not None), None)
    columns: dict[str, list[Tensor]] = {"total": [], "carried": [], "direct": [], "cell_total": []}
    batch = torch.zeros(T, dtype=torch.int64)
    received = False
    is_lstm = seq.kind == "LSTMCell"
    for t, st in enumerate(seq.steps):
        like = st.c if st.c is not None else (st.x if st.x is not None else first)
        like = like if like is not None else torch.zeros(1)
        carried_h = st.carried[0] if st.carried else None
        total_h = st.total_h
        direct_h = (
            None if total_h is None else (total_h if carried_h is None else total_h - carried_h)
        )
        received = received or total_h is not None
        n_total = _norms(total_h, like)
        batch[t] = n_total.shape[0]
        columns["total"].append(n_total.mean())
        columns["direct"].append(_norms(direct_h, like).mean())
        n_carried = _norms(carried_h, like)
        for extra in st.carried[1:]:
            n_carried = torch.hypot(n_carried, _norms(extra, like))
        columns["carried"].append(n_carried.mean())
        if is_lstm:
            dc = st.total_c
            if (
                total_h is not None
                and not st.c_hook_has_h_path
                and isinstance(seq.module, nn.LSTMCell)
            ):
                via_h = _lstm_cell_path(seq.module, st, total_h)
                dc = via_h if dc is None else dc.to(via_h.dtype) + via_h
            columns["cell_total"].append(_norms(dc, like).mean())
    device = first.device if first is not None else torch.device("cpu")
    stats = {
        k: (torch.stack([v.to(device) for v in col]) if col else torch.zeros(T, device=device))
        .float()
        .view(1, 1, T)
        for k, col in columns.items()
        if k != "cell_total" or is_lstm
    }
    device_values = {**stats, **stepwise_quantities(stats)}
    cell = _cell_trajectory(seq, device)
    if cell is not None:  # a cell loop: the true propagation through the cell's Jacobians
        rec, deviation, key, batch_size = cell
        lengths = torch.full((batch_size,), T)
        device_values.update(fused_quantities({(0, 0): rec}, None, lengths, stats, {(0, 0): key}))
        device_values["deviation"] = deviation.reshape(())
    host = to_host(device_values)  # the only device-to-host copy
    deviation = host.pop("deviation", None)
    if deviation is not None and not float(deviation) <= _CELL_TOLERANCE[rec.w.w_hh.dtype]:
        # the recorded steps do not follow the cell's equations (a subclass?): fall back to
        # the estimate from the actual gradient rather than report a wrong propagation
        for k in [k for k in host if k not in ("total", "carried", "direct", "cell_total")]:
            if k != "actual_gain":
                host.pop(k)
    report = ModuleReport(
        name=seq.name,
        module_name=seq.module_name,
        kind=seq.kind,
        num_layers=1,
        num_directions=1,
        total=host.pop("total"),
        carried=host.pop("carried"),
        direct=host.pop("direct"),
        cell_total=host.pop("cell_total", None),
        valid_samples=batch,
        source="hooks",
        received_gradient=received,
    )
    return diagnose(report, host, thresholds or Thresholds(), [False])
