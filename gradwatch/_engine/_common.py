"""Small helpers shared by the integration modules: argument checks, DDP queries, warnings,
and what a ``torch.amp.GradScaler`` tells about the current step."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("gradwatch")

Warn = Callable[[str], None]


def scaler_info(scaler: Any, optimizer: Any) -> tuple[Tensor | None, bool, Tensor | None]:
    """``(scale, grads_scaled, found_inf)`` of a ``torch.amp.GradScaler`` for one optimizer.

    ``scale`` is the scaler's scale *tensor* (no host sync), the factor the gradients of
    this step were multiplied by; ``grads_scaled`` tells whether the parameter gradients
    still carry it (they do until ``scaler.unscale_(optimizer)``, which Lightning calls
    before ``on_before_optimizer_step`` except for fused optimizers); ``found_inf`` is the
    scaler's inf/NaN verdict when ``unscale_`` ran. All ``None``/``False`` without a
    scaler.
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None, False, None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # never used for a backward pass yet
        return None, False, None
    grads_scaled, found = True, None
    states = getattr(scaler, "_per_optimizer_states", {})
    st = states.get(id(optimizer)) if optimizer is not None else None
    if st is not None:
        from torch.amp.grad_scaler import OptState

        if st.get("stage") is OptState.UNSCALED:
            grads_scaled = False
            per_dev = list(st.get("found_inf_per_device", {}).values())
            if per_dev:
                found = torch.stack([f.to(per_dev[0].device).reshape(()) for f in per_dev]).sum()
    return scale, grads_scaled, found


def distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def is_rank_zero() -> bool:
    return not distributed() or torch.distributed.get_rank() == 0


def default_warn(message: str) -> None:
    """A warning from rank zero only: the ``gradwatch`` logger and ``warnings.warn``."""
    if is_rank_zero():
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
