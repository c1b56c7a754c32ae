"""Reading a module's weights without side effects.

A parametrized weight (``torch.nn.utils.parametrize``: spectral_norm, weight_norm,
orthogonal, custom ones) is recomputed at every attribute access, and some
parametrizations change state when they run (spectral_norm's power iteration updates its
``_u``/``_v`` buffers in place in training mode). Reading ``module.weight_hh`` after the
forward would run it once more and change training. So capture never reads a weight by
attribute: fused modules keep the tensors their forward used (``_flat_weights``, refreshed by
the forward itself), and cells get theirs from `ParametrizedOutputs`, which observes the
values the cell's own forward computed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["ParametrizedOutputs", "forward_weight", "raw_parameter"]


def raw_parameter(module: nn.Module, name: str) -> Tensor | None:
    """The tensor behind ``module.<name>`` without evaluating anything: the parameter
    itself, or a parametrized weight's original parameter (a stable key, e.g. for the warm
    start of the power iterations)."""
    if name in module._parameters:
        return module._parameters[name]
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        original = getattr(plist, "original", None)
        if original is None:
            original = getattr(plist, "original0", None)
        return original
    value = module.__dict__.get(name)
    return value if isinstance(value, Tensor) else None


class ParametrizedOutputs:
    """The latest value of each parametrized weight of a module, as its forward computed it.

    A forward hook on the parametrization (a ``ParametrizationList`` module) sees the value
    each time the module's forward reads the weight; nothing is evaluated here. Under
    ``parametrize.cached()`` the forward reuses a cached value and the hook does not run: the
    latest value seen is then still the one in use.
    """

    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}

    def hook(self, recorder: Any, module: nn.Module) -> list[Any]:
        """Hook every parametrization of ``module``; returns the handles."""
        handles = []
        plists = getattr(module, "parametrizations", None)
        if plists is None:
            return handles
        for name, plist in plists.items():
            handles.append(recorder.forward_hook(plist, self._seen, name, with_kwargs=False))
        return handles

    def _seen(self, recorder: Any, name: str, plist: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self.values[name] = output.detach()


def forward_weight(module: nn.Module, name: str, seen: ParametrizedOutputs | None) -> Tensor | None:
    """The tensor ``module``'s forward read as ``module.<name>``, read without running a
    parametrization: the observed value for a parametrized weight, else the attribute
    (a parameter, or the tensor ``torch.func.functional_call`` swapped in)."""
    if parametrize.is_parametrized(module, name):
        return None if seen is None else seen.values.get(name)
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None
