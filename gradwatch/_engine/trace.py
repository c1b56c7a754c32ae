"""``gradwatch.trace``: capture and analyse the per-timestep hidden-state gradients of one step."""

from __future__ import annotations

import warnings
from functools import partial

from torch import nn

from gradwatch._analysis import analyze
from gradwatch._analysis.report import ModuleReport, Report
from gradwatch._analysis.verdicts import Thresholds
from gradwatch._base.errors import (
    BackwardNotRunError,
    CaptureError,
    GradwatchError,
    NoRecurrentModuleError,
    UnsupportedModuleError,
)
from gradwatch._capture import Recorder, Selectors, select_modules
from gradwatch._capture.families import looked_for

__all__ = ["Trace", "trace"]


class Trace:
    """Capture of the exact ``dL/dh_t`` of every recurrent module call inside a ``with`` block.

    Use it through `trace`. Inside the block, run forward and backward as usual; the
    values are computed at the end of each backward pass, before any optimizer step. After
    the block every hook is removed and every saved tensor released; `report` returns
    the result.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Selectors | None = None,
        exclude: Selectors | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        selection = select_modules(model, include, exclude)
        if selection.unsupported:
            raise UnsupportedModuleError(selection.unsupported[0][2])
        self.model = model
        self.thresholds = thresholds
        self.selection = selection
        self._recorder = Recorder(model, selection.watched, partial(analyze, thresholds=thresholds))
        self._state = "new"
        self._report: Report | None = None
        if selection.unmatched and selection.watched:
            warnings.warn(
                f"gradwatch.trace({type(model).__name__}): {', '.join(selection.unmatched)} "
                "matched no recurrent module",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def names(self) -> list[str]:
        """The watched modules' names (marked states come on top of these)."""
        return self.selection.names

    # -- context manager -----------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self._state != "new":
            raise GradwatchError("a gradwatch trace can be entered only once; create a new one")
        self._state = "active"
        self._recorder.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self._recorder.detach()
        self._state = "closed"
        try:
            self._report = self._build_report(complete=True)
        except GradwatchError as e:  # raised again by report(), with the same text
            self._error: GradwatchError | None = e
        else:
            self._error = None
        finally:
            self._recorder.release()

    # -- results ---------------------------------------------------------------------------
    def report(self, strict: bool = True) -> Report:
        """The per-call reports, in call order.

        Raises a `GradwatchError` subclass with the reason when
        nothing could be measured, and, with ``strict`` (the default), a
        `CaptureError` when some call failed; with ``strict=False``
        those failures are listed in ``Report.failures`` instead.
        """
        if self._state != "closed":
            self._report = self._build_report(complete=False)
        elif self._report is None:
            raise self._error or GradwatchError("the trace recorded nothing")
        if strict:
            self._report.raise_failures()
        return self._report

    def _build_report(self, complete: bool) -> Report:
        model = type(self.model).__name__
        recorder = self._recorder
        if not self.selection.watched and not recorder.recorded:
            raise NoRecurrentModuleError(self._nothing_found(model))
        if not recorder.recorded and recorder.failures:  # the real cause first
            _, failures = recorder.results(complete=False)
            raise CaptureError(
                f"gradwatch.trace({model}): "
                + "; ".join(f"{n}: {why}" for n, why in failures.items())
            )
        if not recorder.recorded:
            names = ", ".join(repr(n) for n in self.names)
            raise GradwatchError(
                f"gradwatch.trace({model}): the recurrent modules {names} were not called with "
                "gradients enabled inside the trace (was the forward pass run under "
                "torch.no_grad() or outside the `with` block?)"
            )
        if not recorder.backward_seen and recorder.only_untrained:
            names = ", ".join(repr(n) for n in recorder.recorded)
            raise BackwardNotRunError(
                f"gradwatch.trace({model}): only backward passes that train nothing (such as "
                f"torch.autograd.grad) reached {names}; a report describes the passes that "
                "accumulate into parameter gradients: call loss.backward() inside the `with` "
                "block"
            )
        if not recorder.backward_seen:
            names = ", ".join(repr(n) for n in recorder.recorded)
            raise BackwardNotRunError(
                f"gradwatch.trace({model}): no backward pass reached {names}; call "
                "loss.backward() inside the `with` block before asking for the report"
            )
        results, failures = recorder.results(complete=complete)
        modules: dict[str, ModuleReport] = dict(results)
        return Report(modules=modules, failures=failures)

    def _nothing_found(self, model: str) -> str:
        filters = ""
        if self.selection.unmatched:
            filters = f" ({', '.join(self.selection.unmatched)} matched no recurrent module)"
        return (
            f"gradwatch.trace({model}): no recurrent module found among its "
            f"{self.selection.searched} modules{filters} (looked for {looked_for()} and their "
            "subclasses), and no state was marked with gradwatch.mark_state()"
        )


def trace(
    model: nn.Module,
    *,
    include: Selectors | None = None,
    exclude: Selectors | None = None,
    thresholds: Thresholds | None = None,
) -> Trace:
    """Trace the exact per-timestep hidden-state gradients of ``model``'s recurrent modules.

    ```python
    with gradwatch.trace(model) as tr:
        loss = loss_fn(model(x), y)
        loss.backward()
    rep = tr.report()
    rep["encoder.rnn"].total     # [num_layers, num_directions, T]
    ```

    Fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` calls are measured by replaying their
    recurrence after backward; cells (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``) called
    step by step and states marked with `mark_state` are measured by hooks. Training
    is not changed: losses, parameter gradients and the RNG state are bit-identical.

    Args:
        model: The module to watch; its recurrent submodules are found by type.
        include: Only watch modules whose qualified name matches this ``fnmatch`` pattern
            or that are instances of this type, or of any of an iterable of them.
        exclude: Do not watch modules matching this pattern or type (or any of several).
        thresholds: The `gradwatch.Thresholds` for the reports' verdicts (default
            thresholds when ``None``).

    Raises:
        ValueError: ``include`` or ``exclude`` is not a pattern, a type or an iterable of them.
        UnsupportedModuleError: a watched module has a configuration that cannot be measured.
    """
    return Trace(model, include=include, exclude=exclude, thresholds=thresholds)
