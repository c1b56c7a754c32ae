"""Finding the recurrent modules of a model, by qualified name."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from gradwatch._base.errors import UnsupportedModuleError
from gradwatch._capture.fused import check_fused_module

__all__ = ["RECURRENT_TYPES", "Selector", "cell_kind", "display_name", "find_recurrent_modules"]

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)
_CELL_KINDS = ((nn.LSTMCell, "LSTMCell"), (nn.GRUCell, "GRUCell"), (nn.RNNCell, "RNNCell"))

Selector = str | type[nn.Module]


def display_name(model: nn.Module, qualified: str) -> str:
    """The report name of a module: its qualified name, or the class name for the root."""
    return qualified or type(model).__name__


def cell_kind(module: nn.Module) -> str | None:
    """``"LSTMCell"``, ``"GRUCell"`` or ``"RNNCell"`` for a cell (or a subclass), else ``None``."""
    for cls, kind in _CELL_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def _matches(name: str, module: nn.Module, selectors: Iterable[Selector]) -> bool:
    for s in selectors:
        if isinstance(s, str) and fnmatch.fnmatchcase(name, s):
            return True
        if isinstance(s, type) and isinstance(module, s):
            return True
    return False


def _check_selectors(selectors: Iterable[Selector] | None, arg: str) -> list[Selector]:
    if selectors is None:
        return []
    if isinstance(selectors, str | type):
        selectors = [selectors]
    out = list(selectors)
    for s in out:
        if not isinstance(s, str | type):
            raise TypeError(
                f"{arg} must hold module names (fnmatch patterns) or module types, got {s!r}"
            )
    return out


def find_recurrent_modules(
    model: nn.Module,
    include: Iterable[Selector] | None = None,
    exclude: Iterable[Selector] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Every recurrent module of ``model`` (fused modules and cells, subclasses included).

    ``include`` / ``exclude`` take qualified-name patterns (``"encoder.*"``) or module types.
    Raises `UnsupportedModuleError` naming the module when one cannot be measured.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradwatch needs an nn.Module, got {type(model).__name__}")
    inc = _check_selectors(include, "include")
    exc = _check_selectors(exclude, "exclude")
    found = []
    for qualified, module in model.named_modules():
        if not isinstance(module, RECURRENT_TYPES):
            continue
        name = display_name(model, qualified)
        if inc and not _matches(name, module, inc):
            continue
        if exc and _matches(name, module, exc):
            continue
        if isinstance(module, nn.RNNBase):
            try:
                check_fused_module(name, module)
            except ValueError as e:
                raise UnsupportedModuleError(str(e)) from None
        elif cell_kind(module) is None:
            raise UnsupportedModuleError(
                f"module {name!r}: {type(module).__name__} derives from nn.RNNCellBase but not "
                "from nn.RNNCell, nn.LSTMCell or nn.GRUCell, so its step equations are unknown; "
                "exclude it or mark its state with gradwatch.mark_state()"
            )
        found.append((name, module))
    return found
