"""Which backward pass is running, and whether it trains.

A report describes the gradient that trains the step: the backward passes that accumulate
into parameter gradients (``loss.backward()``, ``torch.autograd.backward``, Lightning's
``manual_backward``). A ``torch.autograd.grad`` pass (saliency maps, input gradients, the
first half of a gradient penalty) reaches the same module outputs but trains nothing, so
its gradients are not counted.

Inside a gradient hook, autograd tells which graph task (pass) runs
(``torch._C._current_graph_task_id``) and whether a node will execute in it
(``torch._C._will_engine_execute_node``): a pass trains when the gradient accumulator of
some parameter will run. A pass running with ``create_graph=True`` runs its hooks with
gradients enabled.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Pass", "PassClassifier", "current_task", "in_backward"]


def current_task() -> int:
    """The id of the backward pass running in this thread; -1 outside backward."""
    return int(torch._C._current_graph_task_id())


def in_backward() -> bool:
    """Whether the calling code runs inside a backward pass (e.g. a recomputation under
    activation checkpointing)."""
    return current_task() != -1


@dataclass(frozen=True)
class Pass:
    """One backward pass: its id, whether it trains, whether it builds a graph."""

    task: int
    trains: bool
    create_graph: bool


def _accumulator(p: Tensor) -> Any:
    """``p``'s gradient accumulator node (``None`` for a non-leaf or a frozen tensor)."""
    if not p.requires_grad or p.grad_fn is not None:
        return None
    with torch.enable_grad():
        return p.view_as(p).grad_fn.next_functions[0][0]


def _will_execute(node: Any) -> bool:
    """Whether ``node`` runs in the current pass."""
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # autograd.grad(loss, [p]): p's gradient is returned, not accumulated
        return False


def _will_accumulate(p: Tensor) -> bool:
    """Whether ``p``'s gradient accumulator runs in the current pass."""
    return _will_execute(_accumulator(p))


class PassClassifier:
    """Classifies the running pass once per pass (cached by pass id)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self._cache: dict[int, Pass] = {}
        # the accumulator of each `first` parameter, by id, with the parameter: held like
        # DDP holds them (the parameter keeps using this node), so that classifying a pass
        # costs one call instead of building a view of a parameter
        self._accumulators: dict[int, tuple[Tensor, Any]] = {}

    def current(self, first: Iterable[Tensor] = ()) -> Pass:
        """The running pass; ``first``: parameters likely to be in it (checked first)."""
        task = current_task()
        known = self._cache.get(task)
        if known is not None:
            return known
        if len(self._cache) > 64:  # passes are short-lived: keep the recent ones only
            self._cache.clear()
        result = Pass(task, self._trains(first), torch.is_grad_enabled())
        self._cache[task] = result
        return result

    def _trains(self, first: Iterable[Tensor]) -> bool:
        if current_task() == -1:  # not in a pass (a hook called by hand): count it
            return True
        seen: set[int] = set()
        for p in first:  # usually decides at the first parameter
            seen.add(id(p))
            if _will_execute(self._accumulator_of(p)):
                return True
        model = self._model()
        params = [] if model is None else [p for p in model.parameters() if p.requires_grad]
        if not params:  # nothing to train: every pass describes the model's gradients
            return True
        return any(_will_accumulate(p) for p in params if id(p) not in seen)

    def _accumulator_of(self, p: Tensor) -> Any:
        held = self._accumulators.get(id(p))
        if held is not None and held[0] is p and p.requires_grad:
            return held[1]
        node = _accumulator(p)
        if node is not None:
            if len(self._accumulators) > 256:  # parameters replaced many times: start over
                self._accumulators.clear()
            self._accumulators[id(p)] = (p, node)
        return node
