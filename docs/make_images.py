"""Draw the pictures of gradwatch's panels used in the README and the documentation.

Two small models are trained for a few steps on the same regression task (the target is read
from the last step only, so every gradient has to travel back through time):

* a default-initialised tanh ``nn.RNN``: its gradient vanishes within a few steps;
* an ``nn.LSTM`` whose forget-gate bias is set to 3: its cell path carries the gradient
  across the whole sequence.

Every training step runs inside ``gradwatch.trace``; the reports are drawn with the very
functions that produce the TensorBoard images (``gradwatch._outputs.figures``). Nothing is
hand-drawn. Run from the repository root::

    .venv/bin/python docs/make_images.py

It writes ``docs/images/panels.png`` (both models, the three pictures side by side),
``docs/images/heatmap.png`` and ``docs/images/propagation.png`` in a few seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.image import imsave
from torch import nn

import gradwatch
from gradwatch._outputs.figures import heatmap_figure, profile_figure, propagation_figure, render

STEPS, BATCH, FEATURES, HIDDEN, TRAIN_STEPS = 60, 32, 4, 32, 40
DPI = 90
OUT = Path(__file__).resolve().parent / "images"


class Regressor(nn.Module):
    """A recurrent encoder and a linear head that reads the last step only."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # [T, B, HIDDEN]
        return self.head(out[-1])


def lstm_with_forget_bias(value: float) -> nn.LSTM:
    """An LSTM whose effective forget bias ``b_if + b_hf`` is ``value`` (gates i, f, g, o)."""
    lstm = nn.LSTM(FEATURES, HIDDEN)
    with torch.no_grad():
        lstm.bias_ih_l0[HIDDEN : 2 * HIDDEN].fill_(value)
        lstm.bias_hh_l0[HIDDEN : 2 * HIDDEN].fill_(0.0)
    return lstm


def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sequences; the target depends on the first steps (a long-range dependency)."""
    x = torch.randn(STEPS, BATCH, FEATURES, generator=generator)
    y = x[:5, :, :1].sum(0)
    return x, y


def train(model: nn.Module) -> tuple[list[int], list[gradwatch.ModuleReport]]:
    """A few Adam steps, each traced; returns the steps and the reports of ``model.rnn``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    steps, reports = [], []
    for step in range(TRAIN_STEPS):
        x, y = batch(generator)
        optimizer.zero_grad()
        with gradwatch.trace(model) as tr:
            nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        steps.append(step)
        reports.append(tr.report()["rnn"])
    return steps, reports


def pictures(steps: list[int], reports: list[gradwatch.ModuleReport]) -> list[np.ndarray]:
    """Heatmap over training, latest profile and propagation curve, as RGB arrays."""
    latest = reports[-1]
    profiles = [m.total.numpy() for m in reports]
    figures = [
        heatmap_figure(latest, steps, profiles, dpi=DPI),
        profile_figure(latest, dpi=DPI),
        propagation_figure(latest, dpi=DPI),
    ]
    return [render(f) for f in figures if f is not None]


def row(images: list[np.ndarray]) -> np.ndarray:
    height = max(i.shape[0] for i in images)
    padded = [
        np.pad(i, ((0, height - i.shape[0]), (0, 0), (0, 0)), constant_values=255) for i in images
    ]
    return np.concatenate(padded, axis=1)


def column(images: list[np.ndarray]) -> np.ndarray:
    width = max(i.shape[1] for i in images)
    padded = [
        np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255) for i in images
    ]
    return np.concatenate(padded, axis=0)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rnn = Regressor(nn.RNN(FEATURES, HIDDEN, nonlinearity="tanh"))
    torch.manual_seed(0)
    lstm = Regressor(lstm_with_forget_bias(3.0))

    drawn = {}
    for title, model in (("tanh RNN", rnn), ("LSTM, forget bias 3", lstm)):
        steps, reports = train(model)
        m = reports[-1]
        print(
            f"{title:<20} verdict={m.verdict:<9} gain={float(m.gain[0, 0]):.3f} "
            f"horizon={float(m.horizon[0, 0]):.1f} of {m.seq_len} steps  exact={m.exact}"
        )
        drawn[title] = pictures(steps, reports)

    OUT.mkdir(exist_ok=True)
    rnn_row, lstm_row = drawn["tanh RNN"], drawn["LSTM, forget bias 3"]
    files = {
        "panels.png": column([row(rnn_row), row(lstm_row)]),
        "heatmap.png": row([rnn_row[0], lstm_row[0]]),
        "propagation.png": row([rnn_row[2], lstm_row[2]]),
    }
    for name, image in files.items():
        path = OUT / name
        imsave(path, image)
        print(
            f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
            f" ({path.stat().st_size // 1024} KB)"
        )


if __name__ == "__main__":
    main()
