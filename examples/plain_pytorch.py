"""gradwatch in a plain PyTorch training loop: no Lightning, just ``gradwatch.Monitor``.

The task is *first-symbol recall*: a sequence of ``T`` random symbols (out of 8) is read by a
2-layer ``nn.GRU``; at the end the network must name the *first* symbol. Chance is 1/8. The
only useful gradient has to travel back all ``T`` steps, so the task depends entirely on the
gradient flow that gradwatch measures.

The loop is an ordinary one, with three additions::

    mon = gradwatch.Monitor(model, every_n_steps=20)   # after the model is built
    ...
    loss.backward()
    report = mon.step(optimizer)   # after backward, before optimizer.step(); a Report on
    optimizer.step()               # captured steps, None otherwise
    ...
    mon.close()                    # or use `with gradwatch.Monitor(...) as mon:`

Every step costs only cheap signals (gradient norms, a non-finite check). Every
``--every-n-steps`` steps (and after a spike or a non-finite value) the step is replayed
exactly: per-timestep dL/dh_t, per-step gain, horizon, verdict. A verdict change is printed as
it happens (the ``gradwatch`` logger), and the panels go to TensorBoard through
``gradwatch.PanelWriter`` wrapped around a ``SummaryWriter``.

What to expect: with PyTorch's default initialisation the GRU's update gates sit around 0.5, so
the gradient fades within roughly ten steps and gradwatch calls both layers *vanishing* at
T = 40. As the network learns to hold the first symbol, its update gates close (it copies its
state forward), the horizon grows past the sequence, the verdict returns to *healthy* and the
accuracy leaves chance.

Run ``python examples/plain_pytorch.py`` (about a minute on a CPU; ``--quick`` for a few
seconds) and then ``tensorboard --logdir runs``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch import PanelWriter, summary_table

EXAMPLE = "plain_pytorch"
SYMBOLS = 8


def recall_batch(batch_size: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``x [B, T]`` random symbols; ``y [B]`` the first one."""
    x = torch.randint(0, SYMBOLS, (batch_size, length), generator=g)
    return x, x[:, 0].clone()


