"""Clipping strategies and the Clipper against hand computations and independent references."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch._clipping import (
    AGC,
    STRATEGY_NAMES,
    AutoClip,
    ClipEvent,
    Clipper,
    NormClip,
    ValueClip,
    ZScoreClip,
    resolve_strategy,
)
from gradwatch._clipping import functional as F


def _param(grad: list | torch.Tensor, weight: list | torch.Tensor | None = None) -> nn.Parameter:
    g = torch.as_tensor(grad, dtype=torch.float32)
    w = torch.ones_like(g) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    return p


def _norms(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(x) for x in rng.lognormal(mean=-1.0, sigma=0.5, size=n)]


# ---------------------------------------------------------------- functional


def test_total_norm_is_the_norm_of_the_concatenation():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0, 12.0]])]
    assert F.total_norm(grads) == pytest.approx(13.0, rel=1e-15)
    assert F.total_norm(grads, math.inf) == 12.0
    assert F.total_norm(grads, 1.0) == 19.0
    assert F.total_norm([]) == 0.0


def test_total_norm_does_not_overflow_float32():
    # 1e20 entries: their squares overflow float32, yet the gradient is finite and clippable.
    grads = [torch.full((4,), 1e20), torch.full((3, 3), 1e30)]
    expected = math.sqrt(4 * 1e40 + 9 * 1e60)
    assert F.total_norm(grads) == pytest.approx(expected, rel=1e-6)
    assert math.isinf(torch.linalg.vector_norm(grads[0]).item())  # what float32 would give


@pytest.mark.parametrize("q", [0.0, 10.0, 37.5, 50.0, 99.9, 100.0])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(q, n):
    values = _norms(n, seed=n)
    assert F.percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)


def test_percentile_worked_example():
    assert F.percentile(range(1, 11), 10) == pytest.approx(1.9)  # AutoClip's p = 10 on 1..10


# ---------------------------------------------------------------- NormClip


def test_norm_clip_scales_to_the_threshold():
    a, b = _param([3.0]), _param([[4.0]])
    event = Clipper(NormClip(max_norm=1.0)).clip([a, b])
    assert event.total_norm == 5.0 and event.threshold == 1.0
    assert event.coefficient == pytest.approx(0.2) and event.clipped
    torch.testing.assert_close(a.grad, torch.tensor([0.6]))
    torch.testing.assert_close(b.grad, torch.tensor([[0.8]]))


def test_norm_clip_leaves_small_gradients_bit_for_bit():
    g = torch.tensor([0.3, -0.4, 0.1])
    p = _param(g)
    event = Clipper("norm").clip([p])
    assert not event.clipped and event.coefficient == 1.0
    assert torch.equal(p.grad, g)


def test_norm_clip_inf_norm():
    p = _param([3.0, -4.0])
    event = Clipper(NormClip(max_norm=2.0, norm_type=math.inf)).clip([p])
    assert event.total_norm == 4.0 and event.coefficient == 0.5
    torch.testing.assert_close(p.grad, torch.tensor([1.5, -2.0]))


def test_parameters_without_gradients_are_ignored():
    p, q = _param([3.0, 4.0]), nn.Parameter(torch.ones(2))
    assert Clipper("norm").clip([p, q]).total_norm == 5.0
    assert q.grad is None
    assert Clipper("norm").clip([q]) is None


# ---------------------------------------------------------------- ValueClip


def test_value_clip_clamps_entries():
    p = _param([0.5, -3.0, 2.0])
    event = Clipper(ValueClip(clip_value=1.0)).clip([p])
    torch.testing.assert_close(p.grad, torch.tensor([0.5, -1.0, 1.0]))
    assert event.clipped and event.threshold == 1.0
    assert event.total_norm == pytest.approx(math.sqrt(0.25 + 9 + 4))
    assert event.coefficient == pytest.approx(math.sqrt(0.25 + 1 + 1) / math.sqrt(13.25))


def test_value_clip_below_bound_is_untouched():
    g = torch.tensor([0.5, -0.9])
    p = _param(g)
    event = Clipper("value").clip([p])
    assert not event.clipped and event.coefficient == 1.0 and torch.equal(p.grad, g)


# ---------------------------------------------------------------- AGC


def _agc_reference(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """Unit by unit with plain Python loops: dim 0 indexes units; vectors are one unit."""
    units = [(w, g)] if w.ndim <= 1 else [(w[i], g[i]) for i in range(w.shape[0])]
    out = []
    for wi, gi in units:
        w_norm = max(math.sqrt(sum(float(v) ** 2 for v in wi.flatten())), eps)
        g_norm = math.sqrt(sum(float(v) ** 2 for v in gi.flatten()))
        limit = clipping * w_norm
        out.append(gi * (limit / g_norm) if g_norm > limit else gi.clone())
    return out[0] if w.ndim <= 1 else torch.stack(out)


def test_agc_worked_example():
    # Row norms ‖W‖ = (1, 0.001) and ‖G‖ = (0.1, 1); λ = 0.01 → clipped to (0.01, 1e-5).
    w = torch.tensor([[0.6, 0.8], [0.0, 0.001]])
    g = torch.tensor([[0.0, 0.1], [1.0, 0.0]])
    p = _param(g, w)
    event = Clipper("agc").clip([p])
    assert event.clipped and event.threshold == 0.01
    torch.testing.assert_close(p.grad, torch.tensor([[0.0, 0.01], [1e-5, 0.0]]))


@pytest.mark.parametrize(
    "shape", [(6, 4), (5, 3, 2, 2), (7,), (4, 3, 5)], ids=["linear", "conv2d", "bias", "conv1d"]
)
def test_agc_unitwise_matches_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=gen)
    if len(shape) > 1:
        w[0].zero_()  # a dead unit: the eps floor applies
    # scale gradients per unit so that some units are clipped and others not
    scale = torch.logspace(-4, 0, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    g = torch.randn(shape, generator=gen) * (scale if len(shape) > 1 else 0.05)
    expected = _agc_reference(w, g, 0.01, 1e-3)
    p = _param(g, w)
    Clipper(AGC(clipping=0.01, eps=1e-3)).clip([p])
    torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-12)


def test_agc_on_a_model_clips_each_parameter_alone():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    expected = [_agc_reference(p.detach(), p.grad, 0.01, 1e-3) for p in model.parameters()]
    event = Clipper("agc").clip(model.parameters())
    assert event.clipped and 0 < event.coefficient < 1
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- AutoClip


def test_autoclip_paper_rule_is_numpy_percentile_of_the_history():
    norms = _norms(300)
    clip = AutoClip(percentile=10, history=50, warmup=0, warmup_max_norm=None, spike_cap=None)
    for t, g in enumerate(norms):
        window = norms[max(0, t + 1 - 50) : t + 1]  # bounded, current norm included
        assert clip.observe(g) == pytest.approx(np.percentile(window, 10), rel=1e-12)


def test_autoclip_defaults_against_reference():
    # Independent re-statement of the documented rule, with numpy.
    norms = _norms(120, seed=1)
    norms[60:62] = [1e10, 1e20]
    clip = AutoClip()
    history: list[float] = []
    in_force = 1.0
    for t, g in enumerate(norms):
        history.append(min(g, 10.0 * in_force))
        history = history[-1000:]
        in_force = 1.0 if t < 25 else float(np.percentile(history, 10))
        assert clip.observe(g) == pytest.approx(in_force, rel=1e-12)


def test_autoclip_warmup_applies_a_fixed_max_norm():
    clip = Clipper(AutoClip(warmup=3, warmup_max_norm=0.5))
    events = []
    for _ in range(5):
        p = _param([3.0, 4.0])
        events.append(clip.clip([p]))
    assert [e.warmup for e in events] == [True, True, True, False, False]
    assert [e.threshold for e in events[:3]] == [0.5] * 3
    assert all(e.clipped for e in events[:3])
    # first step after warm-up: percentile of min(5, 10·0.5) = 5 → 5, so nothing is clipped
    assert events[3].threshold == 5.0 and not events[3].clipped


def test_autoclip_threshold_survives_a_spike():
    norms = _norms(200, seed=2)
    mild, spiky = AutoClip(), AutoClip()
    for g in norms:
        before = mild.observe(g)
        spiky.observe(g)
    # A 1e20 spike moves the percentile exactly as far as any norm above the threshold does.
    mild_after = [mild.observe(2 * max(norms)) for _ in range(2)]
    spiky_after = [spiky.observe(g) for g in (1e10, 1e20)]
    assert spiky_after == mild_after
    assert spiky_after[-1] < 1.2 * before
    assert max(spiky.norms) <= 10.0 * spiky_after[0]  # the spikes entered capped


def test_autoclip_lasting_explosion_grows_the_threshold_slowly():
    capped, paper = AutoClip(history=100), AutoClip(history=100, spike_cap=None)
    for g in _norms(100, seed=3):
        before = capped.observe(g)
        paper.observe(g)
    for _ in range(300):
        t_capped, t_paper = capped.observe(1e20), paper.observe(1e20)
    assert t_paper == 1e20  # without the cap the history adopts the explosion
    # With it, 90 steps (90% of the window) above the threshold raise it at most 10-fold.
    assert t_capped <= before * 10.0 ** math.ceil(300 / 90)


# ---------------------------------------------------------------- ZScoreClip


def _zscore_reference(norms, alpha, z_thr, warmup, cap, eps):
    """ZClip's zscore/adaptive_scaling rule, written with numpy; warm-up records min(g, cap)."""
    thresholds = []
    buf: list[float] = []
    mean = var = None
    for g in norms:
        if mean is None:
            buf.append(min(g, cap))
            if len(buf) == warmup:
                mean, var = float(np.mean(buf)), float(np.var(buf))
            thresholds.append(cap)
            continue
        std = np.sqrt(var)
        z = (g - mean) / (std + eps)
        if z > z_thr:
            clipped = mean + z_thr**2 * std / z
            thresholds.append(clipped)
        else:
            clipped = g
            thresholds.append(mean + z_thr * (std + eps))
        mean = alpha * mean + (1 - alpha) * clipped
        var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
    return thresholds, mean, var


