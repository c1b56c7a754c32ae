"""Out-of-memory errors inside a capture: skip that capture, keep training and watching.

A capture (the replay and its diagnostics) allocates on top of what training holds. If that
allocation fails, the capture of that call is dropped with a warning and the module stays
watched: a later capture, with a smaller batch or more free memory, may fit. Any other error
still stops the watching of that module (it would fail again).
"""

from __future__ import annotations

import torch

__all__ = ["is_out_of_memory"]

# What PyTorch's allocators say when an allocation fails: CUDA ("CUDA out of memory"), the
# CPU allocator ("DefaultCPUAllocator: can't allocate memory"), MPS ("MPS backend out of
# memory").
_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (on any device)."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if isinstance(error, MemoryError) or (oom_type is not None and isinstance(error, oom_type)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _MESSAGES)
