"""gradwatch demo: watch the gradient flow back through time in an LSTM and a tanh RNN.

Two small sequence models of the same size (2 layers, 32 hidden units, 40 steps) are given
one training step each, with the loss on the last step only. ``gradwatch.trace`` records
dL/dh_t, the gradient of the loss with respect to each hidden state, and we print it for
the top layer:

* ``total``     everything that reaches h_t;
* ``carried``   the part that came back through the recurrence from step t+1;
* ``direct``    the part injected at step t from outside (here: the head, at the last step);
* ``cell``      LSTM only: dL/dc_t, the gradient on the cell state.

With PyTorch's default initialisation a tanh RNN keeps only about half of its gradient per
step, so after 40 steps almost nothing is left. The LSTM uses the common forget-gate bias
of 1 (Jozefowicz, Zaremba & Sutskever, 2015), so its forget gates start around
sigmoid(1) = 0.73 instead of 0.5 and its cell path carries the gradient much further. A
default-initialised LSTM is traced too, to show how much that bias matters.

Run it with ``python examples/trace_table.py``. It takes a few seconds on a CPU.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

import gradwatch

STEPS, BATCH, FEATURES, HIDDEN, LAYERS = 40, 16, 8, 32, 2


class SequenceModel(nn.Module):
    """A recurrent encoder followed by a linear head that reads the last step."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # out: [T, B, HIDDEN], time-major
        return self.head(out[-1])  # prediction from the last step only


def set_forget_bias(lstm: nn.LSTM, value: float) -> nn.LSTM:
    """Make the effective forget-gate bias (``bias_ih_f + bias_hh_f``) equal to ``value``."""
    h = lstm.hidden_size
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("bias_"):  # gate order i, f, g, o: f is the second block
                p[h : 2 * h].fill_(value if name.startswith("bias_ih") else 0.0)
    return lstm


def traced_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> gradwatch.ModuleReport:
    """One ordinary training step, inside a trace; returns the report of ``model.rnn``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.trace(model) as tr:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
    optimizer.step()  # the trace changes nothing: training goes on as usual
    return tr.report()["rnn"]


def print_table(title: str, rep: gradwatch.ModuleReport) -> None:
    layer = rep.num_layers - 1  # the top layer, direction 0
    has_cell = rep.cell_total is not None
    print(f"\n{title}: {rep.kind}, top layer (layer {layer}), {rep.steps} steps")
    header = f"{'t':>4}  {'total':>10}  {'carried':>10}  {'direct':>10}"
    print(header + (f"  {'cell':>10}" if has_cell else ""))
    last = rep.steps - 1
    for t in [*range(0, last, 4), last]:
        row = f"{t:>4}"
        for series in (rep.total, rep.carried, rep.direct):
            row += f"  {series[layer, 0, t].item():10.3e}"
        if has_cell:
            row += f"  {rep.cell_total[layer, 0, t].item():10.3e}"
        print(row)
    print(f"exact={rep.exact}  fidelity={rep.fidelity:.1e}  source={rep.source}")


def decades(first: float, last: float) -> str:
    """The ratio first/last as a power of ten, e.g. ``10^-11.8``."""
    if first == 0.0:
        return "0 (below float range)"
    return f"10^{math.log10(first / last):+.1f}"


def main() -> None:
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    x = torch.randn(STEPS, BATCH, FEATURES)
    y = torch.randn(BATCH, 1)

    lstm = SequenceModel(set_forget_bias(nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS), 1.0))
    rnn = SequenceModel(nn.RNN(FEATURES, HIDDEN, num_layers=LAYERS, nonlinearity="tanh"))
    default_lstm = SequenceModel(nn.LSTM(FEATURES, HIDDEN, num_layers=LAYERS))
    reports = {
        "LSTM (forget bias 1)": traced_step(lstm, x, y),
        "tanh RNN (default init)": traced_step(rnn, x, y),
    }
    for title, rep in reports.items():
        print_table(title, rep)
    reports["LSTM (default init)"] = traced_step(default_lstm, x, y)

    print("\nHow much of the last step's gradient reaches t=0 (top layer, total dL/dh_t):")
    for title, rep in reports.items():
        total = rep.total[-1, 0]
        line = f"  {title:<23}  total[0] / total[{rep.steps - 1}] = {decades(total[0], total[-1])}"
        if rep.cell_total is not None:
            cell = rep.cell_total[-1, 0]
            line += f"   (cell: {decades(cell[0], cell[-1])})"
        print(line)

    print("\nComing next: TensorBoard panels and a PyTorch Lightning callback (not available yet).")


if __name__ == "__main__":
    main()
