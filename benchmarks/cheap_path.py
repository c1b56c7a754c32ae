"""What gradwatch costs on a step that is not captured (the cheap path), in microseconds.

Two models, trained in a plain PyTorch loop with `gradwatch.Monitor` on the CPU:

- ``darts``: the shape of darts' ``RNNModel`` (an ``nn.LSTM`` of hidden size 25, batch-first,
  one input feature, a linear head, training length T 48, batch 32, Adam, MSE at every
  step; darts itself is not needed);
- ``lm``: the project's reference LSTM language model (embedding 64, LSTM 2x256, T 64,
  batch 32, SGD, cross-entropy at every step).

Method: one model and one ``Monitor(every_n_steps=10**9, overhead_budget=None,
spike_factor=math.inf)`` (signals at every step; its only
capture, the first step, falls in the warm-up; the spike detector runs but never triggers a
capture). The run is cut into windows of ``--window`` steps, gradwatch
switched off and on window by window (``off, on, off, ..., off``; off: hooks removed and
``Monitor.step`` not called, so nothing of gradwatch runs). Every step is timed phase by
phase (forward, backward, ``Monitor.step``, optimizer) with ``--clock`` (default: the CPU
time of the training thread, which other processes on a shared machine disturb least).
Each ``on`` window is compared with the mean of its two ``off`` neighbours; the figure is
the median over windows of the difference per step, with the range of the middle 80%.
The per-phase rows say where the cost lands (the forward hooks in ``forward``, the
gradient hooks and end-of-pass callback in ``backward``, signals, detector and
bookkeeping in ``step``). A second, instrumented pass (not timed as above) splits
``Monitor.step`` and the hooks into their parts with ``time.thread_time_ns`` wrappers.

    .venv/bin/python benchmarks/cheap_path.py            # both models
    .venv/bin/python benchmarks/cheap_path.py --quick    # a smoke run (seconds)
    .venv/bin/python benchmarks/cheap_path.py --models darts --windows 40
    .venv/bin/python benchmarks/cheap_path.py --models darts --budget   # between captures
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradwatch

CLOCKS: dict[str, Callable[[], int]] = {
    "thread": time.thread_time_ns,
    "wall": time.perf_counter_ns,
}
PHASES = ("forward", "backward", "step", "optimizer")
#: Only the cheap path: no scheduled capture after the first step, and no spike capture (the
#: detector still runs, its threshold is never reached); a capture costs several steps.
SIGNALS_EVERY_STEP: dict[str, Any] = {
    "every_n_steps": 10**9,
    "overhead_budget": None,
    "spike_factor": math.inf,
}
#: ``--budget``: the default overhead budget spaces the signals (no capture either)
BETWEEN_CAPTURES = {k: v for k, v in SIGNALS_EVERY_STEP.items() if k != "overhead_budget"}
MONITOR = SIGNALS_EVERY_STEP  # what `measure` and `breakdown` watch with (set by `main`)


# -- the models ----------------------------------------------------------------------------
class DartsShaped(nn.Module):
    """darts ``RNNModel``'s module: LSTM(1 -> 25), batch-first, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, 25, batch_first=True)
        self.V = nn.Linear(25, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.V(out)


class LanguageModel(nn.Module):
    """The reference LM: embedding 64, LSTM 2x256, vocabulary head (time-major)."""

    def __init__(self, vocab: int = 1000) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 64)
        self.rnn = nn.LSTM(64, 256, num_layers=2)
        self.head = nn.Linear(256, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(x))
        return self.head(out)


@dataclass
class Setup:
    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cycle(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[Any]:
    while True:
        yield from batches


def make_darts() -> Setup:
    torch.manual_seed(0)
    model = DartsShaped()
    g = torch.Generator().manual_seed(0)
    series = torch.randn(8, 32, 49, 1, generator=g).cumsum(2) * 0.1
    batches = [(s[:, :-1], s[:, 1:]) for s in series]
    return Setup(
        "darts-shaped LSTM 1x25, T 48, B 32",
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        _cycle(batches),
        nn.functional.mse_loss,
    )


def make_lm() -> Setup:
    torch.manual_seed(0)
    model = LanguageModel()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (8, 65, 32), generator=g)
    batches = [(t[:-1], t[1:]) for t in tokens]

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())

    return Setup(
        "reference LM (emb 64, LSTM 2x256, T 64, B 32)",
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        _cycle(batches),
        loss,
    )


MODELS = {"darts": make_darts, "lm": make_lm}


# -- the A/B run ---------------------------------------------------------------------------
@dataclass
class Result:
    label: str
    step_us: float  # a step without gradwatch (median over off windows)
    cost_us: dict[str, float]  # per phase and "total": median over on windows
    low_us: float  # total: 10th percentile over windows
    high_us: float  # total: 90th percentile
    windows: int
    parts_us: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return 1.0 + self.cost_us["total"] / self.step_us


def _set_active(mon: gradwatch.Monitor, on: bool) -> None:
    if on:
        mon._core.attach()
    else:
        mon._core.detach()


def _train_window(s: Setup, mon: gradwatch.Monitor | None, steps: int, clock) -> list[int]:
    """Run ``steps`` steps; returns the summed time of each phase (ns)."""
    sums = [0, 0, 0, 0]
    for _ in range(steps):
        x, y = next(s.batches)
        t0 = clock()
        loss = s.loss(s.model(x), y)
        t1 = clock()
        loss.backward()
        t2 = clock()
        if mon is not None:
            mon.step(s.optimizer)
        t3 = clock()
        s.optimizer.step()
        s.optimizer.zero_grad()
        t4 = clock()
        sums[0] += t1 - t0
        sums[1] += t2 - t1
        sums[2] += t3 - t2
        sums[3] += t4 - t3
    return sums


