"""Recurrence families: one module each, behind one small interface.

A family knows one way to obtain the per-step gradients of a kind of recurrence: which
modules it claims, how it hooks them and records their calls into a `Recorder`, and how it
turns one record into a `RawCapture`. Capture only iterates the registered families.

Every module of this package is imported the first time the families are asked for, and
registers its family with `register` when imported: adding a family means adding one module
here (see docs/architecture.md). The built-in ones are ``fused`` (``nn.RNN`` / ``nn.LSTM`` /
``nn.GRU``, replayed), ``cells`` (``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` loops,
hooked) and ``marked`` (states marked with ``gradwatch.mark_state``).
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch._capture.raw import RawCapture

if TYPE_CHECKING:
    from gradwatch._capture.recorder import Recorder

__all__ = [
    "Family",
    "Record",
    "family_of",
    "looked_for",
    "register",
    "registered",
    "unregister",
]


class Record(Protocol):
    """What a family adds to a `Recorder`: one call or one sequence of steps."""

    name: str  # the report name, from `Recorder.new_name`
    module_name: str

    def release(self) -> None:
        """Drop every hook and saved tensor."""
        ...


class Family(ABC):
    """One way of capturing a kind of recurrence. Subclass, instantiate, `register`.

    Only `capture` is required: a family whose records come from a function the user calls
    (like ``mark_state``) claims no module and hooks nothing.
    """

    #: Short name, for messages and the registry.
    name: ClassVar[str]
    #: What it finds by type, for "no recurrent module found" messages ("" for none).
    looks_for: ClassVar[str] = ""
    #: The failure text when `capture` raises: ``"<failure>: <error>"``.
    failure: ClassVar[str] = "could not build the report"

    def claims(self, module: nn.Module) -> bool:
        """Whether ``module`` is a recurrence of this family (found by type)."""
        return False

    def check(self, name: str, module: nn.Module) -> str | None:
        """Why a claimed module cannot be measured; ``None`` when it can."""
        return None

    def hook(self, recorder: Recorder, name: str, module: nn.Module) -> list[RemovableHandle]:
        """Register the module hooks that record ``module``'s calls into ``recorder``
        (through `Recorder.new_name` and `Recorder.add`); return their handles."""
        return []

    @abstractmethod
    def capture(self, record: Any) -> RawCapture:
        """What one of this family's records measured. Device tensors only: no value is
        read back to the host here (the analysis copies everything at once)."""


_REGISTRY: list[Family] = []
_discovered = False


def register(family: Family) -> Family:
    """Add ``family`` to the registry (after the existing ones: the first family that claims
    a module gets it). Returns it, so a module can write ``FAMILY = register(MyFamily())``."""
    if not isinstance(family, Family):
        raise TypeError(f"register() needs a Family instance, got {family!r}")
    if all(f is not family for f in _REGISTRY):
        _REGISTRY.append(family)
    return family


def unregister(family: Family) -> None:
    """Remove ``family`` from the registry (tests register toy families)."""
    _REGISTRY[:] = [f for f in _REGISTRY if f is not family]


def registered() -> tuple[Family, ...]:
    """Every registered family, importing this package's modules on the first call."""
    global _discovered
    if not _discovered:
        _discovered = True
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            importlib.import_module(f"{__name__}.{info.name}")
    return tuple(_REGISTRY)


def looked_for() -> str:
    """What the registered families find by type, e.g. ``"nn.RNN, nn.LSTM, nn.GRU, ..."``."""
    return ", ".join(f.looks_for for f in registered() if f.looks_for)


def family_of(module: nn.Module) -> Family | None:
    """The first registered family that claims ``module``; ``None``: not a recurrence."""
    return next((f for f in registered() if f.claims(module)), None)
