"""Diagnostics (propagation, gain, horizon, causes, verdicts) against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._analysis.quantities.causes import spectral_norm, spectral_radius
from gradwatch._analysis.quantities.propagation import propagate
from gradwatch._capture.recurrences import LayerWeights, Recurrence


def _permutation(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)]


def _linear_relu_rnn(rho: float, hidden: int = 16, layers: int = 1, bidir: bool = False):
    """A ReLU RNN that stays in its linear regime: W_hh = rho * permutation (orthogonal),
    positive inputs, weights and biases keep every pre-activation positive."""
    rnn = nn.RNN(3, hidden, num_layers=layers, nonlinearity="relu", bidirectional=bidir)
    rnn = rnn.double()
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(rho * _permutation(hidden, seed=len(name)))
            elif name.startswith("weight_ih"):
                p.uniform_(0.1, 0.5)
            else:
                p.fill_(0.1)
    return rnn


def _trace_last_step_loss(model, x, **kw):
    with gradwatch.trace(model, **kw) as tr:
        out, _ = model(x)
        last = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
        (last**2).sum().backward()
    return tr.report()


@pytest.mark.parametrize("rho", [0.7, 0.95, 1.0, 1.1])
def test_linear_orthogonal_attenuation_is_rho_to_the_k(rho):
    rnn = _linear_relu_rnn(rho)
    x = torch.rand(40, 4, 3, dtype=torch.float64)
    m = _trace_last_step_loss(rnn, x)["RNN"]
    k = torch.arange(40, dtype=torch.float64)
    expected = k * math.log10(rho)
    assert torch.allclose(m.propagation[0, 0].double(), expected, atol=1e-5, rtol=0)
    assert m.gain[0, 0].item() == pytest.approx(rho, rel=1e-6)
    assert m.log10_attenuation[0, 0].item() == pytest.approx(39 * math.log10(rho), abs=1e-5)
    if rho < 1:
        horizon = math.log(0.01) / math.log(rho)
        assert m.horizon[0, 0].item() == pytest.approx(horizon, rel=1e-4)
        assert m.efold[0, 0].item() == pytest.approx(-1 / math.log(rho), rel=1e-5)
    else:
        assert m.horizon[0, 0].item() == math.inf


class _LinearRecurrence(Recurrence):
    """h' = h W^T + x: the step Jacobian is W^T for any W (test-only)."""

    def forward(self, x, h0, c0, valid):
        self.steps = x.shape[0]
        return x, h0, None

    def step_back(self, t, dh, dc, valid):
        da = dh if valid is None else dh * valid[t]
        return da, da @ self.w.w_hh, None, None


@pytest.mark.parametrize("rho", [0.3, 0.9, 1.05])
def test_generic_orthogonal_matrix_gives_exact_gain(rho):
    q, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    w = rho * q
    rec = _LinearRecurrence(LayerWeights(w, w, None, None), reverse=False)
    rec.forward(torch.zeros(30, 5, 24, dtype=torch.float64), None, None, None)
    lengths = torch.full((5,), 30)
    prop = propagate(rec, None, lengths, (24,))
    k = torch.arange(30, dtype=torch.float64)
    assert torch.allclose(prop.curve, k * math.log(rho), atol=1e-9)
    assert prop.gain.item() == pytest.approx(rho, rel=1e-9)


def test_underflow_gain_point_three_over_500_steps():
    rnn = _linear_relu_rnn(0.3)
    x = torch.rand(500, 2, 3, dtype=torch.float64)
    m = _trace_last_step_loss(rnn, x)["RNN"]
    assert m.gain[0, 0].item() == pytest.approx(0.3, rel=1e-6)
    # 0.3 ** 499 = 1e-261: far below float32 and near the float64 limit, still exact
    assert m.log10_attenuation[0, 0].item() == pytest.approx(499 * math.log10(0.3), rel=1e-6)
    assert m.propagation[0, 0, -1].item() == pytest.approx(499 * math.log10(0.3), rel=1e-6)
    assert m.horizon[0, 0].item() == pytest.approx(math.log(0.01) / math.log(0.3), rel=1e-4)
    assert m.verdict == "vanishing"


def test_underflow_in_float32_module():
    rnn = _linear_relu_rnn(0.3).float()
    x = torch.rand(500, 2, 3)
    m = _trace_last_step_loss(rnn, x)["RNN"]
    assert m.gain[0, 0].item() == pytest.approx(0.3, rel=1e-5)
    assert m.log10_attenuation[0, 0].item() == pytest.approx(499 * math.log10(0.3), rel=1e-4)


