"""Family: diagonal linear recurrences ``h_t = a_t ⊙ h_{t-1} + u_t`` (SSMs, minGRU, LRU).

Two identities make the capture exact and cheap (docs/linear_recurrences.md):

* ``u_t`` enters only ``h_t``, with coefficient 1, so the gradient reaching ``u_t`` is the
  total ``dL/dh_t``; the gradient reaching the state sequence ``h`` as a tensor (what the scan
  returns) is the part entering from outside the recurrence, ``direct``;
* the one-step Jacobian is ``diag(a_t)``, so ``carried_t = conj(a_{t+1}) ⊙ dL/dh_{t+1}``, and
  the propagation curve, gain and horizon follow from ``a`` in closed form (the analysis reads
  the `Transition`; no replay).

Gradients are observed with hooks that only read: a tensor hook on ``u`` (or ``h``), or, for a
scan computed by one autograd node, a pre-hook (its output gradient: ``direct``) and a
post-hook (what it sends to ``u``: ``total``) on that node. Nothing is wrapped or replaced, so
autograd sums every contribution in the same order as without gradwatch.

Whatever is observed twice is cross-checked, and the result is the call's ``fidelity``: with
``total`` and ``direct`` the identity ``total_t = direct_t + conj(a_{t+1}) total_{t+1}``, with
the values of ``u`` and ``h`` the recurrence itself. A declaration that does not satisfy them
(a wrong ``time_dim``, an ``a`` from another scan) is reported ``exact=False``, never silently.

Records come from `mark_scan` and from the package recognisers of
`gradwatch._capture.scan_packages` (mambapy, Hugging Face Mamba, minGRU), which this family
claims modules for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradwatch._capture import scan_packages
from gradwatch._capture.families import Family, register
from gradwatch._capture.families.marked import MARKED
from gradwatch._capture.raw import RawCapture, Transition
from gradwatch._capture.recorder import active_recorder
from gradwatch._capture.stats import relative_deviation, sample_norms, step_mean

if TYPE_CHECKING:
    from gradwatch._capture.recorder import Recorder

__all__ = ["SCAN", "ScanCall", "ScanFamily", "mark_scan"]

# Largest relative deviation of the cross-checks for the values to count as exact: a package's
# own backward (a parallel or log-space scan) rounds differently from the identity.
_TOLERANCE = {torch.float64: 1e-9, torch.complex128: 1e-9}
_DEFAULT_TOLERANCE = 1e-4
_REASON = (
    "the declared scan does not satisfy h_t = a_t * h_(t-1) + u_t or its gradient identity "
    "(relative deviation {fidelity:.3g} > {tolerance:g}): check time_dim and that a, u and h "
    "belong to the same scan"
)


@dataclass
class ScanCall:
    """One declared or recognised scan of one forward pass: references and hooked gradients."""

    name: str
    module_name: str
    a: Tensor  # detached transition (log |a| when log_a), broadcastable to `shape`
    log_a: bool
    time_dim: int
    shape: torch.Size  # [B, ..., T, ...] of the state sequence
    u_values: Tensor | None = None  # detached, for the forward cross-check
    h_values: Tensor | None = None
    h_initial: Tensor | None = None  # h_{-1} when known (else the check starts at t = 1)
    step: Tensor | None = None  # step size Δ (Mamba), detached
    input_gate: Tensor | None = None  # detached
    lengths: Tensor | None = None  # [B] steps covered per sample (right padding), as given
    total: Tensor | None = None  # dL/du_t = dL/dh_t, summed over backward passes
    direct: Tensor | None = None  # dL/d(h as a tensor): from outside the recurrence
    on_grad: Any = None
    handles: list[Any] = field(default_factory=list)

    def _store(self, slot: str, grad: Tensor | None) -> None:
        if grad is None:
            return
        try:
            # Kept by reference: autograd never writes into a gradient someone else holds.
            grad = grad.detach()
            old = getattr(self, slot)
            setattr(self, slot, grad if old is None else old + grad)
            if self.on_grad is not None:
                self.on_grad()
        except Exception:  # monitoring must never crash training: the step reads zero
            pass

    def hook_tensor(self, tensor: Tensor, slot: str) -> None:
        """Read the gradient of ``tensor`` into ``slot`` (``"total"`` for u, ``"direct"`` for h)."""
        if tensor.requires_grad:
            self.handles.append(tensor.register_hook(lambda g: self._store(slot, g)))

    def hook_node(self, node: Any, u_index: int) -> None:
        """Read both parts at one autograd node computing ``h = scan(a, u)``: its output
        gradient is ``direct``, what it sends to its input ``u_index`` is ``total``."""

        def pre(grad_outputs: tuple[Tensor | None, ...]) -> None:
            self._store("direct", grad_outputs[0])

        def post(grad_inputs: tuple[Tensor | None, ...], grad_outputs: Any) -> None:
            self._store("total", grad_inputs[u_index])

        self.handles.append(node.register_prehook(pre))
        self.handles.append(node.register_hook(post))

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.u_values = self.h_values = self.h_initial = None
        self.step = self.input_gate = self.total = self.direct = self.lengths = None


# -- reduction -------------------------------------------------------------------------------
def _flat(x: Tensor, call: ScanCall) -> Tensor:
    """``[B, T, S]``: batch first, time second, every state dimension flattened."""
    x = x.expand(call.shape).movedim(call.time_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _real(x: Tensor) -> Tensor:
    return torch.view_as_real(x) if x.is_complex() else x


def _norms(x: Tensor, valid: Tensor | None) -> Tensor:
    """Per-step mean of per-sample norms over the state, over the samples that cover the step
    (``valid`` ``[T, B]``; ``None``: all), float32 ``[1, 1, T]``."""
    n = sample_norms(x.abs() if x.is_complex() else x).transpose(0, 1)
    return step_mean(n, valid).view(1, 1, -1)


def _valid(call: ScanCall, steps: int, device: torch.device) -> Tensor | None:
    """``[T, B]``: whether sample b covers step t (``t < lengths[b]``); ``None``: all do."""
    if call.lengths is None:
        return None
    time = torch.arange(steps, device=device).unsqueeze(1)
    return time < call.lengths.to(device).unsqueeze(0)


def _masked(x: Tensor, valid: Tensor | None) -> Tensor:
    """``x`` ``[B, T', S]`` with the steps past each sample's end zeroed (``valid`` ``[T', B]``)
    so that the cross-checks compare only covered steps."""
    if valid is None:
        return x
    return torch.where(valid.t().unsqueeze(-1), x, torch.zeros((), dtype=x.dtype))


def _shift_back(a: Tensor, total: Tensor) -> Tensor:
    """``carried_t = conj(a_{t+1}) ⊙ total_{t+1}``, zero at the last step."""
    carried = torch.zeros_like(total)
    carried[:, :-1] = a[:, 1:].conj() * total[:, 1:]
    return carried


def _total_from_direct(a: Tensor, direct: Tensor) -> Tensor:
    """Backprop through time of the recurrence: ``δ_t = direct_t + conj(a_{t+1}) δ_{t+1}``."""
    total = torch.empty_like(direct)
    acc = total[:, -1] = direct[:, -1]
    for t in range(direct.shape[1] - 2, -1, -1):
        acc = direct[:, t] + a[:, t + 1].conj() * acc
        total[:, t] = acc
    return total


def _forward_deviation(call: ScanCall, a: Tensor, valid: Tensor | None) -> Tensor | None:
    """How far the observed ``h`` is from ``a_t ⊙ h_{t-1} + u_t`` over the covered steps
    (relative, device scalar)."""
    if call.u_values is None or call.h_values is None:
        return None
    u, h = _flat(call.u_values, call).to(a.dtype), _flat(call.h_values, call).to(a.dtype)
    pred, real = a[:, 1:] * h[:, :-1] + u[:, 1:], h[:, 1:]
    covered = None if valid is None else valid[1:]
    if call.h_initial is not None:
        h0 = call.h_initial.reshape(h.shape[0], 1, -1).to(a.dtype)
        pred, real, covered = torch.cat([a[:, :1] * h0 + u[:, :1], pred], 1), h, valid
    pred, real = _real(_masked(pred, covered)), _real(_masked(real, covered))
    return relative_deviation([pred], [real])


def _gradients(
    call: ScanCall, a: Tensor, valid: Tensor | None
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """``total``, ``carried``, ``direct`` ``[B, T, S]`` and the gradient cross-check."""
    total = None if call.total is None else _flat(call.total, call).to(a.dtype)
    direct = None if call.direct is None else _flat(call.direct, call).to(a.dtype)
    checks = []
    if total is not None:
        carried = _shift_back(a, total)
        if direct is not None:  # both observed: the gradient identity must hold
            pair = _real(_masked(direct + carried, valid)), _real(_masked(total, valid))
            checks.append(relative_deviation([pair[0]], [pair[1]]))
        direct = total - carried
    elif direct is not None:
        total = _total_from_direct(a, direct)
        carried = total - direct
    else:
        total = carried = direct = torch.zeros_like(a)
    return {"total": total, "carried": carried, "direct": direct}, checks


class ScanFamily(Family):
    name = "scan"
    looks_for = ", ".join(scan_packages.LOOKS_FOR)

    def claims(self, module: nn.Module) -> bool:
        return scan_packages.recogniser(module) is not None

    def check(self, name: str, module: nn.Module) -> str | None:
        rec = scan_packages.recogniser(module)
        return None if rec is None else rec.unsupported(module)

    def hook(self, recorder: Recorder, name: str, module: nn.Module) -> list[RemovableHandle]:
        rec = scan_packages.recogniser(module)
        assert rec is not None

        def record(spec: dict[str, Any], **where: Any) -> None:
            self.record(recorder, name, spec, **where)

        def failed(why: str) -> None:
            recorder.fail(name, why, keep_first=True)

        def step(h: Tensor) -> None:  # one step of a step-by-step call (minGRU's sequential mode)
            MARKED.mark(recorder, name, h)

        return rec.hook(module, lambda: recorder.capturing, record, failed, step)

    def record(
        self,
        recorder: Recorder,
        base: str,
        spec: dict[str, Any],
        *,
        u: Tensor | None = None,
        h: Tensor | None = None,
        node: Any = None,
        u_index: int = 1,
    ) -> ScanCall:
        """Add one scan to ``recorder`` and hook its gradients (tensors ``u``/``h``, or the
        scan's autograd ``node``)."""
        call = ScanCall(name=recorder.new_name(base), module_name=base, **spec)
        call.on_grad = lambda: recorder.gradient_arrived(call)
        if node is not None:
            call.hook_node(node, u_index)
        if u is not None:
            call.hook_tensor(u, "total")
        if h is not None:
            call.hook_tensor(h, "direct")
        recorder.add(call, self)
        return call

    def capture(self, record: ScanCall) -> RawCapture:
        complex_ = any(x is not None and x.is_complex() for x in (record.a, record.total))
        dtype = torch.complex128 if complex_ else torch.float64
        flat_a = _flat(record.a, record)
        log_abs = flat_a.double() if record.log_a else flat_a.abs().double().log()
        a = log_abs.exp().to(dtype) if record.log_a else flat_a.to(dtype)
        batch, steps = a.shape[0], a.shape[1]
        valid = _valid(record, steps, a.device)
        grads, checks = _gradients(record, a, valid)
        forward = _forward_deviation(record, a, valid)
        if forward is not None:
            checks.append(forward)
        fidelity: Tensor | float = 0.0
        if checks:
            fidelity = torch.stack([c.double().reshape(()) for c in checks]).max()
        return RawCapture(
            name=record.name,
            module_name=record.module_name,
            kind="scan",
            num_layers=1,
            num_directions=1,
            stats={k: _norms(v, valid) for k, v in grads.items()},
            valid_samples=_valid_samples(record, batch, steps),
            reverse=(False,),
            source="hooks",
            received_gradient=record.total is not None or record.direct is not None,
            fidelity=fidelity,
            fidelity_tolerance=_TOLERANCE.get(record.a.dtype, _DEFAULT_TOLERANCE),
            fidelity_reason=_REASON,
            transition=_transition(record, log_abs),
        )


def _valid_samples(call: ScanCall, batch: int, steps: int) -> Tensor:
    """``[T]`` on the CPU: how many samples cover each step (from the CPU copy of the
    lengths, as `pack_padded_sequence` keeps them: no device synchronisation then)."""
    if call.lengths is None:
        return torch.full((steps,), batch, dtype=torch.int64)
    lengths = call.lengths.cpu().clamp(0, steps)
    return (torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)).sum(1)


def _transition(call: ScanCall, log_abs: Tensor) -> Transition:
    """The `Transition`; with lengths, the step size and input gate laid out ``[B, T, *]``
    like ``log|a|`` so that the analysis can leave the uncovered steps out."""
    if call.lengths is None:
        return Transition(log_abs, call.step, call.input_gate)

    def flat(x: Tensor | None) -> Tensor | None:
        return None if x is None else _flat(x, call)

    lengths = call.lengths.cpu().clamp(0, log_abs.shape[1])  # kept on the CPU (see Transition)
    return Transition(log_abs, flat(call.step), flat(call.input_gate), lengths)


SCAN = register(ScanFamily())


def mark_scan(
    name: str,
    a: Tensor,
    u: Tensor | None = None,
    h: Tensor | None = None,
    *,
    log_a: bool = False,
    time_dim: int = 1,
    step: Tensor | None = None,
    input_gate: Tensor | None = None,
    h0: Tensor | None = None,
    lengths: Tensor | None = None,
) -> None:
    """Declare a diagonal linear recurrence ``h_t = a_t ⊙ h_{t-1} + u_t``, computed by any scan.

    Call it once per scan and forward pass with the scan's own tensors, after the scan (so
    that ``h`` exists). Nothing is returned and nothing is wrapped: keep using your tensors.

    ```python
    a = torch.exp(delta.unsqueeze(-1) * A)          # [B, T, D, N]
    u = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)
    h = parallel_scan(a, u)                          # sequential, associative or log-space
    gradwatch.mark_scan("ssm", a, u, h)
    ```

    The report (``total``, ``carried``, ``direct``, propagation curve, ``gain``, ``horizon``,
    ``causes.transition``, verdicts) is exact: the gradient reaching ``u_t`` is the total
    ``dL/dh_t``, the gradient reaching ``h`` as a tensor is the part entering from outside
    the recurrence, and the one-step Jacobian is ``diag(a_t)``. The hooks only read gradients,
    so training is bit-identical. Outside a trace or a capture step, with gradients disabled,
    or when neither ``u`` nor ``h`` requires a gradient, it records nothing.

    Args:
        name: The report name; several scans with one name in a forward pass get ``#k``.
        a: The transition ``[B, T, *S]`` (time in ``time_dim`` as for ``u``), real or
            complex; a dimension may be 1 where it is shared (a constant ``a``: ``[1, 1, D]``).
        u: The scan input ``[B, T, *S]``; its gradient is ``total``.
        h: The states ``[B, T, *S]`` the scan returns; its gradient is ``direct``. Without
            ``u`` (a log-space scan never materialises it), ``total`` is rebuilt by the
            recursion ``δ_t = direct_t + conj(a_{t+1}) δ_{t+1}``. With both, the recurrence and
            the gradient identity are cross-checked (``fidelity``; ``exact=False`` above 1e-4).
        log_a: ``a`` holds ``log |a_t|`` (log-space scans such as minGRU's).
        time_dim: The time dimension of ``a``, ``u`` and ``h`` (the batch is dimension 0).
        step: The step size Δ where the model has one (Mamba), for the causes.
        input_gate: The input gate where the model has one (minGRU's ``z_t``), for the causes.
        h0: The initial state ``h_{-1}`` ``[B, *S]``, if not zero, for the cross-check at t = 0.
        lengths: For padded batches, the number of steps each sample covers, ``[B]`` integers
            (right padding: sample b covers steps ``0 .. lengths[b] - 1``; from a mask,
            ``mask.sum(1)``). The steps past a sample's end are left out of everything: the
            per-step means count only the samples that cover the step (``valid_samples``),
            the propagation walks back from each sample's own last step, and the transition
            statistics and cross-checks skip them, so padding never reads as vanishing.
            Keep it on the CPU, as `pack_padded_sequence` does, to avoid a device copy.

    Raises:
        TypeError, ValueError: an argument is not a tensor or does not fit the others; the
            message names the scan and the argument.
    """
    extras = {"step": step, "input_gate": input_gate}
    shape, time_dim = scan_packages.check_scan_args(name, a, u, h, time_dim, log_a, extras)
    scan_packages.check_lengths(name, lengths, shape[0])
    recorder = active_recorder()
    watched = [t for t in (u, h) if t is not None and t.requires_grad]
    if recorder is None or not recorder.capturing or name in recorder.disabled:
        return
    if not torch.is_grad_enabled() or not watched:
        return

    def d(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach()

    spec = {
        "a": a.detach(),
        "log_a": log_a,
        "time_dim": time_dim,
        "shape": shape,
        "u_values": d(u),
        "h_values": d(h),
        "h_initial": d(h0),
        "step": d(step),
        "input_gate": d(input_gate),
        "lengths": d(lengths),
    }
    try:
        SCAN.record(recorder, name, spec, u=u, h=h)
    except Exception as e:  # monitoring must never crash training
        recorder.fail(name, f"could not record the scan: {e!r}", keep_first=True)