@pytest.mark.parametrize("cap", [1.0, 0.3])
def test_zscore_matches_numpy_reference(cap):
    norms = _norms(200, seed=4)
    norms[80] = norms[120] = 1e20
    norms[150] = 5.0
    expected, mean, var = _zscore_reference(norms, 0.97, 2.5, 25, cap, 1e-6)
    clip = ZScoreClip(warmup_max_norm=cap)
    got = [clip.observe(g) for g in norms]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert clip.mean == pytest.approx(mean, rel=1e-12) and clip.var == pytest.approx(var, rel=1e-9)


def test_zscore_worked_example():
    clip = ZScoreClip()
    clip.load_state_dict({"warmup_norms": [], "mean": 1.0, "var": 0.01})
    z = 1.0 / (0.1 + 1e-6)
    assert clip.observe(2.0) == pytest.approx(1.0 + 2.5**2 * 0.1 / z, rel=1e-12)  # ≈ 1.0625
    capped = ZScoreClip(max_norm=1.0)
    capped.load_state_dict({"warmup_norms": [], "mean": 1.0, "var": 0.01})
    assert capped.observe(2.0) == 1.0  # ZClip's max_grad_norm


def test_zscore_spike_does_not_move_the_mean():
    clip = ZScoreClip()
    for g in _norms(100, seed=5):
        clip.observe(g)
    mean, var = clip.mean, clip.var
    threshold = clip.observe(1e20)
    assert threshold == pytest.approx(mean, rel=1e-6)  # a huge z clips to about μ
    assert clip.mean == pytest.approx(mean, rel=1e-6)
    assert clip.var <= var


