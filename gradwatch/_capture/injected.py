"""The gradient injected into each watched module's outputs, gathered at almost no cost.

Between captures this is all a recorder does for a fused module: at each call, one autograd
pre-hook per distinct node that produced the call's outputs (outputs of one node share it;
on the CPU an LSTM's output, ``h_n`` and ``c_n`` come from three nodes); the hook keeps a
reference to the gradient, nothing more.
When the pass completes (an end-of-pass callback, queued once per pass) its gradients join
the window's; an aborted pass never completes and its gradients are dropped, and a pass
that trains nothing (``torch.autograd.grad``) is not counted. The norms are computed once,
at the end of the optimizer step, in the same ``torch._foreach_norm`` call as the parameter
gradients (`gradwatch._engine.signals`).

Held gradients are released at the end of the step, before the optimizer runs. With
several backward passes per step (gradient accumulation, truncated BPTT) those of the
earlier passes are reduced to one norm per module at the next call of a watched module
(`fold`), so at most one pass's gradients are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from math import hypot
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd import Variable

from gradwatch._capture.norms import device_norms, host_norms
from gradwatch._capture.own_time import OwnTime
from gradwatch._capture.passes import PassClassifier

__all__ = ["InjectedGradients", "InjectedGrads"]


class InjectedGrads(NamedTuple):
    """One window's injected gradients: ``grads[k]`` reached the outputs of watched module
    ``owners[k]``; ``folded[i]``: the norm of module ``i``'s gradients already reduced
    (a float for CPU gradients, a float64 device tensor otherwise; ``None``: none)."""

    grads: list[Tensor]
    owners: list[int]
    folded: list[float | Tensor | None]


class InjectedGradients:
    """Collects the gradients reaching the outputs of ``size`` watched modules.

    ``params[i]``: parameters of module ``i``, checked first when a pass is classified;
    ``fail(i, why)`` is told about a hook that failed (monitoring never raises).
    """

    def __init__(
        self,
        size: int,
        passes: PassClassifier,
        params: list[tuple[Tensor, ...]],
        fail: Callable,
        own_time: OwnTime | None = None,
    ) -> None:
        self.size = size
        self._own = own_time or OwnTime()  # the backward hooks' time counts as gradwatch's
        self._passes = passes
        self._params = params
        self._fail = fail
        self._pending: dict[int, list[tuple[int, Tensor]]] = {}  # by pass, until it completes
        self._reset()

    def _reset(self) -> None:
        self._grads: list[Tensor] = []
        self._owners: list[int] = []
        self._folded: list[float | Tensor | None] = [None] * self.size

    # -- in forward ----------------------------------------------------------------------
    def watch(self, index: int, outputs: tuple[Tensor | None, ...]) -> None:
        """Hook the outputs of one call of module ``index`` (those that need a gradient)."""
        if self._grads:  # a new forward pass: reduce the earlier passes' gradients
            self.fold()
        nodes: dict[Any, list[int]] = {}
        for t in outputs:
            if t is None or not t.requires_grad:
                continue
            node = t.grad_fn
            if node is None:  # a leaf (cannot come out of a module's computation, but...)
                t.register_hook(partial(self._arrive, index))
                continue
            slots = nodes.get(node)
            if slots is None:
                nodes[node] = [t.output_nr]
            else:
                slots.append(t.output_nr)
        for node, slots in nodes.items():
            node.register_prehook(_prehook(self._arrive, index, slots))

    # -- in backward ---------------------------------------------------------------------
    def _arrive(self, index: int, grad: Tensor | None) -> None:
        if grad is None:  # an output that got no gradient in this pass
            return
        own = self._own
        start = own.clock()
        try:
            self._keep(index, grad)
        finally:
            own.ns += own.clock() - start

    def _keep(self, index: int, grad: Tensor) -> None:
        try:
            running = self._passes.current(self._params[index])
            if not running.trains:
                return
            if grad.requires_grad:  # create_graph=True: keep the value, not its graph
                grad = grad.detach()
            task = running.task
            if task == -1:  # not inside a pass (a hook called by hand): count it now
                self._grads.append(grad)
                self._owners.append(index)
                return
            pending = self._pending.get(task)
            if pending is None:
                pending = self._pending[task] = []
                Variable._execution_engine.queue_callback(partial(self._completed, task))
            pending.append((index, grad))
        except Exception as e:  # monitoring must never crash training
            self._fail(index, f"could not measure a gradient: {e!r}")

    def _completed(self, task: int) -> None:
        own = self._own
        start = own.clock()
        for index, grad in self._pending.pop(task, ()):
            self._grads.append(grad)
            self._owners.append(index)
        own.ns += own.clock() - start

    def add(self, index: int, grad: Tensor) -> None:
        """Count a gradient of a completed pass (a recorded call applies its own)."""
        self._grads.append(grad)
        self._owners.append(index)

    # -- at the end of the step -----------------------------------------------------------
    def fold(self) -> None:
        """Reduce the held gradients to one norm per module (and release them)."""
        grads, owners = self._grads, self._owners
        self._grads, self._owners = [], []
        cpu = [g.device.type == "cpu" for g in grads]
        host = host_norms([g for g, c in zip(grads, cpu, strict=True) if c]) if any(cpu) else []
        dev = [g for g, c in zip(grads, cpu, strict=True) if not c]
        device = device_norms(dev, dev[0].device).unbind() if dev else ()
        h = d = 0
        for i, c in zip(owners, cpu, strict=True):
            old = self._folded[i]
            if c:
                v: Any = host[h]
                h += 1
                if isinstance(old, Tensor):
                    v = torch.hypot(old, torch.tensor(v, dtype=torch.float64, device=old.device))
                elif old is not None:
                    v = hypot(old, v)
            else:
                v = device[d]
                d += 1
                if old is not None:
                    v = torch.hypot(torch.as_tensor(old, dtype=torch.float64, device=v.device), v)
            self._folded[i] = v

    def take(self) -> InjectedGrads:
        """This window's gradients; starts the next window."""
        out = InjectedGrads(self._grads, self._owners, self._folded)
        self._reset()
        return out

    def empty(self) -> bool:
        """Whether nothing reached the hooks since the window started."""
        return not (self._pending or self._grads) and self._folded.count(None) == self.size

    def clear(self) -> None:
        """Drop everything: at the end of a window (what was not taken belongs to it, and the
        gradients of a pass that never completed, aborted by an exception, are dropped
        here), and when closing."""
        if self._pending:
            self._pending.clear()
        if self._grads or self._folded.count(None) != self.size:
            self._reset()


def _prehook(arrive: Callable[[int, Tensor | None], None], index: int, slots: list[int]):
    """An autograd pre-hook of a node giving ``arrive`` the gradient of each slot: autograd
    runs it after every tensor hook on the tensor, so it sees the gradient the node really
    received (see `gradwatch._capture.steps.observe_gradient`)."""
    if len(slots) == 1:
        (nr,) = slots

        def one(grad_outputs: tuple[Tensor | None, ...]) -> None:
            arrive(index, grad_outputs[nr] if nr < len(grad_outputs) else None)

        return one

    def several(grad_outputs: tuple[Tensor | None, ...]) -> None:
        for nr in slots:
            arrive(index, grad_outputs[nr] if nr < len(grad_outputs) else None)

    return several
