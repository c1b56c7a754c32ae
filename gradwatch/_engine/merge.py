"""Merging the reports of one optimizer step: the calls of several micro-batches (gradient
accumulation, truncated BPTT) and, under DDP, the reports of every rank, into one report per
call name; and undoing the AMP loss scale on captured profiles."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from gradwatch._analysis.report import VERDICTS, ModuleReport, Report
from gradwatch._engine._common import distributed

__all__ = ["build_step_report", "merge_module_reports"]

PER_STEP_FIELDS = ("total", "carried", "direct", "cell_total")


def _weighted(parts: list[Tensor | None], weights: list[Tensor], steps: int) -> Tensor | None:
    if any(p is None for p in parts):
        return None
    num = torch.zeros((*parts[0].shape[:-1], steps), dtype=torch.float64)
    den = torch.zeros(steps, dtype=torch.float64)
    for p, w in zip(parts, weights, strict=True):
        t = p.shape[-1]
        w = w.to(torch.float64)
        used = w > 0
        num[..., :t] += torch.where(used, p.to(torch.float64) * w, torch.zeros((), dtype=num.dtype))
        den[:t] += w
    return (num / den.clamp_min(1)).float()


def merge_module_reports(parts: list[ModuleReport], name: str) -> ModuleReport:
    """Merge the reports of the same call over micro-batches (or DDP ranks) into one.

    The per-step profiles (``total``, ``carried``, ``direct``, ``cell_total``) are means over
    the valid samples of all parts, weighted by ``valid_samples`` at each step: exactly the
    profile one batch holding every sample would give (non-finite values propagate). Summary
    diagnostics (gain, horizon, causes, verdicts, explanation, ...) are per-trajectory and do
    not average; they are taken from the worst part (by verdict, then by number of samples),
    so a problem in one micro-batch is never averaged away. ``nonfinite_at`` is the first one
    found in part order.
    """
    if len(parts) == 1:
        return parts[0] if parts[0].name == name else dataclasses.replace(parts[0], name=name)
    steps = max(p.steps for p in parts)
    weights = [p.valid_samples for p in parts]
    merged = {f: _weighted([getattr(p, f) for p in parts], weights, steps) for f in PER_STEP_FIELDS}
    valid = torch.zeros(steps, dtype=torch.int64)
    for w in weights:
        valid[: w.shape[0]] += w

    def badness(p: ModuleReport) -> tuple[int, int]:
        rank = VERDICTS.index(p.verdict) if p.verdict in VERDICTS else 0
        return rank, int(p.valid_samples.sum())

    worst = max(parts, key=badness)
    reasons = sorted({p.approximate_reason for p in parts if p.approximate_reason})
    nonfinite_at = next((p.nonfinite_at for p in parts if p.nonfinite_at is not None), None)
    return dataclasses.replace(
        worst,
        name=name,
        total=merged["total"],
        carried=merged["carried"],
        direct=merged["direct"],
        cell_total=merged["cell_total"],
        valid_samples=valid,
        exact=all(p.exact for p in parts),
        fidelity=max(p.fidelity for p in parts),
        approximate_reason="; ".join(reasons) or None,
        received_gradient=any(p.received_gradient for p in parts),
        seq_len=max(p.seq_len for p in parts),
        nonfinite_at=nonfinite_at,
    )


def unscale(m: ModuleReport, scale: float) -> ModuleReport:
    """A report with its per-step profiles divided by the AMP loss scale."""
    if scale == 1.0:
        return m
    changes = {f: getattr(m, f) / scale for f in PER_STEP_FIELDS if getattr(m, f) is not None}
    return dataclasses.replace(m, **changes)


def build_step_report(
    results: list[tuple[str, ModuleReport]], failures: dict[str, str], scale: Any
) -> tuple[Report, dict[str, str]]:
    """One step's report from the session's ``(key, report)`` results: calls with the same
    key merged, profiles unscaled, and under DDP the ranks' reports gathered and merged, so
    that every rank holds the same report and the same failures."""
    groups: dict[str, list[ModuleReport]] = {}
    for key, m in results:
        groups.setdefault(key, []).append(m)
    s = 1.0 if scale is None else float(scale)
    modules = {k: unscale(merge_module_reports(v, k), s) for k, v in groups.items()}
    if distributed():  # identical merged report on every rank
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (modules, failures))
        by_key: dict[str, list[ModuleReport]] = {}
        failures = {}
        for mods, fails in gathered:
            for k, m in mods.items():
                by_key.setdefault(k, []).append(m)
            for k, why in fails.items():
                failures.setdefault(k, why)
        modules = {k: merge_module_reports(v, k) for k, v in by_key.items()}
    return Report(modules=modules, failures=dict(failures)), failures