def test_packed_sequences_and_bidirectional_stack_keep_exact_gain():
    rho = 0.8
    rnn = _linear_relu_rnn(rho, layers=2, bidir=True)
    lengths = torch.tensor([25, 9, 17, 30])
    x = torch.rand(30, 4, 3, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    m = _trace_last_step_loss(rnn, packed)["RNN"]
    assert m.seq_len == 30
    assert torch.allclose(m.gain.double(), torch.full((2, 2), rho, dtype=torch.float64), rtol=1e-6)
    # every sample's whole-sequence attenuation is rho ** (len - 1); their log mean:
    expected = float(((lengths - 1) * math.log10(rho)).double().mean())
    expected_grid = torch.full((2, 2), expected, dtype=torch.float64)
    assert torch.allclose(m.log10_attenuation.double(), expected_grid, atol=1e-5)
    # the curve at k is rho ** k wherever some sample reaches k
    k = torch.arange(30, dtype=torch.float64)
    assert torch.allclose(m.propagation[1, 1].double(), k * math.log10(rho), atol=1e-5)


def test_actual_gain_of_linear_model_with_loss_at_the_end():
    rho = 0.9
    rnn = _linear_relu_rnn(rho)
    x = torch.rand(30, 4, 3, dtype=torch.float64)
    with gradwatch.trace(rnn) as tr:
        _, h_n = rnn(x)
        (h_n**2).sum().backward()
    m = tr.report()["RNN"]
    assert m.actual_gain[0, 0].item() == pytest.approx(rho, rel=1e-6)


def test_lstm_with_zero_weights_has_forget_gate_gain():
    lstm = nn.LSTM(3, 8).double()
    b_if, b_hf = 0.7, 0.4
    with torch.no_grad():
        lstm.weight_hh_l0.zero_()
        lstm.weight_ih_l0.zero_()
        lstm.bias_ih_l0.uniform_(-1, 1)
        lstm.bias_hh_l0.uniform_(-1, 1)
        lstm.bias_ih_l0[8:16] = b_if
        lstm.bias_hh_l0[8:16] = b_hf
    x = torch.randn(40, 3, 3, dtype=torch.float64)
    m = _trace_last_step_loss(lstm, x)["LSTM"]
    f = 1 / (1 + math.exp(-(b_if + b_hf)))
    assert m.gain[0, 0].item() == pytest.approx(f, rel=1e-6)  # float32 report
    assert m.causes.gate_mean["forget"][0, 0].item() == pytest.approx(f, rel=1e-6)
    assert m.causes.forget_bias[0, 0].item() == pytest.approx(b_if + b_hf, rel=1e-6)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 4.0])
def test_no_step_gain_exceeds_the_pascanu_bound(nonlinearity, scale):
    torch.manual_seed(int(scale * 10))
    rnn = nn.RNN(5, 32, nonlinearity=nonlinearity).double()
    with torch.no_grad():
        rnn.weight_hh_l0.normal_(0, scale / math.sqrt(32))
    x = torch.randn(60, 6, 5, dtype=torch.float64)
    m = _trace_last_step_loss(rnn, x)["RNN"]
    bound = torch.linalg.matrix_norm(rnn.weight_hh_l0.detach(), ord=2).item()
    steps = m.propagation[0, 0].double().diff()
    finite = steps[torch.isfinite(steps)]
    assert finite.numel() > 0
    assert finite.max().item() <= math.log10(bound) + 1e-5
    # the estimated norm is the power-iteration value: a lower bound, close to the true one
    est = m.causes.pascanu_bound[0, 0].item()
    assert est <= bound * (1 + 1e-5) and est >= 0.9 * bound


def test_never_exploding_when_the_pascanu_bound_is_below_one():
    torch.manual_seed(3)
    for nonlinearity in ("tanh", "relu"):
        rnn = nn.RNN(4, 24, nonlinearity=nonlinearity)
        with torch.no_grad():
            w = torch.randn(24, 24)
            rnn.weight_hh_l0.copy_(0.99 * w / torch.linalg.matrix_norm(w, ord=2))
        x = 3 * torch.randn(80, 8, 4)
        m = _trace_last_step_loss(rnn, x)["RNN"]
        assert m.verdict != "exploding"
        assert (m.gain < 1).all()


def test_default_tanh_rnn_over_long_sequences_is_vanishing():
    torch.manual_seed(0)
    rnn = nn.RNN(8, 64)
    m = _trace_last_step_loss(rnn, torch.randn(120, 8, 8))["RNN"]
    assert m.verdict == "vanishing"
    assert m.horizon[0, 0].item() < 30
    assert "vanishing" in m.explain()


def test_lstm_with_large_forget_bias_is_not_vanishing_over_50_steps():
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 64)
    with torch.no_grad():
        lstm.bias_ih_l0[64:128] = 3.0
        lstm.bias_hh_l0[64:128] = 0.0
    m = _trace_last_step_loss(lstm, torch.randn(50, 8, 8))["LSTM"]
    assert m.verdict == "healthy", m.explain()
    assert m.gain[0, 0].item() > 0.9


