"""Cost of gradwatch's exact replay relative to the module's own fused forward + backward.

For each configuration, one process alternates two measurements on the same module and data:

* baseline: forward + backward of the fused module (``loss = (out * r).sum() + h_n.sum()``);
* traced: the same step inside ``gradwatch.trace`` (recording, replay, report).

The replay's cost ratio is ``(traced - baseline) / baseline``: 1.0 means the replay costs as
much as the training step of that module. Medians over rounds; A/B alternate so that noise
from other work on the machine hits both sides alike.

    python benchmarks/replay_cost.py                   # default table
    python benchmarks/replay_cost.py --threads 2 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gradwatch

CONFIGS = [
    # (label, module factory, T, batch)
    ("LSTM 2x256", lambda: nn.LSTM(256, 256, num_layers=2), 100, 32),
    ("LSTM 1x128", lambda: nn.LSTM(128, 128), 100, 32),
    ("GRU 2x256", lambda: nn.GRU(256, 256, num_layers=2), 100, 32),
    ("RNN 2x256 tanh", lambda: nn.RNN(256, 256, num_layers=2), 100, 32),
    ("LSTM 2x512", lambda: nn.LSTM(512, 512, num_layers=2), 100, 32),
    ("LSTM 1x64", lambda: nn.LSTM(64, 64), 100, 32),
]


def _step(module: nn.Module, x: torch.Tensor, r: torch.Tensor) -> None:
    out, state = module(x)
    h_n = state[0] if isinstance(state, tuple) else state
    ((out * r).sum() + h_n.sum()).backward()
    module.zero_grad(set_to_none=True)


def _traced(module: nn.Module, x: torch.Tensor, r: torch.Tensor) -> None:
    with gradwatch.trace(module) as tr:
        _step(module, x, r)
    tr.report()


def measure(factory, steps: int, batch: int, rounds: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    module = factory()
    x = torch.randn(steps, batch, module.input_size)
    r = torch.randn(steps, batch, module.hidden_size * (2 if module.bidirectional else 1))
    for _ in range(2):  # warm-up
        _step(module, x, r)
        _traced(module, x, r)
    base, traced = [], []
    for _ in range(rounds):
        for fn, sink in ((_step, base), (_traced, traced)):
            t0 = time.perf_counter()
            fn(module, x, r)
            sink.append(time.perf_counter() - t0)
    b, t = statistics.median(base), statistics.median(traced)
    return b, t, (t - b) / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, medians")
    print(f"| {'module':<16} | T   | B  | fwd+bwd (ms) | traced (ms) | replay / fwd+bwd |")
    print(f"|{'-' * 18}|-----|----|--------------|-------------|------------------|")
    for label, factory, steps, batch in CONFIGS:
        b, t, ratio = measure(factory, steps, batch, args.rounds)
        print(f"| {label:<16} | {steps:<3} | {batch:<2} | {b * 1e3:12.1f} | {t * 1e3:11.1f} "
              f"| {ratio:16.2f} |")


if __name__ == "__main__":
    main()
