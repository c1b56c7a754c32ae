"""Cost of capturing a diagonal linear recurrence with ``gradwatch.mark_scan``, on the CPU.

One training step (forward + backward) of a Mamba-like selective scan
``h_t = a_t ⊙ h_{t-1} + u_t`` with a ``[B, T, D, N]`` state, computed by a parallel
(associative) scan, in three variants alternated round by round in one process:

* ``off``: no trace; ``mark_scan`` is called and returns at once (the cost at every step that
  is not a capture step);
* ``capture``: inside ``gradwatch.trace``: the hooks read ``dL/du`` and ``dL/dh`` and the
  report (statistics, closed-form propagation, causes, verdict) is built at the end.

Reported: the median step time of ``off`` and the ratio ``capture / off``. At the defaults a
capture happens every ``every_n_steps`` steps, so the amortised cost is
``(ratio - 1) / every_n_steps``.

    .venv/bin/python benchmarks/scan_cost.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gradwatch


def scan(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    h, step = u, 1
    while step < u.shape[1]:
        pad = (0, 0, 0, 0, step, 0)
        h = h + a * nn.functional.pad(h[:, :-step], pad)
        a = a * nn.functional.pad(a[:, :-step], pad, value=1.0)
        step *= 2
    return h


class Block(nn.Module):
    def __init__(self, width: int, state: int) -> None:
        super().__init__()
        self.delta = nn.Linear(width, width)
        self.B = nn.Linear(width, state)
        self.C = nn.Linear(width, state)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1.0)).repeat(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = nn.functional.softplus(self.delta(x))  # [B, T, D]
        a = torch.exp(delta.unsqueeze(-1) * -torch.exp(self.A_log))  # [B, T, D, N]
        u = delta.unsqueeze(-1) * self.B(x).unsqueeze(2) * x.unsqueeze(-1)
        h = scan(a, u)
        gradwatch.mark_scan("ssm", a, u, h, step=delta.unsqueeze(-1))
        return (h @ self.C(x).unsqueeze(-1)).squeeze(-1)


def _step(model: nn.Module, x: torch.Tensor, capture: bool) -> float:
    start = time.perf_counter()
    if capture:
        with gradwatch.trace(model) as tr:
            model(x).square().mean().backward()
        tr.report()
    else:
        model(x).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| B | T | D x N | off: step (ms) | capture / off |")
    print("|---|---|---|---|---|")
    for batch, steps, width, state in ((16, 128, 32, 8), (16, 512, 32, 8), (8, 256, 64, 16)):
        torch.manual_seed(0)
        model = Block(width, state)
        x = torch.randn(batch, steps, width)
        times: dict[bool, list[float]] = {False: [], True: []}
        for capture in (False, True):  # warm-up
            _step(model, x, capture)
        for _ in range(args.rounds):
            for capture in (False, True):
                times[capture].append(_step(model, x, capture))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {batch} | {steps} | {width} x {state} | {1e3 * off:.1f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()
