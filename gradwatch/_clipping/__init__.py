"""Optional gradient clipping: classical and adaptive strategies behind one framework-free Clipper.

See ``docs/clipping.md``. Nothing here knows about Lightning: the callback hands the Clipper
unscaled, reduced gradients and honours the returned `ClipEvent`.
"""

from gradwatch._clipping.clipper import ClipEvent, Clipper
from gradwatch._clipping.strategies import (
    AGC,
    STRATEGY_NAMES,
    AutoClip,
    ClipStrategy,
    NormClip,
    ValueClip,
    ZScoreClip,
    resolve_strategy,
)

__all__ = [
    "AGC",
    "STRATEGY_NAMES",
    "AutoClip",
    "ClipEvent",
    "ClipStrategy",
    "Clipper",
    "NormClip",
    "ValueClip",
    "ZScoreClip",
    "resolve_strategy",
]
