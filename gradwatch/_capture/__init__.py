"""Capture: how the per-timestep hidden-state gradients dL/dh_t are obtained."""

from gradwatch._capture.tracing import Trace, mark_state, trace

__all__ = ["Trace", "mark_state", "trace"]
