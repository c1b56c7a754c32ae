"""The time gradwatch spends in its own hooks, for the overhead budget (`gradwatch._engine`).

One `OwnTime` per `Recorder`, shared with the objects whose hooks autograd calls directly
(`gradwatch._capture.injected`), so every hook body adds to one counter that the monitor
reads and resets at the end of each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["OwnTime"]


class OwnTime:
    """A nanosecond counter and the clock it is measured with (replaceable in tests)."""

    __slots__ = ("clock", "ns")

    def __init__(self) -> None:
        self.clock: Callable[[], int] = time.perf_counter_ns
        self.ns = 0
