"""gradwatch on recurrences you unroll yourself: a hand-written RNN and an ``nn.GRUCell`` loop.

* A hand-written recurrence is invisible to gradwatch until you mark its state once per step
  with ``gradwatch.mark_state(name, h)``. Use the first result for everything that leaves
  the recurrence (outputs, the final state) and the second to feed the next step.
* ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` called in a loop need nothing: they are
  found by type and each call becomes one step.

Run it with ``python examples/custom_recurrence.py``.
"""

from __future__ import annotations

import torch
from torch import nn

import gradwatch

STEPS, BATCH, FEATURES, HIDDEN = 12, 4, 3, 16


class LeakyRNN(nn.Module):
    """h_t = (1 - a) h_{t-1} + a tanh(x_t U + h_{t-1} W), with a loss on every step."""

    def __init__(self, leak: float = 0.3) -> None:
        super().__init__()
        self.leak = leak
        self.U = nn.Parameter(torch.randn(FEATURES, HIDDEN) / FEATURES**0.5)
        self.W = nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = xs.new_zeros(xs.shape[1], HIDDEN)
        outputs = []
        for x_t in xs:
            h = (1 - self.leak) * h + self.leak * torch.tanh(x_t @ self.U + h @ self.W)
            out_t, h = gradwatch.mark_state("leaky", h)  # out_t leaves, h goes on
            outputs.append(self.head(out_t))
        return torch.stack(outputs)  # [T, B, 1]


class GRULoop(nn.Module):
    """An ``nn.GRUCell`` stepped by hand; the loss reads only the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = None
        for x_t in xs:
            h = self.cell(x_t, h)
        return self.head(h)  # [B, 1]


def show(rep: gradwatch.ModuleReport) -> None:
    print(f"\n{rep.name}: kind={rep.kind}, source={rep.source}, exact={rep.exact}")
    print(f"{'t':>3}  {'total':>9}  {'carried':>9}  {'direct':>9}")
    for t in range(rep.steps):
        values = (s[0, 0, t].item() for s in (rep.total, rep.carried, rep.direct))
        print(f"{t:>3}  " + "  ".join(f"{v:9.2e}" for v in values))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xs = torch.randn(STEPS, BATCH, FEATURES)

    leaky = LeakyRNN()
    with gradwatch.trace(leaky) as tr:
        leaky(xs).pow(2).mean().backward()  # a loss on every step: direct is never zero
    show(tr.report()["leaky"])

    loop = GRULoop()
    with gradwatch.trace(loop) as tr:
        loop(xs).pow(2).mean().backward()  # a loss on the last step: only carried before it
    show(tr.report()["cell"])


if __name__ == "__main__":
    main()
