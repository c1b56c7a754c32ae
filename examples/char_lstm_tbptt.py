"""A character-level LSTM language model trained with truncated BPTT (Lightning manual
optimization), and what gradwatch says about the horizon versus the truncation length.

The corpus ships with Python itself: ``pydoc_data.topics``, the text of the Python Language
Reference that ``help("assert")`` shows (79 topics, about 465,000 characters; fixed for a given
Python version). The text is cut into ``--batch-size`` contiguous streams; each training batch
is a window of ``--chunks`` x ``--tbptt`` characters of every stream. Truncated BPTT
(Williams & Peng, 1990; Sutskever, 2013): the window is processed chunk by chunk, with one
backward pass and one optimizer step per chunk, and the hidden state is carried to the next
chunk (and the next batch) *detached*, so no gradient flows back further than ``--tbptt``
steps.

gradwatch reports every captured optimizer step, i.e. every captured chunk, with the
per-timestep ``dL/dh_t`` of the chunk, the per-step gain and the *horizon*: how many steps a
gradient survives (above 1%) going back through the recurrence. Compared with the truncation
length it answers a practical question:

* horizon well below ``--tbptt``: the gradient dies inside the chunk anyway; longer chunks
  would cost time and buy nothing (the model is not using more context through the gradient);
* horizon at or beyond ``--tbptt``: the truncation cuts off gradient that would still carry
  signal; longer chunks may help.

A language model has a loss at every step and needs mostly short-range memory, so this example
uses ``Thresholds(vanishing_horizon=0.2)`` (vanishing only when the horizon is shorter than a
fifth of the chunk) instead of the default 0.5 meant for long-range tasks (see
docs/diagnostics.md).

Run ``python examples/char_lstm_tbptt.py`` (about two minutes on a CPU; ``--quick`` for a few
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

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the older namespace works the same way
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

from gradwatch import GradWatch, Thresholds, summary_table

EXAMPLE = "char_lstm_tbptt"


# ----------------------------------------------------------------------------------- data
def load_corpus() -> str:
    """The Python Language Reference topics bundled with the interpreter, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class Streams(torch.utils.data.Dataset):
    """``B`` contiguous streams of the encoded text, served as consecutive windows.

    Item ``i`` is ``(x, y)``, both ``[B, window]``: characters ``i*window .. (i+1)*window`` of
    every stream and the same shifted by one (the next-character targets). Served in order
    (no shuffling), so the hidden state at the end of one window is the right start for the
    next.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, window: int) -> None:
        per_stream = (len(ids) - 1) // batch_size
        self.x = ids[: per_stream * batch_size].view(batch_size, per_stream)
        self.y = ids[1 : per_stream * batch_size + 1].view(batch_size, per_stream)
        self.window = window
        self.count = per_stream // window

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = slice(i * self.window, (i + 1) * self.window)
        return self.x[:, s], self.y[:, s]


# ---------------------------------------------------------------------------------- model
class CharLSTM(pl.LightningModule):
    """Embedding -> LSTM -> linear head over the characters, trained with truncated BPTT."""

    def __init__(
        self,
        vocab: int,
        hidden: int = 128,
        layers: int = 1,
        tbptt: int = 50,
        lr: float = 3e-3,
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # several backward passes per batch
        self.embed = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, hidden, num_layers=layers, batch_first=True)
        h = hidden
        with torch.no_grad():  # b_if + b_hf = forget_bias (PyTorch starts it near 0)
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias_"):
                    p[h : 2 * h].fill_(forget_bias if name.startswith("bias_ih") else 0.0)
        self.head = nn.Linear(hidden, vocab)
        self.tbptt, self.lr = tbptt, lr
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.chunk_log: list[dict[str, float]] = []  # (optimizer step, chunk, loss)

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        if batch_idx == 0:
            self._state = None  # a new pass over the text: start from a zero state
        state = self._state
        for k, start in enumerate(range(0, x.shape[1], self.tbptt)):
            xs, ys = x[:, start : start + self.tbptt], y[:, start : start + self.tbptt]
            logits, state = self(xs, state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))
            opt.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(opt, gradient_clip_val=5.0, gradient_clip_algorithm="norm")
            step = self.global_step  # GradWatch keys its reports by this step
            opt.step()  # one optimizer step per chunk: GradWatch reports this chunk
            state = tuple(s.detach() for s in state)  # truncate: no gradient into the past
            value = float(loss.detach())
            self.chunk_log.append({"step": step, "chunk": k, "loss": value})
            self.log("train_bpc", value / math.log(2), prog_bar=False)
        self._state = state

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@torch.no_grad()
def bits_per_char(model: CharLSTM, ids: torch.Tensor, length: int = 20_000) -> float:
    """Cross-entropy in bits per character on held-out text (one stream, state carried)."""
    model.eval()
    ids = ids[: length + 1]
    logits, _ = model(ids[None, :-1])
    model.train()
    return float(nn.functional.cross_entropy(logits[0], ids[1:])) / math.log(2)


@torch.no_grad()
def sample(model: CharLSTM, chars: list[str], prompt: str, n: int, seed: int) -> str:
    """``n`` characters after ``prompt``, sampled at temperature 0.7 (seeded)."""
    model.eval()
    index = {c: i for i, c in enumerate(chars)}
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([[index[c] for c in prompt if c in index]])
    logits, state = model(x)
    out = []
    for _ in range(n):
        probs = torch.softmax(logits[0, -1] / 0.7, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=g))
        out.append(chars[nxt])
        logits, state = model(torch.tensor([[nxt]]), state)
    model.train()
    return prompt + "".join(out)


# ------------------------------------------------------------------------------------ main
def quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # a Lightning deprecation, not ours
    warnings.filterwarnings("ignore", "gradwatch: ", RuntimeWarning)  # shown by the logger
    gw_log = logging.getLogger("gradwatch")
    if not gw_log.handlers:
        gw_log.addHandler(logging.StreamHandler(sys.stdout))
        gw_log.setLevel(logging.WARNING)
        gw_log.propagate = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tbptt", type=int, default=50, help="truncation length (chunk steps)")
    p.add_argument("--chunks", type=int, default=4, help="chunks per batch window")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="parallel text streams")
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="training batches (windows); default: the whole text once",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--every-n-steps", type=int, default=25, help="gradwatch capture interval")
    p.add_argument(
        "--vanishing-horizon",
        type=float,
        default=0.2,
        help="gradwatch threshold, as a fraction of the chunk length",
    )
    p.add_argument("--logdir", default="runs", help="TensorBoard root (default: runs)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny configuration for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.hidden, args.batch_size = 6, 32, 8
        args.tbptt, args.chunks, args.every_n_steps = 20, 3, 1
    return args


def _f(t: Any) -> float:
    return float("nan") if t is None else float(t.reshape(-1)[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    pl.seed_everything(args.seed, verbose=False)
    started = time.perf_counter()

    text = load_corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(ids))
    train_ids, held_out = ids[:split], ids[split:]
    window = args.tbptt * args.chunks
    data = Streams(train_ids, args.batch_size, window)
    batches = min(args.batches or len(data), len(data))
    counts = torch.bincount(train_ids, minlength=len(chars)).double()
    freq = counts / counts.sum()
    unigram = float(-(freq * freq.clamp_min(1e-12).log2()).sum())
    print(
        f"Corpus: pydoc_data.topics (the Python Language Reference), {len(text):,} characters, "
        f"{len(chars)} distinct.\nTruncated BPTT: {args.batch_size} streams, windows of "
        f"{args.chunks} chunks x {args.tbptt} steps, one optimizer step per chunk "
        f"({batches * args.chunks} steps in all).\n"
    )

    model = CharLSTM(len(chars), args.hidden, args.layers, args.tbptt, args.lr)
    bpc_before = bits_per_char(model, held_out)
    gw = GradWatch(
        every_n_steps=args.every_n_steps,
        thresholds=Thresholds(vanishing_horizon=args.vanishing_horizon),
    )
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=batches,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(save_dir=args.logdir, name=EXAMPLE, version=f"tbptt{args.tbptt}"),
        callbacks=[gw],
        log_every_n_steps=min(10, batches),
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    trainer.fit(model, train_dataloaders=loader)
    bpc_after = bits_per_char(model, held_out)

    # One row per captured optimizer step, i.e. per captured chunk.
    chunk_of = {c["step"]: c for c in model.chunk_log}
    rows = []
    for step, report in sorted(gw.reports.items()):
        m = report.get("lstm")
        if m is None:
            continue
        rows.append(
            {
                "step": step,
                "chunk": chunk_of.get(step, {}).get("chunk", -1),
                "loss": chunk_of.get(step, {}).get("loss", math.nan),
                "seq_len": m.seq_len,
                "gain": _f(m.gain),
                "horizon": _f(m.horizon),
                "forget": _f(m.causes.gate_mean.get("forget")) if m.causes else math.nan,
                "verdict": m.verdict,
            }
        )
    print(
        f"  {'step':>5}  {'chunk':>5}  {'bits/char':>9}  {'seq_len':>7}  {'gain':>6}  "
        f"{'horizon':>7}  {'forget':>6}  verdict"
    )
    shown = rows if len(rows) <= 12 else rows[:4] + rows[-8:]
    for r in shown:
        if r is rows[-8] and len(rows) > 12:
            print(f"  {'...':>5}")
        horizon = "never" if math.isinf(r["horizon"]) else f"{r['horizon']:.1f}"
        print(
            f"  {r['step']:>5}  {r['chunk']:>5}  {r['loss'] / math.log(2):>9.3f}  "
            f"{r['seq_len']:>7}  {r['gain']:>6.3f}  {horizon:>7}  {r['forget']:>6.2f}  "
            f"{r['verdict']}"
        )

    last = rows[-1] if rows else None
    print(
        f"\nHeld-out bits per character: {bpc_before:.2f} before training, {bpc_after:.2f} "
        f"after (a unigram model: {unigram:.2f})."
    )
    if last is not None:
        h = last["horizon"]
        if math.isinf(h) or h >= args.tbptt:
            verdict = (
                f"the horizon ({'never' if math.isinf(h) else f'{h:.0f} steps'}) reaches "
                f"the truncation length {args.tbptt}: the truncation cuts off gradient "
                "that still carries signal; longer chunks (--tbptt) may help."
            )
        else:
            verdict = (
                f"the horizon ({h:.0f} steps) is shorter than the truncation length "
                f"({args.tbptt}): the gradient has died out before the cut, so longer "
                "chunks would cost time without carrying more signal back."
            )
        print(f"gradwatch: {verdict}")
    latest = {}
    if gw.reports:
        latest = dict(gw.reports[-1].items())
    if latest:
        print("\n" + summary_table(latest))
    print(
        "\nSample (temperature 0.7):\n  "
        + sample(model, chars, "The ", 160, args.seed).replace("\n", "\n  ")
    )
    seconds = time.perf_counter() - started
    logdir = Path(args.logdir) / EXAMPLE
    print(
        f"\nDone in {seconds:.0f} s. TensorBoard logs are in {logdir}/; open them with\n"
        f"  tensorboard --logdir {args.logdir}\n"
        "The Images tab shows dL/dh_t across each captured chunk (heatmap) and the "
        "propagation curve with the horizon."
    )
    return {
        "rows": rows,
        "optimizer_steps": len(model.chunk_log),
        "chunks_per_batch": args.chunks,
        "tbptt": args.tbptt,
        "every_n_steps": args.every_n_steps,
        "bpc_before": bpc_before,
        "bpc_after": bpc_after,
        "unigram_bpc": unigram,
        "verdicts": gw.verdicts,
        "seconds": seconds,
        "logdir": str(logdir),
    }


if __name__ == "__main__":
    main()