def test_zscore_warmup_is_not_poisoned_by_an_explosion_from_the_start():
    ours, raw = ZScoreClip(), ZScoreClip(warmup_max_norm=None)
    for _ in range(25):
        assert ours.observe(1e15) == 1.0
        assert raw.observe(1e15) == math.inf  # ZClip without max_grad_norm: no clipping
    assert ours.mean == 1.0
    assert raw.mean == 1e15  # what ZClip's raw warm-up would adopt


# ---------------------------------------------------------------- Clipper: modes, policies


@pytest.mark.parametrize("name", ["autoclip", "zscore"])
def test_reactive_mode_observes_every_step(name):
    always, reactive = Clipper(name), Clipper(name, mode="reactive")
    for t, g in enumerate(_norms(60, seed=6)):
        a, r = _param([g]), _param([g])
        ea = always.clip([a])
        er = reactive.clip([r], exploding=t % 10 == 9)
        if t % 10 == 9:
            assert er.reason == "reactive: exploding"
            assert er.threshold == ea.threshold and torch.equal(r.grad, a.grad)
        else:
            assert er is None and r.grad.item() == pytest.approx(g)
    assert always.state_dict() == reactive.state_dict()


def _nan_param():
    return _param([1.0, float("nan"), 3.0])


@pytest.mark.parametrize("mode", ["always", "reactive"])
def test_nonfinite_skip(mode):
    clip = Clipper("autoclip", mode=mode, nonfinite="skip")
    p = _nan_param()
    event = clip.clip([p])
    assert event.reason == "nonfinite: skip" and event.skip_step and not event.clipped
    assert event.threshold is None and math.isnan(event.total_norm)
    assert torch.isnan(p.grad[1]) and p.grad[0] == 1.0  # untouched
    assert clip.strategy.norms == []  # the history never sees it


