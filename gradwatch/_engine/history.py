"""`ReportHistory`: the captured reports of a run, by optimizer step, easy to reach."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from gradwatch._analysis.report import Report

__all__ = ["ReportHistory"]


class ReportHistory(Mapping[int, Report]):
    """Captured reports keyed by optimizer step, oldest first (a read-only snapshot).

    ``history[step]`` is the report captured at ``step``. Steps are never negative, so a
    negative key counts from the newest, like a list index: ``history[-1]`` is the latest
    report, ``history[-2]`` the one before. `latest` is ``None`` before any capture.

    Example:
        ```python
        gw.reports[-1]["encoder.rnn"].verdict   # the latest capture
        gw.reports.latest_step                  # its optimizer step
        for step, report in gw.reports.items(): ...
        ```
    """

    def __init__(self, items: Mapping[int, Report] | Iterable[tuple[int, Report]] = ()) -> None:
        self._data: dict[int, Report] = dict(items)

    def __getitem__(self, step: int) -> Report:
        if isinstance(step, int) and not isinstance(step, bool) and step < 0:
            steps = list(self._data)
            if -step > len(steps):
                raise KeyError(
                    f"{step}: the history holds {len(steps)} report(s) "
                    "(a negative key counts from the newest)"
                )
            step = steps[step]
        return self._data[step]

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def latest(self) -> Report | None:
        """The newest report, ``None`` when nothing was captured yet."""
        return next(reversed(self._data.values()), None)

    @property
    def latest_step(self) -> int | None:
        """The optimizer step of the newest report."""
        return next(reversed(self._data), None)

    @property
    def steps(self) -> list[int]:
        """The captured optimizer steps, oldest first."""
        return list(self._data)

    def __repr__(self) -> str:
        return f"ReportHistory(steps={self.steps})"