def measure(make: Callable[[], Setup], windows: int, window: int, clock: str) -> Result:
    s = make()
    tick = CLOCKS[clock]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = gradwatch.Monitor(s.model, **MONITOR)
    _train_window(s, mon, max(window, 5), tick)  # warm-up, the first capture included
    off: list[list[int]] = []
    on: list[list[int]] = []
    for k in range(2 * windows + 1):
        active = k % 2 == 1
        _set_active(mon, active)
        sums = _train_window(s, mon if active else None, window, tick)
        (on if active else off).append(sums)
    names = list(mon.names)
    mon.close()
    per_window: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    for i, sums in enumerate(on):
        neighbours = [(a + b) / 2 for a, b in zip(off[i], off[i + 1], strict=True)]
        diffs = [(a - b) / window / 1000 for a, b in zip(sums, neighbours, strict=True)]
        for p, d in zip(PHASES, diffs, strict=True):
            per_window[p].append(d)
        per_window["total"].append(sum(diffs))
    totals = sorted(per_window["total"])
    base = statistics.median(sum(w) / window / 1000 for w in off)
    return Result(
        s.label,
        base,
        {p: statistics.median(v) for p, v in per_window.items()},
        totals[int(0.1 * (len(totals) - 1))],
        totals[round(0.9 * (len(totals) - 1))],
        windows,
        names=names,
    )


# -- the instrumented pass: where Monitor.step spends its time -----------------------------
def _targets() -> list[tuple[Any, str, str]]:
    """``(owner, attribute, label)`` of the parts of a cheap step that are timed; those
    missing in this version of gradwatch are skipped."""
    from gradwatch._capture import hooks, recorder
    from gradwatch._engine import detector, monitor, signals

    try:
        from gradwatch._capture import injected
    except ImportError:  # before the injected-gradient collector
        injected = None
    parts = [
        (hooks.WeakHook, "__call__", "forward hooks"),
        (recorder.Recorder, "gradient", "recorder.gradient (in backward)"),
        (recorder.Recorder, "_end_of_backward", "end of backward (recorder)"),
    ]
    if injected is not None:
        parts += [
            (injected.InjectedGradients, "_arrive", "gradient hooks"),
            (injected.InjectedGradients, "_completed", "end of backward (injected)"),
        ]
    parts += [
        (signals.CheapSignals, "host_signals", "signals (host)"),
        (signals.CheapSignals, "device_signals", "signals (device)"),
        (detector.SpikeDetector, "update_host", "detector (host)"),
        (detector.SpikeDetector, "update", "detector (device)"),
        (recorder.Recorder, "finish", "recorder.finish (release)"),
        (recorder.Recorder, "take_injected", "take_injected"),
        (monitor.MonitorCore, "flush_signals", "flush_signals"),
        (monitor.MonitorCore, "plan_step", "plan_step"),
        (monitor.MonitorCore, "finish_step", "finish_step (all)"),
    ]
    return parts


def breakdown(make: Callable[[], Setup], steps: int) -> dict[str, float]:
    """Mean µs per cheap step of each part (the thread's CPU time around each call)."""
    totals: dict[str, int] = {}
    originals = []
    for owner, attr, label in _targets():
        fn = owner.__dict__.get(attr)
        if fn is None:
            continue
        originals.append((owner, attr, fn))

        def timed(*args, _fn=fn, _label=label, **kwargs):
            t = time.thread_time_ns()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_label] = totals.get(_label, 0) + time.thread_time_ns() - t

        setattr(owner, attr, functools.wraps(fn)(timed))
    try:
        s = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mon = gradwatch.Monitor(s.model, **MONITOR)
        _train_window(s, mon, 5, time.perf_counter_ns)  # warm-up and the first capture
        totals.clear()
        _train_window(s, mon, steps, time.perf_counter_ns)
        mon.close()
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
    return {k: v / steps / 1000 for k, v in totals.items()}


# -- the table -----------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    lines = [
        "| model | step without (µs) | gradwatch per cheap step (µs) | 10-90% | ratio | "
        "forward | backward | Monitor.step | optimizer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.cost_us
        lines.append(
            f"| {r.label} | {r.step_us:.0f} | {c['total']:.1f} | {r.low_us:.1f} to "
            f"{r.high_us:.1f} | {r.ratio:.4f} | {c['forward']:.1f} | {c['backward']:.1f} | "
            f"{c['step']:.1f} | {c['optimizer']:.1f} |"
        )
    for r in results:
        if r.parts_us:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r.parts_us.items())
            lines.append(f"\n{r.label}, Monitor.step parts (µs per step): {parts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: darts,lm")
    parser.add_argument("--windows", type=int, default=None, help="on windows per model")
    parser.add_argument("--window", type=int, default=None, help="steps per window")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few short windows")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument(
        "--budget",
        action="store_true",
        help="the default overhead budget instead of signals at every step: the average "
        "step between captures (quiet steps, and the signals every `stride` steps)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global MONITOR
    MONITOR = BETWEEN_CAPTURES if args.budget else SIGNALS_EVERY_STEP
    results = []
    for key in args.models.split(","):
        if key not in MODELS:
            parser.error(f"--models: unknown model {key!r} (known: {', '.join(MODELS)})")
        big = key == "lm"
        windows = args.windows or (2 if args.quick else (10 if big else 40))
        window = args.window or (2 if args.quick else (10 if big else 50))
        r = measure(MODELS[key], windows, window, args.clock)
        if not args.no_breakdown:
            r.parts_us = breakdown(MODELS[key], 3 if args.quick else (20 if big else 300))
        results.append(r)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
