"""Step-time overhead of the GradWatch callback in a real Lightning Trainer, on the CPU.

Three variants of the same training run, alternated round by round in one process so that
noise on the (shared) machine hits them alike: no callback; the cheap signals at every step
(``GradWatch(every_n_steps=10**9, overhead_budget=None)``: one capture at step 0, not
timed); ``GradWatch(every_n_steps=1)`` (exact capture every step). Every optimizer step is
timed (``on_train_batch_start`` to ``on_train_batch_end``) and summarised by its median.

A fixed schedule has two kinds of steps: cheap ones (signals only) and one capture every
``N`` steps. The amortised ratio is their mean, ``((N - 1) * cheap + capture) / (N *
baseline)`` with ``N = 100``; the cheap step is measured in the cheap run, the capture step
in the every-step run. (At its defaults GradWatch spaces captures by its overhead budget
instead: benchmarks/client_overhead.py measures that end to end.) With
``--interleave`` the baseline and cheap steps come from the same runs instead, GradWatch
switched off every other step: on a shared machine whole runs drift by several percent (a
run lands in a fast or a slow regime), which pairing within a run cancels.

    .venv/bin/python benchmarks/callback_overhead.py [--rounds 5] [--steps 12] [--interleave]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import gradwatch


def _lightning():
    import lightning.pytorch as L

    return L


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}

CHEAP = {"every_n_steps": 10**9, "overhead_budget": None}  # signals every step, no capture
AMORTISE_OVER = 100  # the amortised ratio: one capture every this many steps


class Timer:
    clock = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._t = self.clock()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(self.clock() - self._t)


def make_models():
    L = _lightning()

    class LanguageModel(L.LightningModule):
        """Embedding + 2x256 LSTM + vocabulary head; loss at every step (T=64, batch 32)."""

        def __init__(self, vocab: int = 1000) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, 128)
            self.rnn = nn.LSTM(128, 256, num_layers=2)
            self.head = nn.Linear(256, vocab)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            out, _ = self.rnn(self.emb(x.t()))
            return nn.functional.cross_entropy(self.head(out).flatten(0, 1), x.t().flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Classifier(L.LightningModule):
        """2x128 GRU over 64 steps, class from the last state (batch 32)."""

        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(32, 128, num_layers=2)
            self.head = nn.Linear(128, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out, _ = self.rnn(x.transpose(0, 1))
            return nn.functional.cross_entropy(self.head(out[-1]), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    lm_data = torch.utils.data.TensorDataset(torch.randint(0, 1000, (32 * 64, 64), generator=g))
    cls_data = torch.utils.data.TensorDataset(
        torch.randn(32 * 64, 64, 32, generator=g), torch.randint(0, 10, (32 * 64,), generator=g)
    )
    return {
        "LSTM LM 2x256, T=64, B=32": (LanguageModel, lm_data),
        "GRU classifier 2x128, T=64, B=32": (Classifier, cls_data),
    }


def make_grid_models():
    """The overhead grid (``--grid``): a sequence classifier (one layer, T=64, batch 32, class
    from the last state) for each fused module kind at two sizes."""
    L = _lightning()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(32 * 64, 64, 32, generator=g), torch.randint(0, 10, (32 * 64,), generator=g)
    )
    models = {}
    for kind in ("RNN", "LSTM", "GRU"):
        for hidden in (64, 256):

            class Grid(L.LightningModule):
                def __init__(self, kind: str = kind, hidden: int = hidden) -> None:
                    super().__init__()
                    self.rnn = getattr(nn, kind)(32, hidden)
                    self.head = nn.Linear(hidden, 10)

                def training_step(self, batch, batch_idx):
                    x, y = batch
                    out, _ = self.rnn(x.transpose(0, 1))
                    return nn.functional.cross_entropy(self.head(out[-1]), y)

                def configure_optimizers(self):
                    return torch.optim.Adam(self.parameters(), lr=1e-3)

            models[f"{kind} 1x{hidden}, T=64, B=32"] = (Grid, data)
    return models


def run(model_cls, data, steps: int, callback, clock: str = "wall") -> list[float]:
    L = _lightning()
    timer_cls = type("StepTimer", (Timer, L.Callback), {"clock": staticmethod(CLOCKS[clock])})
    timer = timer_cls()
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[timer] + ([callback] if callback is not None else []),
    )
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    trainer.fit(model_cls(), loader)
    return timer.times[2:]  # the first steps warm up allocators and caches


class Switch:
    """Turns a GradWatch on for even steps and off for odd ones (hooks removed, the step not
    closed), before the step's timer starts: both kinds of step in one run, paired."""

    def __init__(self, gw, timer) -> None:
        self.gw, self.timer = gw, timer
        self.on: list[bool] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        on = trainer.global_step % 2 == 0
        if on and not self.gw._training:
            self.gw._core.attach()
            self.gw._training = True
        elif not on and self.gw._training:
            self.gw._core.detach()
            self.gw._training = False
        self.on.append(on)


