"""Exact per-timestep gradients of fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` calls.

A hook on a fused module's outputs sees only the gradient injected at each step from above;
the gradient carried back through time exists only inside the kernel. So at forward time we
keep references to the call's inputs, initial state, weights and outputs and put gradient
hooks on the outputs (output sequence, ``h_n``, ``c_n``). After backward, the recurrence is
replayed on detached copies with those gradients injected (`.recurrences`). The module's
forward is never replaced, so training is bit-identical with or without a trace. The family
that hooks the modules is `gradwatch._capture.families.fused`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gradwatch._capture.math_mode import TOLERANCE, MathMode
from gradwatch._capture.replay import Replay, replay

__all__ = [
    "EXACT_TOLERANCE",
    "FusedCall",
    "Replay",
    "check_fused_module",
    "output_tensors",
    "record_fused_call",
    "replay",
    "split_output",
]

# Largest relative deviation of the replayed outputs from the real ones for a report to be
# called exact, by the dtype of the replay's own math (kept for callers that replay a call
# themselves). A capture's tolerance follows from the call's math mode (`MathMode.tolerance`).
EXACT_TOLERANCE = {torch.float32: TOLERANCE["float32"], torch.float64: TOLERANCE["float64"]}


@dataclass
class FusedCall:
    """What one call of a fused recurrent module left for the replay."""

    name: str
    module_name: str
    module: nn.RNNBase
    input: Tensor | PackedSequence
    hx: Tensor | None
    cx: Tensor | None
    output: Tensor | PackedSequence
    h_n: Tensor | None  # None: the module does not return its final state
    c_n: Tensor | None
    weights: list[Tensor]
    dropout_active: bool
    # lengths given to a subclass whose forward packs a padded input itself (e.g.
    # pytorch-forecasting's ``rnn(x, lengths=...)``): [B] on the CPU, else None
    lengths: Tensor | None = None
    # how the kernel computed (storage precision, TF32), read at forward time
    mode: MathMode = field(default_factory=MathMode)
    grads: dict[str, Tensor] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    def release(self) -> None:
        """Drop hooks and every saved tensor."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.grads.clear()
        self.input = self.output = self.h_n = torch.empty(0)
        self.hx = self.cx = self.c_n = self.lengths = None
        self.weights = []


def check_fused_module(name: str, module: nn.RNNBase) -> None:
    """Raise ``ValueError`` with the reason if the module cannot be replayed."""
    if module.mode not in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        raise ValueError(f"module {name!r}: unsupported mode {module.mode!r}")
    for w in module._flat_weights:
        if w is not None and (not w.is_floating_point() or w.is_complex()):
            raise ValueError(f"module {name!r}: parameters of dtype {w.dtype} are not supported")


def record_fused_call(
    name: str, module_name: str, module: nn.RNNBase, args: tuple, kwargs: dict, output: Any
) -> FusedCall | None:
    """Keep references to one call's tensors; ``None`` if the call cannot get a gradient.

    Raises ``ValueError`` naming what the module returned when its output sequence cannot
    be found in it (see `split_output`).
    """
    inp = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    out, h_n, c_n = split_output(module_name, module, inp, output)
    out_data = out.data if isinstance(out, PackedSequence) else out
    if not torch.is_grad_enabled() or not out_data.requires_grad:
        return None
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    lengths = _lengths_argument(args, kwargs, inp, out)
    return FusedCall(
        name=name,
        module_name=module_name,
        module=module,
        input=_detach(inp),
        hx=None if h0 is None else h0.detach(),
        cx=None if c0 is None else c0.detach(),
        output=_detach(out),
        h_n=None if h_n is None else h_n.detach(),
        c_n=None if c_n is None else c_n.detach(),
        weights=[w.detach() for w in module._flat_weights],
        dropout_active=module.training and module.dropout > 0 and module.num_layers > 1,
        lengths=lengths,
        mode=MathMode.of_call(out_data),
    )


def _lengths_argument(args: tuple, kwargs: dict, inp: Any, out: Any) -> Tensor | None:
    """Sequence lengths passed to a subclass that packs a padded input inside its forward
    (``forward(x, hx=None, lengths=None, ...)``): without them the replay would treat the
    padding as real steps."""
    lengths = kwargs.get("lengths", args[2] if len(args) > 2 else None)
    if not isinstance(lengths, Tensor) or isinstance(inp, PackedSequence):
        return None
    if not isinstance(out, Tensor) or inp.dim() != 3 or lengths.dim() != 1:
        return None
    if lengths.is_floating_point() or lengths.is_complex():
        return None
    return lengths.detach().to("cpu", torch.int64)


