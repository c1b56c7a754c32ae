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

from gradwatch.capture.stats import sample_norms
from gradwatch.quantities import stepwise_quantities, to_host
from gradwatch.report import ModuleReport
from gradwatch.verdicts import Thresholds, diagnose

__all__ = ["StepSequence", "build_step_report"]


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
    host = to_host({**stats, **stepwise_quantities(stats)})  # the only device-to-host copy
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
