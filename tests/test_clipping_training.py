"""Every strategy, at its defaults, keeps an exploding ReLU RNN finite in a plain PyTorch loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch._clipping import STRATEGY_NAMES, Clipper
from gradwatch._clipping import functional as F

HIDDEN, T, BATCH, STEPS = 32, 50, 16, 120


def _problem(recurrent_scale: float, seed: int = 0):
    """ReLU RNN (input size 1) with W_hh = scale·I (an IRNN), a linear read-out, fixed data."""
    torch.manual_seed(seed)
    rnn = nn.RNN(1, HIDDEN, nonlinearity="relu", batch_first=True)
    head = nn.Linear(HIDDEN, 1)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(recurrent_scale * torch.eye(HIDDEN))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, T, 1, generator=gen)
    y = x[:, -5:].sum(dim=1)  # the sum of the last five inputs
    return rnn, head, x, y


def _train(strategy, *, recurrent_scale, lr=0.01, loss_scale=1.0, jump_at=None, mode="always"):
    """SGD; ``jump_at`` resets W_hh to 1.5·I mid-run: the gradient norm jumps ~1e17-fold."""
    rnn, head, x, y = _problem(recurrent_scale)
    params = [*rnn.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    clipper = None if strategy is None else Clipper(strategy, mode=mode)
    losses, events = [], []
    for step in range(STEPS):
        if step == jump_at:
            with torch.no_grad():
                rnn.weight_hh_l0.copy_(1.5 * torch.eye(HIDDEN))
        opt.zero_grad()
        out, _ = rnn(x)
        loss = loss_scale * ((head(out[:, -1]) - y) ** 2).mean()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        if clipper is not None:
            # stand-in for gradwatch's detector in reactive mode
            exploding = F.total_norm([p.grad for p in params]) > 100.0
            event = clipper.clip(params, exploding=exploding)
            events.append(event)
            if event is not None and event.skip_step:
                continue
        opt.step()
    return losses, params, events


def _finite(losses, params) -> bool:
    return all(math.isfinite(v) for v in losses) and all(
        bool(torch.isfinite(p).all()) for p in params
    )


# From the first step: W_hh = I already explodes with lr 0.01 (norm ~7e2, then inf); with
# 1.5·I the first norm is ~7e17, with 2·I ~4e29, past what a float32 norm can hold.
SCALES = [1.0, 1.5, 2.0]


@pytest.mark.parametrize("scale", SCALES)
def test_without_clipping_the_loss_becomes_nonfinite(scale):
    losses, _, _ = _train(None, recurrent_scale=scale)
    assert not math.isfinite(losses[-1])
    assert len(losses) <= 3


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("scale", SCALES)
def test_each_strategy_keeps_training_finite(strategy, scale):
    losses, params, events = _train(strategy, recurrent_scale=scale)
    assert len(losses) == STEPS
    assert _finite(losses, params)
    assert events[0].clipped and events[0].total_norm > 100.0
    assert not any(e.skip_step for e in events)


def _jump_run(strategy, mode="always"):
    # Calm training (norms ~0.1) for 40 steps, then a jump to an exploding W_hh.
    return _train(strategy, recurrent_scale=0.5, lr=0.05, loss_scale=0.05, jump_at=40, mode=mode)


def test_without_clipping_a_sudden_explosion_becomes_nonfinite():
    losses, _, _ = _jump_run(None)
    assert not math.isfinite(losses[-1]) and len(losses) <= 43


@pytest.mark.parametrize("mode", ["always", "reactive"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_each_strategy_survives_a_sudden_explosion(strategy, mode):
    losses, params, events = _jump_run(strategy, mode)
    assert len(losses) == STEPS and _finite(losses, params)
    after = [e for e in events[40:] if e is not None]
    assert after and all(e.clipped for e in after[:5])


@pytest.mark.parametrize("mode", ["always", "reactive"])
@pytest.mark.parametrize("strategy", ["autoclip", "zscore"])
def test_adaptive_threshold_is_not_poisoned_by_the_explosion(strategy, mode):
    _, _, events = _jump_run(strategy, mode)
    calm = [e for e in events[30:40] if e is not None]
    exploding = [e for e in events[40:] if e is not None]
    assert max(e.total_norm for e in exploding) > 1e15
    if mode == "always":
        assert all(e.total_norm < 1.0 for e in calm) and not any(e.warmup for e in calm)
        ceiling = 1.5 * max(e.threshold for e in calm)
    else:
        ceiling = 1.5 * exploding[0].threshold  # ready on the first reactive clip
        assert exploding[0].threshold < 1.0
    assert all(e.threshold <= ceiling for e in exploding)