def output_tensors(
    module_name: str, module: nn.RNNBase, inp: Any, call_output: Any
) -> dict[str, Tensor]:
    """The differentiable outputs of a call, by slot name, for gradient hooks."""
    out, h_n, c_n = split_output(module_name, module, inp, call_output)
    slots = {"out": out.data if isinstance(out, PackedSequence) else out, "h_n": h_n, "c_n": c_n}
    return {k: v for k, v in slots.items() if v is not None and v.requires_grad}


def split_output(
    module_name: str, module: nn.RNNBase, inp: Any, output: Any
) -> tuple[Tensor | PackedSequence, Tensor | None, Tensor | None]:
    """``(output sequence, h_n, c_n)`` of one call, whatever structure the module returned.

    ``nn.RNN``/``nn.GRU`` return ``(out, h_n)`` and ``nn.LSTM`` ``(out, (h_n, c_n))``; a
    subclass may return only ``out`` (the ``nn.Sequential`` idiom), a flat tuple, a dict or
    its own structure. The parts are found by value type and shape (the output sequence has
    the input's layout with ``D * P`` features; the states are ``[L * D, B, P]`` and, for an
    LSTM, ``[L * D, B, H]``); a state that is not returned is ``None``. Raises
    ``ValueError`` naming the module and what it returned when no output sequence is found.
    """
    if isinstance(output, tuple) and len(output) == 2 and _is_sequence(output[0]):
        state = output[1]
        if isinstance(state, Tensor):
            return output[0], state, None
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and all(isinstance(t, Tensor) for t in state)
        ):
            return output[0], state[0], state[1]
    leaves = _leaves(output)
    packed = isinstance(inp, PackedSequence)
    num_dir = 2 if module.bidirectional else 1
    width = module.proj_size if module.proj_size > 0 else module.hidden_size
    out = next((v for v in leaves if _is_output(v, inp, packed, num_dir * width)), None)
    if out is None:
        raise ValueError(
            f"module {module_name!r} ({type(module).__name__}) returned {_describe(output)}: "
            f"no output sequence in it (a {'PackedSequence' if packed else 'tensor'} with "
            f"{num_dir * width} features in the input's layout), so its calls cannot be "
            "measured; return the output of nn.RNNBase.forward, alone or in a tuple or dict"
        )
    states = [v for v in leaves if isinstance(v, Tensor) and v is not out]
    lead = module.num_layers * num_dir
    batched = packed or (isinstance(inp, Tensor) and inp.dim() == 3)
    batch = _batch_size(inp, module.batch_first) if batched else None

    def state_shape(size: int) -> tuple[int, ...]:
        return (lead, size) if batch is None else (lead, batch, size)

    h_n = next((v for v in states if tuple(v.shape) == state_shape(width)), None)
    c_n = None
    if module.mode == "LSTM":
        rest = [v for v in states if v is not h_n]
        c_n = next((v for v in rest if tuple(v.shape) == state_shape(module.hidden_size)), None)
    return out, h_n, c_n


def _is_sequence(x: Any) -> bool:
    return isinstance(x, Tensor | PackedSequence)


def _leaves(x: Any) -> list[Any]:
    """Tensors and packed sequences in a returned structure (tuples, lists, dicts), in order."""
    if _is_sequence(x):
        return [x]
    if isinstance(x, tuple | list):
        return [leaf for item in x for leaf in _leaves(item)]
    if isinstance(x, dict):
        return [leaf for item in x.values() for leaf in _leaves(item)]
    return []


def _batch_size(inp: Any, batch_first: bool) -> int:
    if isinstance(inp, PackedSequence):
        return int(inp.batch_sizes[0]) if inp.batch_sizes.numel() else 0
    return int(inp.shape[0 if batch_first else 1])


def _is_output(v: Any, inp: Any, packed: bool, features: int) -> bool:
    if packed:
        return isinstance(v, PackedSequence) and v.data.shape[-1] == features
    if not isinstance(v, Tensor) or not isinstance(inp, Tensor):
        return False
    return tuple(v.shape) == (*inp.shape[:-1], features)


def _describe(x: Any) -> str:
    """A short description of a returned value, for messages."""
    if isinstance(x, Tensor):
        return f"a tensor of shape {list(x.shape)}"
    if isinstance(x, PackedSequence):
        return "a PackedSequence"
    if isinstance(x, tuple | list):
        inner = ", ".join(_describe(v) for v in list(x)[:4])
        return f"a {type(x).__name__} ({inner})"
    if isinstance(x, dict):
        return f"a dict with keys {list(x)[:8]}"
    return f"a {type(x).__name__}"


def _detach(x: Tensor | PackedSequence) -> Tensor | PackedSequence:
    if isinstance(x, PackedSequence):
        return x._replace(data=x.data.detach())
    return x.detach()
