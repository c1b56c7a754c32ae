"""Cost of watching xlstm's sLSTM (``backend="vanilla"``) and ncps' CfC, on the CPU.

One training step (forward, backward, SGD step) of a small regressor around each package's
layer, in three variants alternated round by round in one process:

* ``plain``: no gradwatch;
* ``watched``: a `gradwatch.Monitor` attached that never captures (``every_n_steps`` beyond the
  run): the hooks are in place and return at once, the cheap signals are recorded; this is
  the cost of every step that is not a capture step;
* ``capture``: inside `gradwatch.trace`, the per-step gradients read and the report built.

Reported: the median ``plain`` step time and the ratios ``watched / plain`` and
``capture / plain``. At the defaults a capture happens every ``every_n_steps`` steps, so the
amortised cost is ``watched - 1 + (capture - 1) / every_n_steps``. Needs the integrations
environment (``requirements/integrations.txt``); a package that is not installed is skipped.

    .venv-integrations/bin/python benchmarks/package_cost.py [--rounds 15] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import gradwatch


def _slstm(width: int, steps: int) -> nn.Module:
    from xlstm import sLSTMBlockConfig, sLSTMLayerConfig, xLSTMBlockStack, xLSTMBlockStackConfig

    layer = sLSTMLayerConfig(backend="vanilla", num_heads=4)
    config = xLSTMBlockStackConfig(
        slstm_block=sLSTMBlockConfig(slstm=layer),
        context_length=steps,
        num_blocks=2,
        embedding_dim=width,
        slstm_at=[0, 1],
    )
    return xLSTMBlockStack(config)


def _cfc(width: int, steps: int) -> nn.Module:
    from ncps.torch import CfC

    return CfC(width, width)


class Regressor(nn.Module):
    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.head((y[0] if isinstance(y, tuple) else y)[:, -1])


def _runner(model: nn.Module, x: torch.Tensor, variant: str) -> Callable[[], float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    monitor = gradwatch.Monitor(model, every_n_steps=10**9) if variant == "watched" else None

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad()
        if variant == "capture":
            with gradwatch.trace(model) as tr:
                model(x).square().mean().backward()
            tr.report()
        else:
            model(x).square().mean().backward()
            if monitor is not None:
                monitor.step(opt)
        opt.step()
        return time.perf_counter() - start

    return step


def measure(build: Callable, batch: int, steps: int, width: int, rounds: int) -> dict[str, float]:
    """Median step times of the three variants (same initial weights, same batch)."""
    torch.manual_seed(0)
    first = Regressor(build(width, steps), width)
    x = torch.randn(batch, steps, width)
    runners = {}
    for variant in ("plain", "watched", "capture"):
        model = Regressor(build(width, steps), width)
        model.load_state_dict(first.state_dict())
        runners[variant] = _runner(model, x, variant)
    times: dict[str, list[float]] = {v: [] for v in runners}
    for _ in range(2):  # warm-up
        for run in runners.values():
            run()
    for _ in range(rounds):
        for variant, run in runners.items():
            times[variant].append(run())
    return {v: statistics.median(t) for v, t in times.items()}


CASES = (
    ("xlstm", "sLSTM x2 (vanilla)", _slstm, (16, 64, 64)),
    ("xlstm", "sLSTM x2 (vanilla)", _slstm, (16, 256, 64)),
    ("ncps", "CfC", _cfc, (16, 64, 64)),
    ("ncps", "CfC", _cfc, (16, 256, 64)),
)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")  # gradwatch's verdict messages are not the point here
    rows = []
    print("| module | B | T | H | plain: step (ms) | watched / plain | capture / plain |")
    print("|---|---|---|---|---|---|---|")
    cases = CASES
    if args.quick:  # one tiny case per package
        cases = tuple({c[0]: (*c[:3], (2, 8, 8)) for c in reversed(CASES)}.values())[::-1]
    for package, label, build, (batch, steps, width) in cases:
        if importlib.util.find_spec(package) is None:
            print(f"| {label} | skipped: {package} is not installed |||||")
            continue
        t = measure(build, batch, steps, width, 2 if args.quick else args.rounds)
        row = {
            "module": label,
            "shape": (batch, steps, width),
            "plain_ms": 1e3 * t["plain"],
            "watched": t["watched"] / t["plain"],
            "capture": t["capture"] / t["plain"],
        }
        rows.append(row)
        print(
            f"| {label} | {batch} | {steps} | {width} | {row['plain_ms']:.1f} | "
            f"{row['watched']:.3f} | {row['capture']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()
