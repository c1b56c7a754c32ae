"""Cost of gradwatch's exact replay relative to the module's own fused forward + backward.

For each configuration, one process alternates three measurements on the same module, data
and output gradients:

* baseline: forward + backward of the fused module (``loss = (out * r).sum() + h_n.sum()``);
* capture: the replay of that call (forward trajectory, backward walk, per-step statistics);
* capture + diagnostics: the same plus the propagation curve, gain, horizon and causes.

Ratios are replay time over baseline time (1.0: the replay costs as much as the module's
training step). Medians over rounds; A/B/C alternate so noise from other work on the machine
hits all sides alike.

    python benchmarks/replay_cost.py                   # default table
    python benchmarks/replay_cost.py --threads 2 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradwatch._analysis import analyze
from gradwatch._analysis.quantities import QuantityOptions
from gradwatch._capture.families.fused import capture_call
from gradwatch._capture.fused import FusedCall, record_fused_call


def replay_fused_call(call: FusedCall, options: QuantityOptions):
    """Capture (replay) and analysis of one call, as gradwatch does at a captured step."""
    return analyze(capture_call(call), options=options)


CONFIGS = [
    # (label, module factory, T, batch)
    ("LSTM 2x256", lambda: nn.LSTM(256, 256, num_layers=2), 100, 32),
    ("LSTM 1x128", lambda: nn.LSTM(128, 128), 100, 32),
    ("GRU 2x256", lambda: nn.GRU(256, 256, num_layers=2), 100, 32),
    ("RNN 2x256 tanh", lambda: nn.RNN(256, 256, num_layers=2), 100, 32),
    ("LSTM 2x512", lambda: nn.LSTM(512, 512, num_layers=2), 100, 32),
    ("LSTM 1x64", lambda: nn.LSTM(64, 64), 100, 32),
]
CAPTURE_ONLY = QuantityOptions(propagation=False, causes=False)
FULL = QuantityOptions()


def _loss(out: torch.Tensor, state, r: torch.Tensor) -> torch.Tensor:
    h_n = state[0] if isinstance(state, tuple) else state
    return (out * r).sum() + h_n.sum()


def _baseline(module: nn.Module, x: torch.Tensor, r: torch.Tensor) -> None:
    out, state = module(x)
    _loss(out, state, r).backward()
    module.zero_grad(set_to_none=True)


def _recorded_call(module: nn.RNNBase, x: torch.Tensor, r: torch.Tensor) -> FusedCall:
    """One call recorded as gradwatch records it, with its real output gradients."""
    out, state = module(x)
    call = record_fused_call("m", "m", module, (x,), {}, (out, state))
    assert call is not None
    slots = {"out": out, "h_n": state[0] if isinstance(state, tuple) else state}
    if isinstance(state, tuple):
        slots["c_n"] = state[1]
    grads = torch.autograd.grad(_loss(out, state, r), list(slots.values()), allow_unused=True)
    call.grads = {k: g for k, g in zip(slots, grads, strict=True) if g is not None}
    return call


def measure(factory, steps: int, batch: int, rounds: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    module = factory()
    x = torch.randn(steps, batch, module.input_size)
    r = torch.randn(steps, batch, module.hidden_size * (2 if module.bidirectional else 1))
    call = _recorded_call(module, x, r)

    def capture() -> None:
        with torch.no_grad():
            replay_fused_call(call, options=CAPTURE_ONLY)

    def full() -> None:
        with torch.no_grad():
            replay_fused_call(call, options=FULL)

    runs = {"base": lambda: _baseline(module, x, r), "capture": capture, "full": full}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(rounds):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med["base"], med["capture"] / med["base"], med["full"] / med["base"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, medians")
    print(f"| {'module':<16} | T   | B  | fwd+bwd (ms) | capture / fwd+bwd | + diagnostics |")
    print(f"|{'-' * 18}|-----|----|--------------|-------------------|---------------|")
    for label, factory, steps, batch in CONFIGS:
        base, capture, full = measure(factory, steps, batch, args.rounds)
        print(
            f"| {label:<16} | {steps:<3} | {batch:<2} | {base * 1e3:12.1f} "
            f"| {capture:17.2f} | {full:13.2f} |"
        )


if __name__ == "__main__":
    main()