def test_identity_relu_rnn_scaled_to_1_5_is_exploding():
    rnn = nn.RNN(4, 32, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(1.5 * torch.eye(32))
        rnn.weight_ih_l0.uniform_(0, 0.2)
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.fill_(0.05)
    m = _trace_last_step_loss(rnn, torch.rand(40, 4, 4))["RNN"]
    assert m.verdict == "exploding"
    assert m.gain[0, 0].item() == pytest.approx(1.5, rel=1e-4)
    assert m.explanation.cause == "large_recurrent_weight"
    assert any("clip" in r for r in m.explanation.remedies)


def _sech4_prediction(rho: float, s2: float) -> float:
    """Mean-field gain of a tanh RNN with orthogonal W = rho Q and drive variance s2:
    g = rho * sqrt(E[sech^4(sqrt(q) z)]), q = rho^2 E[tanh^2(sqrt(q) z)] + s2."""
    z, w = np.polynomial.hermite_e.hermegauss(201)
    w = w / w.sum()
    q = 1.0
    for _ in range(2000):
        q = rho**2 * float(np.sum(w * np.tanh(np.sqrt(q) * z) ** 2)) + s2
    return rho * math.sqrt(float(np.sum(w / np.cosh(np.sqrt(q) * z) ** 4)))


@pytest.mark.parametrize(("rho", "s2"), [(1.0, 0.1), (1.2, 0.1), (0.9, 0.1)])
def test_tanh_rnn_gain_matches_mean_field_theory(rho, s2):
    torch.manual_seed(1)
    hidden = 128
    rnn = nn.RNN(hidden, hidden, bias=False).double()
    with torch.no_grad():
        nn.init.orthogonal_(rnn.weight_hh_l0, gain=rho)
        rnn.weight_ih_l0.copy_(math.sqrt(s2) * torch.eye(hidden))
    x = torch.randn(300, 4, hidden, dtype=torch.float64)
    m = _trace_last_step_loss(rnn, x)["RNN"]
    assert m.gain[0, 0].item() == pytest.approx(_sech4_prediction(rho, s2), rel=0.03)


def test_spectral_estimates_match_linear_algebra():
    torch.manual_seed(0)
    for n in (16, 64, 256):
        w = torch.randn(n, n, dtype=torch.float64) / math.sqrt(n)
        true_norm = torch.linalg.matrix_norm(w, ord=2).item()
        true_radius = torch.linalg.eigvals(w).abs().max().item()
        key = torch.empty(0)  # warm start across calls, as across training steps
        for _ in range(5):
            est_norm = spectral_norm(w, key).item()
            est_radius = spectral_radius(w, key).item()
        assert est_norm == pytest.approx(true_norm, rel=0.01)
        assert est_norm <= true_norm * (1 + 1e-9)
        assert est_radius == pytest.approx(true_radius, rel=0.05)


def test_nonfinite_is_located_first_in_backward_order():
    torch.manual_seed(0)
    rnn = nn.RNN(3, 8, num_layers=2)
    x = torch.randn(20, 2, 3)
    with gradwatch.trace(rnn) as tr:
        out, _ = rnn(x)
        grad = torch.zeros_like(out)
        grad[-1] = 1.0
        grad[12, 0, 0] = math.nan  # enters the top layer at step 12
        out.backward(grad)
    m = tr.report()["RNN"]
    assert m.verdict == "nonfinite"
    assert (m.nonfinite_at.layer, m.nonfinite_at.direction, m.nonfinite_at.timestep) == (1, 0, 12)
    assert "timestep 12" in m.explain()


def test_nonfinite_weights_make_the_verdict_nonfinite():
    rnn = nn.RNN(3, 8)
    with torch.no_grad():
        rnn.weight_hh_l0[0, 0] = math.inf
    m = _trace_last_step_loss(rnn, torch.randn(10, 2, 3))["RNN"]
    assert m.verdict == "nonfinite"


def test_global_rng_is_not_consumed_by_diagnostics():
    rnn = nn.GRU(3, 8)
    x = torch.randn(10, 2, 3)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    _trace_last_step_loss(rnn, x)
    assert torch.equal(before, torch.get_rng_state())


def test_marked_custom_recurrence_gets_estimated_gain():
    rho = 0.5
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    w = (rho * q).requires_grad_()
    x = torch.randn(40, 3, 6, dtype=torch.float64)
    with gradwatch.trace(nn.Identity()) as tr:
        h = torch.zeros(3, 6, dtype=torch.float64)
        for t in range(40):
            h = h @ w.t() + x[t]
            out, h = gradwatch.mark_state("linear", h)
        (out**2).sum().backward()
    m = tr.report()["linear"]
    assert m.actual_gain[0, 0].item() == pytest.approx(rho, rel=1e-6)
    assert m.gain[0, 0].item() == pytest.approx(rho, rel=1e-6)
    assert m.verdict == "vanishing"


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_very_short_sequences_are_healthy_not_nonfinite(steps):
    for module in (nn.RNN(3, 4), nn.LSTM(3, 4), nn.GRU(3, 4)):
        m = _trace_last_step_loss(module, torch.randn(steps, 2, 3))[type(module).__name__]
        assert m.verdict == "healthy"
        assert m.propagation.shape[-1] == steps and m.propagation[0, 0, 0] == 0


@pytest.mark.parametrize(
    ("fused_cls", "cell_cls", "kw"),
    [
        (nn.LSTM, nn.LSTMCell, {}),
        (nn.GRU, nn.GRUCell, {}),
        (nn.RNN, nn.RNNCell, {"nonlinearity": "tanh"}),
        (nn.RNN, nn.RNNCell, {"nonlinearity": "relu"}),
    ],
)
def test_cell_loop_gets_the_same_propagation_as_the_fused_module(fused_cls, cell_cls, kw):
    """A cell loop's diagnostics come from the cell's own step Jacobians, rebuilt from the
    recorded steps: identical to the fused module's with the same weights and inputs."""
    torch.manual_seed(0)
    fused = fused_cls(3, 6, **kw).double()
    cell = cell_cls(3, 6, **kw).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(fused, name + "_l0"))
    x = torch.randn(15, 4, 3, dtype=torch.float64)
    a = _trace_last_step_loss(fused, x)[fused_cls.__name__]
    with gradwatch.trace(cell) as tr:
        state = None
        outs = []
        for t in range(15):
            state = cell(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        (torch.stack(outs) ** 2).sum().backward()
    b = tr.report()[cell_cls.__name__]
    assert b.source == "hooks" and b.propagation is not None
    torch.testing.assert_close(b.propagation, a.propagation, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.gain, a.gain, rtol=1e-6, atol=0)
    torch.testing.assert_close(b.causes.act_derivative, a.causes.act_derivative)
    assert b.verdict == a.verdict


def test_cell_subclass_that_changes_the_step_falls_back_to_the_estimate():
    class Leaky(nn.RNNCell):
        def forward(self, x, h=None):
            new = super().forward(x, h)
            return new if h is None else 0.5 * h + 0.5 * new

    torch.manual_seed(0)
    cell = Leaky(3, 6)
    x = torch.randn(20, 4, 3)
    with gradwatch.trace(cell) as tr:
        h = None
        for t in range(20):
            h = cell(x[t], h)
        h.pow(2).sum().backward()
    m = tr.report()["Leaky"]
    assert m.propagation is None  # the cell's equations do not describe these steps
    assert m.gain[0, 0].item() == pytest.approx(m.actual_gain[0, 0].item())


def test_report_names_where_a_nonfinite_gradient_entered_first():
    """Encoder -> decoder: a NaN injected into the decoder's output reaches the encoder
    through the decoder's initial state; it entered at the decoder (the later call)."""
    torch.manual_seed(0)
    enc, dec = nn.GRU(3, 5), nn.GRU(3, 5)
    model = nn.ModuleDict({"enc": enc, "dec": dec})
    x = torch.randn(6, 2, 3)
    with gradwatch.trace(model) as tr:
        _, h = enc(x)
        out, _ = dec(x, h)
        grad = torch.zeros_like(out)
        grad[4, 1, 2] = math.nan
        out.backward(grad)
    rep = tr.report()
    assert rep["enc"].verdict == rep["dec"].verdict == "nonfinite"
    first = rep.first_nonfinite
    assert (first.module, first.layer, first.direction, first.timestep) == ("dec", 0, 0, 4)


def test_hooks_only_explanation_names_no_weight_cause():
    """A marked state (step equations unknown): a vanishing verdict is explained by the
    measured per-step factor, without weight or activation numbers it does not have. Here
    h_t = 0.3 h_{t-1} + x_t, so the factor is 0.3 exactly."""
    x = torch.randn(4, 20, 5, dtype=torch.float64)
    with gradwatch.trace(nn.Module()) as tr:
        h = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
        for t in range(20):
            h = 0.3 * h + x[:, t]
            out, h = gradwatch.mark_state("loop", h)
        out.sum().backward()
    m = tr.report()["loop"]
    assert m.verdict == "vanishing"
    assert m.explanation.cause == "none" and " nan" not in m.explain().lower()
    assert "does not know its step equations" in m.explain()
    assert m.explanation.values["actual_gain"] == pytest.approx(0.3, rel=1e-6)
