"""Selective copying with a diagonal linear recurrence: a transition near 1 keeps the memory,
a small one does not, and gradwatch says so before training is over.

The task (a one-token version of the selective copying task of Gu & Dao, 2023, "Mamba:
linear-time sequence modeling with selective state spaces", section 3.1): a sequence of ``T``
noise tokens hides one marked data token, somewhere in the first quarter; at the last step the
model must name the data token (one of ``K``). Chance is ``1 / K``. The error at the end reaches
the marked step only through the recurrence, across at least ``3T/4`` steps.

The model is minGRU-like (Feng et al., 2024, "Were RNNs all we needed?"):
``h_t = a_t ⊙ h_{t-1} + (1 - a_t) ⊙ W_u x_t`` with a selective transition
``a_t = sigmoid(W_a x_t + b)``, computed with a parallel (associative) scan and declared to
gradwatch with ``gradwatch.mark_scan``. Two initialisations of the bias ``b``:

* ``good``: ``b = 4`` (``a`` about 0.98): a gradient keeps 1% of its size for ~200 steps;
* ``bad``: ``b = -1`` (``a`` about 0.27): it is gone after ~4 steps.

Run ``python examples/selective_copy.py`` (about two minutes on a CPU; ``--quick`` for a
smoke run). It prints gradwatch's verdict, gain, horizon and transition statistics for each,
measured on the first training step, and the accuracy after training.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import gradwatch


def associative_scan(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + u_t`` over dimension 1 by recursive doubling (Hillis-Steele)."""
    h, step = u, 1
    while step < u.shape[1]:
        pad = (0, 0, step, 0)
        h = h + a * nn.functional.pad(h[:, :-step], pad)
        a = a * nn.functional.pad(a[:, :-step], pad, value=1.0)
        step *= 2
    return h


class SelectiveScan(nn.Module):
    def __init__(self, vocab: int, width: int, bias: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.gate = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        nn.init.constant_(self.gate.bias, bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        a = torch.sigmoid(self.gate(x))
        u = (1 - a) * self.value(x)
        h = associative_scan(a, u)
        gradwatch.mark_scan("scan", a, u, h, input_gate=1 - a)
        return self.head(h[:, -1])


def batch(size: int, steps: int, k: int, gen: torch.Generator):
    """Noise tokens ``k+1 .. 2k`` (and a marker ``0``), one data token ``1..k`` after the marker."""
    tokens = torch.randint(k + 1, 2 * k + 1, (size, steps), generator=gen)
    pos = torch.randint(0, steps // 4, (size,), generator=gen)
    data = torch.randint(1, k + 1, (size,), generator=gen)
    rows = torch.arange(size)
    tokens[rows, pos] = 0  # the marker
    tokens[rows, pos + 1] = data
    return tokens, data - 1


def run(name: str, bias: float, args: argparse.Namespace) -> dict[str, float | str]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = SelectiveScan(2 * args.k + 1, args.width, bias)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    report = None
    for step in range(args.steps):
        tokens, target = batch(args.batch, args.length, args.k, gen)
        if step == 0:  # what gradwatch sees at initialisation
            with gradwatch.trace(model) as tr:
                loss = nn.functional.cross_entropy(model(tokens), target)
                loss.backward()
            report = tr.report()["scan"]
        else:
            loss = nn.functional.cross_entropy(model(tokens), target)
            loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        tokens, target = batch(1000, args.length, args.k, gen)
        accuracy = (model(tokens).argmax(-1) == target).float().mean().item()
    assert report is not None
    t = report.causes.transition
    out = {
        "verdict": report.verdict,
        "gain": float(report.gain[0, 0]),
        "horizon": float(report.horizon[0, 0]),
        "transition_mean": float(t["mean"][0, 0]),
        "near_one": float(t["near_one"][0, 0]),
        "accuracy": accuracy,
        "explanation": report.explain(),
    }
    print(
        f"{name:>4}: b = {bias:+.0f}  verdict {out['verdict']:<9} gain {out['gain']:.3f}  "
        f"horizon {out['horizon']:.3g} steps  mean |a| {out['transition_mean']:.2f}  "
        f"accuracy {accuracy:.2f} (chance {1 / args.k:.2f})"
    )
    print(f"      {out['explanation']}")
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=64, help="sequence length T")
    p.add_argument("--k", type=int, default=8, help="number of data tokens")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--logdir", default=None, help="unused (accepted for the example runner)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 30
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {name: run(name, bias, args) for name, bias in (("good", 4.0), ("bad", -1.0))}
    print(f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
