"""Cost of gradwatch's exact replay relative to the module's own fused forward + backward.

For each configuration, one process alternates three measurements on the same module, data
and output gradients:

* baseline: forward + backward of the fused module (``loss = (out * r).sum() + h_n.sum()``);
* capture: the replay of that call (forward trajectory, backward walk, per-step statistics);
* capture + diagnostics: the same plus the propagation curve, gain, horizon and causes.

Ratios are replay time over baseline time (1.0: the replay costs as much as the module's
training step). Medians over rounds; A/B/C alternate so noise from other work on the machine
hits all sides alike.

A second table times whole training steps of the models the overhead targets are set on
(issue 13): a step of the model alone against the same step inside ``gradwatch.trace``
(hooks, replay, diagnostics: a capture at every step), alternating in one process:

* darts ``RNNModel`` shape: LSTM 1x25, input size 1, T 48, batch 32, a linear head, MSE, Adam
  (target: capture step / plain step at most 3);
* the reference language model: embedding 64, LSTM 2x256, T 64, batch 32, vocabulary 1000,
  cross-entropy at every step, SGD (target: at most 2).

    python benchmarks/replay_cost.py                   # both tables
    python benchmarks/replay_cost.py --quick           # the training-step table, few rounds
    python benchmarks/replay_cost.py --threads 2 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gradwatch
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
            analyze(capture_call(call, probes=False), options=CAPTURE_ONLY)

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


class _Forecaster(nn.Module):
    """The darts ``RNNModel`` shape: LSTM 1x25 over 48 steps and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, 25, batch_first=True)
        self.head = nn.Linear(25, 1)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out, _ = self.rnn(x)
        return nn.functional.mse_loss(self.head(out), y)


class _LanguageModel(nn.Module):
    """The reference language model: embedding 64, LSTM 2x256, vocabulary 1000."""

    def __init__(self, vocab: int = 1000) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 64)
        self.rnn = nn.LSTM(64, 256, num_layers=2)
        self.head = nn.Linear(256, vocab)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        (x,) = batch
        out, _ = self.rnn(self.emb(x.t()))
        return nn.functional.cross_entropy(self.head(out).flatten(0, 1), x.t().flatten())


def _model_setup(name: str):
    torch.manual_seed(0)
    if name == "darts":
        model: nn.Module = _Forecaster()
        batch: tuple = (torch.randn(32, 48, 1), torch.randn(32, 48, 1))
        return model, batch, torch.optim.Adam(model.parameters(), lr=1e-3)
    model = _LanguageModel()
    batch = (torch.randint(0, 1000, (32, 64)),)
    return model, batch, torch.optim.SGD(model.parameters(), lr=0.1)


STEP_ROWS = [
    ("darts RNNModel shape (LSTM 1x25, T 48, B 32)", "darts", 3.0),
    ("reference LM (emb 64, LSTM 2x256, T 64, B 32)", "lm", 2.0),
]


def measure_steps(name: str, rounds: int) -> tuple[float, float]:
    """Median plain step time and the median ratio (traced step / plain step) over rounds,
    each traced step compared with the plain steps either side of it."""
    model, batch, opt = _model_setup(name)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        opt.step()

    def traced() -> None:
        opt.zero_grad(set_to_none=True)
        with gradwatch.trace(model) as tr:
            model.loss(batch).backward()
        tr.report()
        opt.step()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up
        plain()
        traced()
    ratios, bases = [], []
    before = timed(plain)
    for _ in range(rounds):
        cost = timed(traced)
        after = timed(plain)
        bases.append(before)
        ratios.append(cost / ((before + after) / 2))
        before = after
    return statistics.median(bases), statistics.median(ratios)


def step_table(rounds: int) -> None:
    print("| model | plain step (ms) | capture adds (ms) | with capture / plain | target |")
    print("|---|---|---|---|---|")
    for label, name, target in STEP_ROWS:
        base, ratio = measure_steps(name, rounds)
        extra = (ratio - 1) * base * 1e3
        print(f"| {label} | {base * 1e3:.1f} | {extra:.1f} | {ratio:.2f} | {target:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the training-step table only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {args.threads} thread(s), {rounds} rounds, medians")
    step_table(rounds if args.quick else max(rounds, 20))
    if args.quick:
        return
    print()
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
