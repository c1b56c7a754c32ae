"""Exact per-step gradients for recurrences unrolled by user code: cell loops and marked states.

Here every step's state is a real tensor in the autograd graph, so hooks give the exact
values directly: a tensor hook on the state gives the total (`hook_step`), and post-hooks on
the autograd nodes of the next step that read the state give the carried part
(`hook_carried`); the direct part is their difference. The state itself is passed on
untouched: an identity view in between would change the order in which autograd sums the
gradient contributions, and with it the last bits of the parameter gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch._capture.stats import sample_norms

__all__ = [
    "Step",
    "StepSequence",
    "consumes",
    "hook_carried",
    "hook_step",
    "observe_gradient",
    "step_stats",
]


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
    # cells: the weights the step's forward read (never re-read: see _capture.weights)
    weights: dict[str, Tensor | None] = field(default_factory=dict)

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
    # hands each hooked gradient's store function to the recorder (which applies it when
    # the backward pass completes, if that pass trains); ``None``: store at once
    deliver: Callable[[Callable[[], None]], None] | None = None
    handles: list[Any] = field(default_factory=list)

    def receive(self, store: Callable[[], None]) -> None:
        if self.deliver is None:
            store()
        else:
            self.deliver(store)

    def hook(self, tensor: Tensor, store: Callable[[Tensor], None]) -> None:
        """Observe the gradient reaching ``tensor`` and pass it to ``store``; changes nothing.

        Observed at the node that produced the tensor (`observe_gradient`): after every
        tensor hook of the user's, whenever it was registered, so the value is what the
        recurrence actually received.
        """

        def fn(grad: Tensor | None) -> None:
            if grad is None:  # an unused output of a multi-output node
                return
            # monitoring must never crash training: on an error the step reads zero
            with contextlib.suppress(Exception):
                self.receive(partial(store, grad.detach().clone()))

        self.handles.append(observe_gradient(tensor, fn))

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
    rows = x.shape[0] if x.dim() > 1 else 1
    return sample_norms(x.reshape(rows, x[0].numel() if rows and x.dim() > 1 else x.numel()))


def _mean(norms: Tensor) -> Tensor:
    """The batch mean of per-sample norms; zero for an empty batch (no sample measured)."""
    return norms.mean() if norms.numel() else norms.new_zeros(())


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


def hook_step(seq: StepSequence, tensor: Tensor, step: Step, slot: str) -> None:
    """Record the total gradient reaching a step's state ``tensor`` into ``step.<slot>``."""
    if tensor.requires_grad:
        seq.hook(tensor, partial(step.add, slot))


def hook_carried(
    seq: StepSequence,
    prev: Step,
    state: tuple[Tensor, ...],
    bound: int,
    outputs: tuple[Tensor, ...],
) -> None:
    """Hook the autograd nodes of one step that read the state it received.

    The nodes created by the step are those reachable from its ``outputs`` with a sequence
    number above ``bound`` (every input was made before the step). A post-hook on each node
    that consumes a state tensor sees that node's gradient for it; their sum is the carried
    part of the previous step ``prev``. Post-hooks only observe: no value, no order of
    accumulation changes.
    """
    prev.carried = [None] * len(state)
    targets = {
        (id(t.grad_fn), t.output_nr): i
        for i, t in enumerate(state)
        if t.requires_grad and t.grad_fn is not None
    }
    if not targets:
        return
    seen: set[int] = set()
    frontier = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        edges = []
        for k, (child, nr) in enumerate(node.next_functions):
            if child is None:
                continue
            slot = targets.get((id(child), nr))
            if slot is not None:
                edges.append((k, slot))
            elif child._sequence_nr() > bound and id(child) not in seen:
                frontier.append(child)
        if edges:
            seq.handles.append(node.register_hook(partial(_on_carried, seq, prev, edges)))


def graph_bound(tensors: tuple[Tensor, ...]) -> int:
    """The highest autograd sequence number among ``tensors``' nodes (-1 for none): every
    node a later step creates has a higher one."""
    return max((t.grad_fn._sequence_nr() for t in tensors if t.grad_fn), default=-1)


def _on_carried(seq: StepSequence, prev: Step, edges, grad_inputs, grad_outputs) -> None:
    try:
        got = [
            (slot, grad_inputs[k].detach().clone())
            for k, slot in edges
            if grad_inputs[k] is not None
        ]
        seq.receive(partial(_add_carried, prev, got))
    except Exception:  # monitoring must never crash training: the step reads zero
        pass


def _add_carried(prev: Step, got: list[tuple[int, Tensor]]) -> None:
    for slot, g in got:
        old = prev.carried[slot]
        prev.carried[slot] = g if old is None else old + g


def observe_gradient(tensor: Tensor, fn: Callable[[Tensor | None], None]) -> Any:
    """Call ``fn`` with the gradient reaching ``tensor`` in each backward pass; returns the
    removable handle.

    A pre-hook on the node that produced the tensor, reading the tensor's slot: autograd
    runs it after every tensor hook registered on the tensor (before or after this one), so
    ``fn`` sees the gradient the producing computation really received. A leaf has no such
    node: a tensor hook then (it sees the gradient before later tensor hooks).
    """
    node = tensor.grad_fn
    if node is None:
        return tensor.register_hook(fn)
    nr = tensor.output_nr

    def pre(grad_outputs: tuple[Tensor | None, ...]) -> None:
        fn(grad_outputs[nr] if nr < len(grad_outputs) else None)

    return node.register_prehook(pre)


def step_stats(
    seq: StepSequence, cell_path: Callable[[Step, Tensor], Tensor] | None = None
) -> tuple[dict[str, Tensor], Tensor, bool]:
    """The hooked per-step gradients of one sequence reduced to ``[1, 1, T]`` statistics.

    Returns ``(stats, valid_samples, received_gradient)``: ``stats`` on the gradients'
    device (``cell_total`` only with ``cell_path``, which gives the gradient reaching c_t
    through h_t inside the same step where the hook on c_t does not see it).
    """
    T = len(seq.steps)
    first = next((s.x for s in seq.steps if s.x is not None), None)
    columns: dict[str, list[Tensor]] = {"total": [], "carried": [], "direct": [], "cell_total": []}
    batch = torch.zeros(T, dtype=torch.int64)
    received = False
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
        columns["total"].append(_mean(n_total))
        columns["direct"].append(_mean(_norms(direct_h, like)))
        n_carried = _norms(carried_h, like)
        for extra in st.carried[1:]:
            n_carried = torch.hypot(n_carried, _norms(extra, like))
        columns["carried"].append(_mean(n_carried))
        if cell_path is not None:
            dc = st.total_c
            if total_h is not None and not st.c_hook_has_h_path:
                via_h = cell_path(st, total_h)
                dc = via_h if dc is None else dc.to(via_h.dtype) + via_h
            columns["cell_total"].append(_mean(_norms(dc, like)))
    device = first.device if first is not None else torch.device("cpu")
    stats = {
        k: (torch.stack([v.to(device) for v in col]) if col else torch.zeros(T, device=device))
        .float()
        .view(1, 1, T)
        for k, col in columns.items()
        if k != "cell_total" or cell_path is not None
    }
    return stats, batch, received