def test_nonfinite_zero():
    p, q = _nan_param(), _param([[float("inf")]])
    event = Clipper("zscore", nonfinite="zero").clip([p, q])
    assert event.reason == "nonfinite: zero" and event.clipped and not event.skip_step
    assert event.coefficient == 0.0 and not math.isfinite(event.total_norm)
    assert torch.equal(p.grad, torch.zeros(3)) and torch.equal(q.grad, torch.zeros(1, 1))


def test_nonfinite_leave():
    p = _nan_param()
    event = Clipper("norm", mode="reactive", nonfinite="leave").clip([p])
    assert event.reason == "nonfinite: leave" and not event.clipped and not event.skip_step
    assert torch.isnan(p.grad[1])


def test_event_is_a_plain_dataclass():
    event = Clipper("norm").clip([_param([3.0, 4.0])])
    assert isinstance(event, ClipEvent) and event.step == 0 and event.strategy == "norm"


# ---------------------------------------------------------------- configuration


def test_resolve_strategy():
    kinds = {
        "norm": NormClip,
        "value": ValueClip,
        "autoclip": AutoClip,
        "zscore": ZScoreClip,
        "agc": AGC,
    }
    assert set(STRATEGY_NAMES) == set(kinds)
    for name, cls in kinds.items():
        assert type(resolve_strategy(name)) is cls
    s = AutoClip(percentile=5)
    assert resolve_strategy(s) is s
    with pytest.raises(ValueError, match="'norm', 'value', 'autoclip', 'zscore', 'agc'"):
        resolve_strategy("adaptive")
    with pytest.raises(ValueError, match=r"pass an instance, AGC\(\)"):
        resolve_strategy(AGC)
    with pytest.raises(ValueError, match="unknown clipping strategy"):
        Clipper(1.0)


@pytest.mark.parametrize(
    "kwargs", [{"scope": "rnn"}, {"mode": "sometimes"}, {"nonfinite": "raise"}]
)
def test_clipper_rejects_unknown_options(kwargs):
    with pytest.raises(ValueError, match="must be one of"):
        Clipper("norm", **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: NormClip(max_norm=0),
        lambda: ValueClip(-1),
        lambda: AGC(eps=0),
        lambda: AutoClip(percentile=101),
        lambda: AutoClip(history=0),
        lambda: AutoClip(spike_cap=0.5),
        lambda: ZScoreClip(alpha=1.0),
        lambda: ZScoreClip(warmup_steps=0),
    ],
)
def test_strategies_reject_bad_settings(make):
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- state


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
@pytest.mark.parametrize("split", [10, 40])  # inside and after the warm-up
def test_resume_continues_the_threshold_exactly(name, split):
    norms = _norms(80, seed=7)
    norms[50] = 1e20

    def grads(t):
        return [_param([norms[t], 0.5 * norms[t]], [1.0, 2.0])]

    whole = Clipper(name)
    expected = [whole.clip(grads(t)).threshold for t in range(80)]
    first = Clipper(name)
    got = [first.clip(grads(t)).threshold for t in range(split)]
    second = Clipper(name)
    second.load_state_dict(_roundtrip(first.state_dict()))
    got += [second.clip(grads(t)).threshold for t in range(split, 80)]
    assert got == expected  # exactly, not approximately
    assert second.step == 80 and second.state_dict() == whole.state_dict()


def test_loading_another_strategys_state_fails():
    state = Clipper("autoclip").state_dict()
    with pytest.raises(ValueError, match="'autoclip'"):
        Clipper("zscore").load_state_dict(state)