class Recall(nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(SYMBOLS, 16)
        self.gru = nn.GRU(16, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, SYMBOLS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(x))
        return self.head(out[:, -1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=40, help="final sequence length T")
    p.add_argument(
        "--curriculum",
        type=int,
        nargs="+",
        default=[10, 20],
        help="shorter lengths the second run trains on first (default: 10 20)",
    )
    p.add_argument("--steps", type=int, default=400, help="Adam steps per length")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--every-n-steps", type=int, default=25, help="gradwatch capture interval")
    p.add_argument("--print-every", type=int, default=100)
    p.add_argument("--logdir", default="runs", help="TensorBoard root (default: runs)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny configuration for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.hidden, args.length, args.curriculum = 100, 32, 20, [5]
        args.every_n_steps, args.print_every = 10, 50
    return args


def show_gradwatch_messages() -> None:
    """Print gradwatch's verdict changes on stdout, once (it also emits a Python warning)."""
    warnings.filterwarnings("ignore", "gradwatch: ", RuntimeWarning)
    log = logging.getLogger("gradwatch")
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stdout))
        log.setLevel(logging.WARNING)
        log.propagate = False


def _f(t: Any, layer: int = -1) -> float:
    return math.nan if t is None else float(t[layer, 0])


def train(args: argparse.Namespace, name: str, lengths: list[int]) -> dict[str, Any]:
    """One run: ``args.steps`` Adam steps at each length in ``lengths``, watched by a Monitor."""
    torch.manual_seed(args.seed)  # both runs start from the same weights and data
    model = Recall(args.hidden, args.layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    val_x, val_y = recall_batch(1000, args.length, torch.Generator().manual_seed(args.seed + 2))
    logdir = Path(args.logdir) / EXAMPLE / name
    writer = SummaryWriter(log_dir=str(logdir))
    # Scalars at every capture, the Custom Scalars dashboard, and figures on every 4th capture
    # (a figure costs tens of milliseconds; the scalars almost nothing).
    panels = PanelWriter(writer, figure_every=4)

    print(
        f"  {'step':>5}  {'T':>3}  {'loss':>6}  {'acc@T=' + str(args.length):>9}  "
        f"{'horizon':>7}  verdict"
    )
    history: list[dict[str, Any]] = []
    changes: list[tuple[int, str, str, str]] = []
    step = 0
    with gradwatch.Monitor(model, every_n_steps=args.every_n_steps, log_every_n_steps=10) as mon:
        panels.write_layout(mon.names)
        for length in lengths:
            for _ in range(args.steps):
                x, y = recall_batch(args.batch_size, length, data_gen)
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                before = dict(mon.verdicts)
                report = mon.step(optimizer)  # after backward, before optimizer.step()
                optimizer.step()

                writer.add_scalar("train/loss", float(loss.detach()), step)
                writer.add_scalar("train/seq_len", length, step)
                if report is not None:
                    panels.write(step, report)  # gradwatch/<module>/l<L>d<D>/<metric>, figures
                    for module, verdict in mon.verdicts.items():
                        old = before.get(module, "healthy")
                        if old != verdict:
                            changes.append((step, module, old, verdict))
                    m = report["gru"]
                    history.append(
                        {
                            "step": step,
                            "T": length,
                            "verdict": m.verdict,
                            "horizon": _f(m.horizon),
                            "gain": _f(m.gain),
                        }
                    )
                if step % args.print_every == 0:
                    with torch.no_grad():
                        acc = float((model(val_x).argmax(-1) == val_y).float().mean())
                    writer.add_scalar("val/accuracy", acc, step)
                    h = history[-1]["horizon"] if history else math.nan
                    horizon = "never" if math.isinf(h) else f"{h:.1f}"
                    print(
                        f"  {step:>5}  {length:>3}  {float(loss.detach()):>6.3f}  {acc:>9.1%}  "
                        f"{horizon:>7}  {mon.verdicts.get('gru', '-')}",
                        flush=True,
                    )
                step += 1
        reports = mon.reports
        signals = mon.signals
        final = dict(mon.verdicts)
    panels.flush()
    writer.close()
    with torch.no_grad():
        accuracy = float((model(val_x).argmax(-1) == val_y).float().mean())
    last = reports.latest
    return {
        "accuracy": accuracy,
        "verdicts": final,
        "changes": changes,
        "history": history,
        "reports": len(reports),
        "signals": len(signals),
        "last": None if last is None else last["gru"],
        "logdir": str(logdir),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    show_gradwatch_messages()
    started = time.perf_counter()
    chance = 1 / SYMBOLS
    print(
        f"First-symbol recall ({SYMBOLS} symbols, chance {chance:.1%}), {args.layers}-layer GRU "
        f"with {args.hidden} units, Adam. Validation accuracy at T = {args.length}.\n"
    )
    lengths = [t for t in args.curriculum if t < args.length] + [args.length]
    print(f"Run 1. Straight at T = {args.length}: {args.steps * len(lengths)} steps.")
    direct = train(args, "direct", [args.length] * len(lengths))
    print(
        f"\nRun 2. The same network with a curriculum T = "
        f"{' -> '.join(map(str, lengths))}: {args.steps} steps each."
    )
    curriculum = train(args, "curriculum", lengths)

    print()
    for label, r in (("straight", direct), ("curriculum", curriculum)):
        changes = ", ".join(f"step {s}: {a} -> {b}" for s, _, a, b in r["changes"]) or "none"
        print(
            f"{label:>10}: accuracy {r['accuracy']:.1%}, verdict {r['verdicts'].get('gru')}; "
            f"{r['reports']} captures, {r['signals']} steps of cheap signals; verdict changes: "
            f"{changes}"
        )
    latest = {
        f"gru ({label})": r["last"]
        for label, r in (("straight", direct), ("curriculum", curriculum))
        if r["last"] is not None
    }
    if latest:
        print("\n" + summary_table(latest))
    seconds = time.perf_counter() - started
    logdir = Path(args.logdir) / EXAMPLE
    print(
        f"\nDone in {seconds:.0f} s. TensorBoard logs are in {logdir}/; open them with\n"
        f"  tensorboard --logdir {args.logdir}"
    )
    return {"direct": direct, "curriculum": curriculum, "seconds": seconds, "logdir": str(logdir)}


if __name__ == "__main__":
    main()