def run_interleaved(model_cls, data, steps: int, clock: str) -> tuple[list[float], list[float]]:
    """``(off steps, on steps)`` of one run of ``GradWatch()`` switched every other step."""
    L = _lightning()
    timer = type("StepTimer", (Timer, L.Callback), {"clock": staticmethod(CLOCKS[clock])})()
    gw = gradwatch.GradWatch(**CHEAP)
    switch = type("Switch", (Switch, L.Callback), {})(gw, timer)
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[switch, timer, gw],
    )
    trainer.fit(model_cls(), torch.utils.data.DataLoader(data, batch_size=32))
    pairs = list(zip(switch.on, timer.times, strict=True))[2:]  # step 0 is the capture
    return [t for on, t in pairs if not on], [t for on, t in pairs if on]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter; thread: CPU time of the training thread (with one "
        "thread, all of a step's work; insensitive to other processes on shared cores)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="measure baseline and cheap steps in the same runs, GradWatch switched on and "
        "off every other step (paired: immune to run-to-run drift of the machine)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="the overhead grid instead of the two reference models: nn.RNN, nn.LSTM and "
        "nn.GRU classifiers at hidden sizes 64 and 256",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("gradwatch").setLevel(logging.ERROR)

    n = AMORTISE_OVER
    rows = []
    models = make_grid_models() if args.grid else make_models()
    for label, (model_cls, data) in models.items():
        base, cheap, every = [], [], []
        for _ in range(args.rounds):
            if args.interleave:
                off, on = run_interleaved(model_cls, data, 2 * args.steps, args.clock)
                base += off
                cheap += on
            else:
                base += run(model_cls, data, args.steps, None, args.clock)
                cheap += run(model_cls, data, args.steps, gradwatch.GradWatch(**CHEAP), args.clock)
            every += run(
                model_cls, data, args.steps, gradwatch.GradWatch(every_n_steps=1), args.clock
            )
        b, c, e = (statistics.median(x) for x in (base, cheap, every))
        rows.append((label, b, c, e, ((n - 1) * c + e) / (n * b), c / b, e / b))

    print(
        f"| model | baseline step (ms) | cheap step (ms) | capture step (ms) | "
        f"amortised ratio (every_n_steps={n}) | cheap-step ratio | every-step ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, b, c, e, amort, cr, er in rows:
        print(
            f"| {label} | {1e3 * b:.1f} | {1e3 * c:.1f} | {1e3 * e:.1f} | {amort:.3f} | "
            f"{cr:.3f} | {er:.2f} |"
        )
    print(
        f"\ntorch {torch.__version__}, {args.threads} thread(s), {args.rounds} alternating "
        f"rounds of {args.steps} steps (first 2 of each run dropped), medians, {args.clock} clock"
        + (", baseline and cheap steps interleaved in the same runs" if args.interleave else "")
    )


if __name__ == "__main__":
    main()
