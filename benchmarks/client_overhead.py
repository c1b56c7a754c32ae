"""What GradWatch costs inside the libraries where people train recurrent networks.

Rows: darts ``RNNModel`` and ``BlockRNNModel``, neuralforecast ``LSTM``, pytorch-forecasting
``DeepAR`` and the project's reference LSTM language model, each trained the way its library
trains it, with the logger the library attaches by default (darts: none; neuralforecast,
pytorch-forecasting and a plain Lightning ``Trainer``: Lightning's default
``TensorBoardLogger``). Columns: ``GradWatch()`` at its defaults (the overhead budget), the
cheap signals alone at every step (``every_n_steps=10**9, overhead_budget=None``: no capture
after the first step, no signal stride) and an exact capture with diagnostics at every step
(``every_n_steps=1``).

Method (docs/benchmarks.md, "Client overhead"): one training run per row and column, cut into
windows of ``W`` optimizer steps. GradWatch is switched on and off window by window
(``off, on, off, on, ..., off``; hooks removed and no work at all while off), so both sides
share the process, the data, the allocator and the machine's state of the moment. A window is
timed from the start of its first step to the start of the next window (data loading, the
optimizer, Lightning's logging and everything GradWatch does are inside). Each ``on`` window
is compared with the mean of its two ``off`` neighbours; the figure is the sum of the ``on``
windows over the sum of those neighbour means, with a bootstrap 90% interval over windows.
Windows are long enough (``--window-s``) to hold captures in their true proportion; the first
window (GradWatch on: binding, imports, its first measurements) is warm-up and not counted.

    .venv-integrations/bin/python benchmarks/client_overhead.py            # full table
    .venv-integrations/bin/python benchmarks/client_overhead.py --quick    # a smoke run
    .venv-integrations/bin/python benchmarks/client_overhead.py --rows darts-rnn,lm
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import gradwatch

COLUMNS = {
    "defaults": {},
    "cheap signals alone": {"every_n_steps": 10**9, "overhead_budget": None},
    "capture every step": {"every_n_steps": 1},
}


# -- switching GradWatch on and off, and timing windows -----------------------------------------
def _set_active(gw: Any, on: bool) -> None:
    """Hooks in or out, and the step's work done or not (the callback stays registered: while
    off it returns at once from every hook)."""
    core = gw._core
    if on and not gw._training:
        core.attach()
        gw._training = True
    elif not on and gw._training:
        core.detach()
        gw._training = False


class _Windows:
    """A Lightning callback that cuts the run into windows, switches GradWatch and times them.

    Window 0 (``warmup`` steps, GradWatch on) is not counted; then ``off`` and ``on`` windows
    of ``window`` steps alternate, starting and ending with ``off``. The window length is set
    after the warm-up from its median step time unless given.
    """

    def __init__(self, gw: Any, warmup: int, window: int | None, window_s: float) -> None:
        self.gw = gw
        self.warmup = warmup
        self.window = window
        self.window_s = window_s
        self.step_times: list[float] = []
        self.marks: list[float] = []  # start time of each counted window, then the end
        self.kinds: list[str] = []
        self._batches = 0
        self._t = 0.0

    def total_steps(self, pairs: int) -> int:
        assert self.window is not None
        return self.warmup + (2 * pairs + 1) * self.window

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        i = self._batches
        self._batches += 1
        if i < self.warmup:
            self._t = now
            return
        if i == self.warmup and self.window is None:
            self.window = max(5, round(self.window_s / statistics.median(self.step_times)))
        k, r = divmod(i - self.warmup, self.window)
        if r == 0:
            self.marks.append(now)
            kind = "on" if k % 2 else "off"
            self.kinds.append(kind)
            _set_active(self.gw, kind == "on")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batches <= self.warmup:
            self.step_times.append(time.perf_counter() - self._t)

    def on_train_end(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())

    def windows(self) -> tuple[list[float], list[float]]:
        """``(on, neighbour means)``, complete windows only."""
        durations = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        kinds = self.kinds[: len(durations)]
        # the last window may be cut short by the end of training: drop it unless complete
        on, ref = [], []
        for j in range(1, len(durations) - 1):
            if kinds[j] == "on" and kinds[j - 1] == kinds[j + 1] == "off":
                on.append(durations[j])
                ref.append(0.5 * (durations[j - 1] + durations[j + 1]))
        return on, ref


def _windows_callback(gw: Any, warmup: int, window: int | None, window_s: float) -> Any:
    """A `_Windows` that is a Callback of every Lightning namespace installed (darts and
    neuralforecast use ``pytorch_lightning``, pytorch-forecasting ``lightning.pytorch``)."""
    bases: list[type] = []
    try:
        from lightning.pytorch import Callback

        bases.append(Callback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as PLCallback

        bases.append(PLCallback)
    except ImportError:
        pass
    return type("Windows", (_Windows, *bases), {})(gw, warmup, window, window_s)


# -- the rows ------------------------------------------------------------------------------
@dataclass
class Row:
    label: str
    logger: str  # what the library attaches by default
    fit: Callable[[list[Any], int, str], list[Any]]  # (callbacks, max_steps, dir) -> ran
    window_s: float = 1.5  # seconds per window
    extra: dict[str, Any] = field(default_factory=dict)


def _sine(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return (np.sin(0.2 * t) + 0.5 * np.sin(0.031 * t) + 0.1 * rng.standard_normal(n)).astype(
        np.float32
    )


def _darts_trainer_kwargs(callbacks: list[Any], steps: int, root: str) -> dict[str, Any]:
    # darts attaches no logger unless log_tensorboard=True: its default is kept
    return {
        "callbacks": callbacks,
        "accelerator": "cpu",
        "max_steps": steps,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }


def _fit_darts(model_name: str, callbacks: list[Any], steps: int, root: str, **kw: Any):
    import darts.models
    from darts import TimeSeries

    model = getattr(darts.models, model_name)(
        batch_size=32,
        n_epochs=100_000,
        random_state=0,
        work_dir=root,
        pl_trainer_kwargs=_darts_trainer_kwargs(callbacks, steps, root),
        **kw,
    )
    model.fit(TimeSeries.from_values(_sine(4000)))
    return callbacks


def fit_darts_rnn(callbacks: list[Any], steps: int, root: str) -> list[Any]:
    return _fit_darts(
        "RNNModel",
        callbacks,
        steps,
        root,
        model="LSTM",
        hidden_dim=25,
        n_rnn_layers=1,
        input_chunk_length=24,
        training_length=48,
    )


def fit_darts_block(callbacks: list[Any], steps: int, root: str) -> list[Any]:
    return _fit_darts(
        "BlockRNNModel",
        callbacks,
        steps,
        root,
        model="GRU",
        hidden_dim=64,
        n_rnn_layers=2,
        input_chunk_length=24,
        output_chunk_length=12,
    )


def fit_neuralforecast_lstm(callbacks: list[Any], steps: int, root: str) -> list[Any]:
    import pandas as pd
    from neuralforecast import NeuralForecast
    from neuralforecast.models import LSTM

    n = 2000
    df = pd.DataFrame(
        {
            "unique_id": "a",
            "ds": pd.date_range("2000-01-01", periods=n, freq="D"),
            "y": _sine(n),
        }
    )
    # its defaults (2x128 LSTM encoder, windows_batch_size 128) and Lightning's default logger
    model = LSTM(
        h=12,
        input_size=48,
        max_steps=steps,
        random_seed=0,
        callbacks=callbacks,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    nf = NeuralForecast(models=[model], freq="D")
    nf.fit(df)
    # NeuralForecast trains a deep copy of the model, callbacks included
    return list(nf.models[0].trainer_kwargs["callbacks"])


def fit_deepar(callbacks: list[Any], steps: int, root: str) -> list[Any]:
    import lightning.pytorch as L
    import pandas as pd
    from pytorch_forecasting import DeepAR, TimeSeriesDataSet

    rows = []
    for g in range(8):
        y = _sine(600, seed=g) + 3.0
        rows.append(pd.DataFrame({"series": str(g), "time_idx": np.arange(600), "value": y}))
    ds = TimeSeriesDataSet(
        pd.concat(rows, ignore_index=True),
        time_idx="time_idx",
        target="value",
        group_ids=["series"],
        time_varying_unknown_reals=["value"],
        max_encoder_length=48,
        max_prediction_length=12,
    )
    L.seed_everything(0, verbose=False)
    model = DeepAR.from_dataset(ds, hidden_size=32, rnn_layers=2, learning_rate=1e-3)
    # the user builds the Trainer: Lightning's defaults, its TensorBoardLogger included
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(model, train_dataloaders=ds.to_dataloader(train=True, batch_size=32))
    return callbacks


def fit_reference_lm(callbacks: list[Any], steps: int, root: str) -> list[Any]:
    import lightning.pytorch as L

    class LanguageModel(L.LightningModule):
        """Embedding 64 + 2x256 LSTM + vocabulary head; a loss at every step."""

        def __init__(self, vocab: int = 1000) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, 64)
            self.rnn = nn.LSTM(64, 256, num_layers=2)
            self.head = nn.Linear(256, vocab)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            out, _ = self.rnn(self.emb(x.t()))
            loss = nn.functional.cross_entropy(self.head(out).flatten(0, 1), x.t().flatten())
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 1000, (32 * 64, 64), generator=g))
    torch.manual_seed(0)
    trainer = L.Trainer(  # Lightning's defaults: TensorBoardLogger, checkpointing off here
        max_steps=steps,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(LanguageModel(), torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    return callbacks


ROWS = {
    "darts-rnn": Row(
        "darts RNNModel (LSTM 1x25, chunk 24, training_length 48, B 32)", "none", fit_darts_rnn
    ),
    "darts-block": Row("darts BlockRNNModel (GRU 2x64, chunk 24, B 32)", "none", fit_darts_block),
    "nf-lstm": Row(
        "neuralforecast LSTM (2x128, input 48, windows 128)", "TensorBoard", fit_neuralforecast_lstm
    ),
    "deepar": Row(
        "pytorch-forecasting DeepAR (LSTM 2x32, encoder 48, B 32)", "TensorBoard", fit_deepar
    ),
    "lm": Row(
        "reference LM (emb 64, LSTM 2x256, T 64, B 32)",
        "TensorBoard",
        fit_reference_lm,
        window_s=4.0,
    ),
}


# -- measuring -----------------------------------------------------------------------------
@dataclass
class Cell:
    ratio: float
    low: float
    high: float
    windows: int
    window: int
    step_ms: float  # median warm-up step time (GradWatch on)
    off_ms: float  # mean step time of the off windows
    gw: Any = None


def _bootstrap(on: list[float], ref: list[float], n: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    k = len(on)
    stats = []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        stats.append(sum(on[i] for i in idx) / sum(ref[i] for i in idx))
    stats.sort()
    return stats[int(0.05 * n)], stats[int(0.95 * n) - 1]


def measure(row: Row, kwargs: dict[str, Any], pairs: int, window_s: float, warmup: int) -> Cell:
    # Probe the step time first with a short run (the window length must be fixed before the
    # run that is measured: max_steps is given to the Trainer up front).
    with tempfile.TemporaryDirectory() as root:
        probe = _windows_callback(gradwatch.GradWatch(**kwargs), warmup, None, window_s)
        probe.warmup = 10**9
        ran = row.fit([probe.gw, probe], warmup + 5, root)
    ran_probe = next(c for c in ran if isinstance(c, _Windows))
    step = statistics.median(ran_probe.step_times[2:] or ran_probe.step_times)
    window = max(5, round(window_s / step))
    gw = gradwatch.GradWatch(**kwargs)
    win = _windows_callback(gw, warmup, window, window_s)
    with tempfile.TemporaryDirectory() as root:
        ran = row.fit([gw, win], win.total_steps(pairs), root)
    win = next(c for c in ran if isinstance(c, _Windows))
    on, ref = win.windows()
    low, high = _bootstrap(on, ref)
    off = [
        b - a for a, b, k in zip(win.marks, win.marks[1:], win.kinds, strict=False) if k == "off"
    ]
    return Cell(
        ratio=sum(on) / sum(ref),
        low=low,
        high=high,
        windows=len(on),
        window=window,
        step_ms=1e3 * step,
        off_ms=1e3 * statistics.mean(off) / window,
        gw=win.gw,
    )


def _spent(gw: Any) -> str:
    """The overhead GradWatch says it spent, when it reports one."""
    budget = getattr(gw, "overhead", None)
    if budget is None:
        return ""
    try:
        return f"{100 * float(budget.fraction):.1f}%"
    except Exception:
        return ""


def main(argv: list[str] | None = None) -> list[tuple[str, dict[str, Cell]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"among {', '.join(ROWS)}")
    parser.add_argument("--columns", default=",".join(COLUMNS), help=", ".join(COLUMNS))
    parser.add_argument("--pairs", type=int, default=8, help="on windows per cell")
    parser.add_argument("--window-s", type=float, default=None, help="seconds per window")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the first window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 pairs of short windows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # the libraries' banners and gradwatch's summaries

    pairs = 2 if args.quick else args.pairs
    warmup = 5 if args.quick else args.warmup
    rows = [r for r in args.rows.split(",") if r]
    columns = [c for c in args.columns.split(",") if c]
    for r in rows:
        if r not in ROWS:
            parser.error(f"unknown row {r!r}; rows: {', '.join(ROWS)}")
    for c in columns:
        if c not in COLUMNS:
            parser.error(f"unknown column {c!r}; columns: {', '.join(COLUMNS)}")

    results = []
    for key in rows:
        row = ROWS[key]
        window_s = args.window_s or (0.2 if args.quick else row.window_s)
        cells = {c: measure(row, COLUMNS[c], pairs, window_s, warmup) for c in columns}
        results.append((row.label, cells))
        _print_row(row, cells, columns, header=key == rows[0])
    print(
        f"\ntorch {torch.__version__}, {args.threads} thread(s), CPU, wall clock; per cell one "
        f"run of {pairs} on windows between {pairs + 1} off windows; ratio = sum(on) / "
        "sum(mean of the two off neighbours), [bootstrap 90% interval over windows]"
    )
    return results


def _print_row(row: Row, cells: dict[str, Cell], columns: list[str], header: bool) -> None:
    if header:
        print("| model | logger | step (ms) | " + " | ".join(columns) + " |")
        print("|---|---|---|" + "---|" * len(columns))
    base = next(iter(cells.values())).off_ms
    parts = []
    for c in columns:
        cell = cells[c]
        spent = _spent(cell.gw)
        parts.append(
            f"{cell.ratio:.3f} [{cell.low:.3f}, {cell.high:.3f}]"
            + (f" (spent {spent})" if spent and c == "defaults" else "")
        )
    print(f"| {row.label} | {row.logger} | {base:.1f} | " + " | ".join(parts) + " |", flush=True)


if __name__ == "__main__":
    main()
