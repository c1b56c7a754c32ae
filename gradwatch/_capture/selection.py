"""Which modules of a model are watched: the one selection used by trace, Monitor and GradWatch.

A module is recurrent when a registered family (`gradwatch._capture.families`) claims it;
``include`` / ``exclude`` then filter by qualified name (``fnmatch`` patterns) or by type.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from gradwatch._capture.families import Family

__all__ = [
    "Selection",
    "Selector",
    "Selectors",
    "describe_selectors",
    "display_name",
    "normalize_selectors",
    "select_modules",
]

Selector = str | type[nn.Module]
#: What ``include`` / ``exclude`` accept: one pattern, one type, or an iterable of them.
Selectors = Selector | Iterable[Selector]


def display_name(model: nn.Module, qualified: str) -> str:
    """The report name of a module: its qualified name, or the class name for the root."""
    return qualified or type(model).__name__


def normalize_selectors(value: Any, argument: str) -> tuple[Selector, ...] | None:
    """``include`` / ``exclude`` as a tuple, validated; ``None`` stays ``None``.

    A single pattern or type becomes a one-element tuple (a string is never split into its
    characters), so the result pickles and compares as given. Raises ``ValueError`` naming
    ``argument`` for anything else.
    """
    if value is None:
        return None
    if isinstance(value, str | type):
        items: tuple[Any, ...] = (value,)
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise ValueError(
                f"{argument} must be a module name pattern (fnmatch, e.g. 'encoder.*'), an "
                f"nn.Module subclass, or an iterable of them; got {value!r}"
            ) from None
    for s in items:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise ValueError(
                f"{argument} must hold module name patterns (fnmatch, e.g. 'encoder.*') or "
                f"nn.Module subclasses, got {s!r}"
            )
    return items


def _matches(name: str, module: nn.Module, selector: Selector) -> bool:
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(name, selector)
    return isinstance(module, selector)


def describe_selectors(selectors: Iterable[Selector]) -> str:
    """``'enc*', nn.LSTM`` style, for messages."""
    return ", ".join(repr(s) if isinstance(s, str) else s.__name__ for s in selectors)


@dataclass(frozen=True)
class Selection:
    """The outcome of `select_modules`.

    Attributes:
        watched: ``(name, module, family)`` of every selected module that can be measured,
            in ``named_modules`` order.
        unsupported: ``(name, module, reason)`` of selected modules that cannot be measured.
        unmatched: The ``include`` / ``exclude`` entries that selected or removed no
            recurrent module, as ``"include='enc*'"`` (a typo, most of the time).
        searched: How many modules the model has.
        all_names: The names of every selected recurrent module, in order.
    """

    watched: tuple[tuple[str, nn.Module, Family], ...]
    unsupported: tuple[tuple[str, nn.Module, str], ...]
    unmatched: tuple[str, ...]
    searched: int
    all_names: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.watched]

    def modules(self) -> list[tuple[str, nn.Module]]:
        """Every selected recurrent module, measurable or not, in ``named_modules`` order
        (a clipping scope uses them)."""
        found = [(n, m) for n, m, _ in self.watched] + [(n, m) for n, m, _ in self.unsupported]
        return sorted(found, key=lambda nm: self.order[nm[0]])

    @property
    def order(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.all_names)}


def select_modules(model: nn.Module, include: Any = None, exclude: Any = None) -> Selection:
    """The recurrent modules of ``model`` selected by ``include`` / ``exclude``.

    Both take a qualified-name pattern (``"encoder.*"``), an ``nn.Module`` subclass, or an
    iterable of them (`normalize_selectors`; a bad value is a ``ValueError`` naming the
    argument). A module is recurrent when a registered family claims it.
    """
    from gradwatch._capture.families import family_of

    if not isinstance(model, nn.Module):
        raise TypeError(f"gradwatch needs an nn.Module, got {type(model).__name__}")
    inc = normalize_selectors(include, "include") or ()
    exc = normalize_selectors(exclude, "exclude") or ()
    used: set[tuple[str, int]] = set()
    watched, unsupported, names, searched = [], [], [], 0
    for qualified, module in model.named_modules():
        searched += 1
        family = family_of(module)
        if family is None:
            continue
        name = display_name(model, qualified)
        hits_in = [i for i, s in enumerate(inc) if _matches(name, module, s)]
        hits_ex = [i for i, s in enumerate(exc) if _matches(name, module, s)]
        used.update(("include", i) for i in hits_in)
        used.update(("exclude", i) for i in hits_ex)
        if (inc and not hits_in) or hits_ex:
            continue
        names.append(name)
        why = family.check(name, module)
        if why is None:
            watched.append((name, module, family))
        else:
            unsupported.append((name, module, why))
    unmatched = tuple(
        f"{arg}={describe_selectors([s])}"
        for arg, items in (("include", inc), ("exclude", exc))
        for i, s in enumerate(items)
        if (arg, i) not in used
    )
    return Selection(tuple(watched), tuple(unsupported), unmatched, searched, tuple(names))
