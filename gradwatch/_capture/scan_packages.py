"""Where real packages keep their diagonal scans, and how to observe them without patching.

Each recogniser names the classes it knows (by module and class name, so that no package is
imported here), says why a configuration cannot be measured, and hooks a module so that every
call with gradients becomes one `gradwatch._capture.families.scan.ScanCall`:

* mambapy ``MambaBlock`` and Hugging Face ``MambaMixer`` (with ``use_mambapy=True``): the
  scan is one autograd node, mambapy's ``PScan``; it is found in the call's own graph (nodes
  created after the call's inputs), its saved input is ``a`` (``exp(Δ A)``, ``[B, T, D, N]``),
  and hooks on it read ``direct`` (its output gradient) and ``total`` (what it sends to ``u``);
* minGRU and minLSTM (minGRU-pytorch): a log-space scan; the gates are the output of the
  ``to_hidden_and_gate`` (``to_hidden_and_f_i_gate``) projection (minGRU: ``log a_t =
  -softplus(gate)``; minLSTM: ``log a_t = log f'_t``), the states are the input of ``to_out``,
  so forward hooks on those two submodules see everything, and ``total`` is rebuilt from
  ``direct`` by the recursion of the scan. A call of one step (``x.shape[1] == 1``, the
  sequential mode, chained through ``prev_hidden``) is one step of a recurrence that runs
  across calls: its state (the input of ``to_out``) is recorded as `gradwatch.mark_state`
  records a state, so consecutive calls in one forward pass form one sequence (kind
  ``"custom"``: hooked, the propagation estimated from the measured per-step factor).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LOOKS_FOR", "check_lengths", "check_scan_args", "recogniser"]

Record = Callable[..., None]


def check_scan_args(
    name: str,
    a: Tensor,
    u: Tensor | None,
    h: Tensor | None,
    time_dim: int,
    log_a: bool,
    extras: dict[str, Tensor | None],
) -> tuple[torch.Size, int]:
    """Validate a `gradwatch.mark_scan` declaration; returns the state shape and ``time_dim``
    made non-negative. Raises ``TypeError``/``ValueError`` naming the scan and the argument."""
    where = f"gradwatch.mark_scan({name!r})"
    if not isinstance(name, str) or not name:
        raise ValueError(f"gradwatch.mark_scan: name must be a non-empty string, got {name!r}")
    for arg, value in {"a": a, "u": u, "h": h, **extras}.items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{where}: {arg} must be a tensor, got {type(value).__name__}")
    if u is None and h is None:
        raise ValueError(f"{where}: give u (the scan input) or h (the states), or both")
    ref = u if u is not None else h
    assert ref is not None
    if ref.dim() < 2:
        raise ValueError(f"{where}: u/h must be [B, T, *state], got {tuple(ref.shape)}")
    if u is not None and h is not None and u.shape != h.shape:
        raise ValueError(f"{where}: u {tuple(u.shape)} and h {tuple(h.shape)} differ in shape")
    if not -ref.dim() <= time_dim < ref.dim() or time_dim % ref.dim() == 0:
        raise ValueError(
            f"{where}: time_dim={time_dim} is not a dimension of u/h {tuple(ref.shape)} other "
            "than the batch dimension 0"
        )
    if log_a and a.is_complex():
        raise ValueError(f"{where}: with log_a=True, a must be real (log |a_t|)")
    for arg, value in {"a": a, **extras}.items():
        if value is not None and not _broadcasts(value, ref):
            raise ValueError(
                f"{where}: {arg} {tuple(value.shape)} must have the same number of dimensions "
                f"as u/h {tuple(ref.shape)} and broadcast to it (size 1 where it is shared)"
            )
    return ref.shape, time_dim % ref.dim()


def check_lengths(name: str, lengths: Tensor | None, batch: int) -> None:
    """Validate the ``lengths`` of a `gradwatch.mark_scan` declaration (shape and dtype only:
    reading its values would synchronise a device)."""
    if lengths is None:
        return
    where = f"gradwatch.mark_scan({name!r})"
    if not isinstance(lengths, Tensor):
        raise TypeError(f"{where}: lengths must be a tensor, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(
            f"{where}: lengths must hold integers (steps per sample), got {lengths.dtype}; "
            "from a padding mask, pass mask.sum(1)"
        )
    if tuple(lengths.shape) != (batch,):
        raise ValueError(
            f"{where}: lengths must be [B] = [{batch}] (one length per sample), "
            f"got {tuple(lengths.shape)}"
        )


def _broadcasts(x: Tensor, ref: Tensor) -> bool:
    try:
        return x.dim() == ref.dim() and torch.broadcast_shapes(x.shape, ref.shape) == ref.shape
    except RuntimeError:
        return False


def _find_node(output: Any, inputs: tuple[Any, ...], type_name: str) -> Any:
    """The autograd node named ``type_name`` created by this call: reachable from ``output``
    through nodes newer than every input (an earlier layer's node is older than its input)."""
    grads = [t for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None]
    bound = max((t.grad_fn._sequence_nr() for t in grads), default=-1)
    frontier = [output.grad_fn] if isinstance(output, Tensor) and output.grad_fn else []
    seen: set[int] = set()
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == type_name:
            return node
        for child, _ in node.next_functions:
            if child is not None and child._sequence_nr() > bound:
                frontier.append(child)
    return None


class PScanMamba:
    """mambapy ``MambaBlock`` and transformers ``MambaMixer``: the ``PScan`` autograd node."""

    classes = (
        ("mambapy.mamba", "MambaBlock"),
        ("transformers.models.mamba.modeling_mamba", "MambaMixer"),
    )

    def unsupported(self, module: nn.Module) -> str | None:
        cls = type(module).__name__
        config = getattr(module, "config", None)
        if cls == "MambaBlock" or any(c.__name__ == "MambaBlock" for c in type(module).__mro__):
            if config is not None and getattr(config, "use_cuda", False):
                return (
                    "mambapy MambaBlock with use_cuda=True runs mamba_ssm's CUDA kernel, where the "
                    "states never exist as tensors; use use_cuda=False or gradwatch.mark_scan"
                )
            if config is not None and not getattr(config, "pscan", True):
                return (
                    "mambapy MambaBlock with pscan=False scans in a Python loop whose states are "
                    "local variables; use pscan=True (same values) or gradwatch.mark_scan"
                )
            return None
        if not getattr(module, "use_mambapy", False) or importlib.util.find_spec("mambapy") is None:
            return (
                "transformers MambaMixer scans in a Python loop whose states are local variables "
                "unless config.use_mambapy=True with mambapy installed (pure PyTorch, the same "
                "values); set it, or declare the scan with gradwatch.mark_scan"
            )
        return None

    def hook(
        self,
        module: nn.Module,
        capturing: Callable[[], bool],
        record: Record,
        failed: Callable,
        step: Callable,
    ) -> list[RemovableHandle]:
        def on_call(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not (capturing() and torch.is_grad_enabled()):
                return
            try:
                out = output[0] if isinstance(output, tuple) else output
                node = _find_node(out, (*args, *kwargs.values()), "PScanBackward")
                if node is None:  # a single-token step or a cached call: no scan here
                    return
                a = node.saved_tensors[0].detach()  # exp(Δ A): [B, T, D, N]
                A = -torch.exp(mod.A_log.detach().float())  # [D, N]
                # Δ from a_t = exp(Δ_t A) on the slowest state column (the least underflow)
                step = a[..., 0].double().log() / A[:, 0].double()
                spec = {"a": a, "log_a": False, "time_dim": 1, "shape": a.shape, "step": step}
                record(spec, node=node, u_index=1)
            except Exception as e:  # monitoring must never crash training
                failed(f"could not record the scan: {e!r}")

        return [module.register_forward_hook(on_call, with_kwargs=True)]


def _log_g(x: Tensor) -> Tensor:
    """minGRU's log of its positive candidate activation (appendix B.3 of Feng et al., 2024)."""
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


class MinGRU:
    """minGRU-pytorch ``minGRU``: hooks on ``to_hidden_and_gate`` and ``to_out``."""

    classes: tuple[tuple[str, str], ...] = (("minGRU_pytorch.minGRU", "minGRU"),)
    projection = "to_hidden_and_gate"

    def unsupported(self, module: nn.Module) -> str | None:
        ok = isinstance(getattr(module, self.projection, None), nn.Module)
        ok = ok and isinstance(getattr(module, "to_out", None), nn.Module)
        return None if ok else f"{type(module).__name__} without {self.projection}/to_out"

    def scan_parts(self, projected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(log a_t, u_t, input gate)`` of the scan from the projection's output."""
        hidden, gate = projected.chunk(2, dim=-1)
        log_a = -F.softplus(gate)  # the scan's own log coefficients
        u = (-F.softplus(-gate) + _log_g(hidden)).exp()
        return log_a, u, torch.sigmoid(gate)

    def initial_state(self, prev_hidden: Tensor) -> Tensor:
        """``h_{-1}`` as the scan uses the ``prev_hidden`` argument (log of it)."""
        return prev_hidden.detach()[:, -1]

    def hook(
        self,
        module: nn.Module,
        capturing: Callable[[], bool],
        record: Record,
        failed: Callable,
        step: Callable[[Tensor], None],
    ) -> list[RemovableHandle]:
        """Hooks recording each parallel call as a scan (``record``) and each one-step call
        (the sequential mode) as one step of a marked state (``step``)."""
        call: dict[str, Any] = {}

        def on_start(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            call.clear()
            x = args[0] if args else kwargs.get("x")
            if not (capturing() and torch.is_grad_enabled() and x is not None):
                return
            if x.shape[1] == 1:  # the sequential mode: one step, chained by prev_hidden
                call["single"] = True
                return
            prev = args[1] if len(args) > 1 else kwargs.get("prev_hidden")
            call["h0"] = None if prev is None else self.initial_state(prev)

        def on_projection(mod: nn.Module, args: tuple, output: Tensor) -> None:
            if call:
                call["projected"] = output.detach()

        def on_states(mod: nn.Module, args: tuple) -> None:
            if call.pop("single", False):
                try:
                    if isinstance(args[0], Tensor) and args[0].requires_grad:
                        step(args[0])
                except Exception as e:  # monitoring must never crash training
                    failed(f"could not record a step: {e!r}")
                call.clear()
                return
            if not call or "projected" not in call:
                return
            try:
                h = args[0]
                with torch.no_grad():
                    log_a, u, gate = self.scan_parts(call.pop("projected"))
                spec = {
                    "a": log_a,
                    "log_a": True,
                    "time_dim": 1,
                    "shape": h.shape,
                    "u_values": u,
                    "h_values": h.detach(),
                    "h_initial": call.pop("h0", None),
                    "input_gate": gate,
                }
                call.clear()
                record(spec, h=h)
            except Exception as e:  # monitoring must never crash training
                failed(f"could not record the scan: {e!r}")

        return [
            module.register_forward_pre_hook(on_start, with_kwargs=True),
            getattr(module, self.projection).register_forward_hook(on_projection),
            module.to_out.register_forward_pre_hook(on_states),
        ]


class MinLSTM(MinGRU):
    """minGRU-pytorch ``minLSTM``: the same hooks on ``to_hidden_and_f_i_gate``; the scan of
    Feng et al. (2024, appendix B.3.2): ``a_t = f'_t``, ``u_t = i'_t g(h~_t)`` with the
    normalised gates ``f' = f / (f + i)``, ``i' = i / (f + i)``."""

    classes = (("minGRU_pytorch.minLSTM", "minLSTM"),)
    projection = "to_hidden_and_f_i_gate"

    def scan_parts(self, projected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden, f_gate, i_gate = projected.chunk(3, dim=-1)
        diff = F.softplus(-f_gate) - F.softplus(-i_gate)  # log i - log f
        log_f, log_i = -F.softplus(diff), -F.softplus(-diff)
        return log_f, (log_i + _log_g(hidden)).exp(), log_i.exp()

    def initial_state(self, prev_hidden: Tensor) -> Tensor:
        # minLSTM starts its scan from g(prev_hidden), not from prev_hidden itself
        return _log_g(prev_hidden.detach()[:, -1]).exp()


_RECOGNISERS: tuple[Any, ...] = (PScanMamba(), MinGRU(), MinLSTM())
LOOKS_FOR = (
    "mambapy MambaBlock",
    "transformers MambaMixer",
    "minGRU and minLSTM (minGRU-pytorch)",
)


def recogniser(module: nn.Module) -> Any:
    """The recogniser of ``module``'s class (or a base class); ``None`` when unknown."""
    for cls in type(module).__mro__:
        key = (cls.__module__, cls.__name__)
        for rec in _RECOGNISERS:
            if key in rec.classes:
                return rec
    return None
