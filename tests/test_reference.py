"""Self-tests of the independent reference (tests/reference.py).

These do not use gradwatch at all.
"""

import itertools
import math
import zlib

import pytest
import torch
from reference import CellReference, _grad, reference_unroll
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MODES = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]


def make_module(
    mode, input_size, hidden, num_layers=1, bidirectional=False, batch_first=False, bias=True
):
    kw = dict(
        num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
    )
    if mode == "rnn_tanh":
        return nn.RNN(input_size, hidden, nonlinearity="tanh", **kw)
    if mode == "rnn_relu":
        return nn.RNN(input_size, hidden, nonlinearity="relu", **kw)
    if mode == "lstm":
        return nn.LSTM(input_size, hidden, **kw)
    if mode == "lstm_proj":
        return nn.LSTM(input_size, hidden, proj_size=max(1, hidden - 1), **kw)
    if mode == "gru":
        return nn.GRU(input_size, hidden, **kw)
    raise ValueError(mode)


def initial_state(module, batch):
    """Random (h0[, c0]) shaped like PyTorch's; ``batch=None`` for unbatched."""
    D = 2 if module.bidirectional else 1
    n = module.num_layers * D
    is_lstm = isinstance(module, nn.LSTM)
    P = module.proj_size if is_lstm and module.proj_size > 0 else module.hidden_size
    shape = (n, P) if batch is None else (n, batch, P)
    h0 = torch.randn(shape, requires_grad=True)
    if not is_lstm:
        return h0
    cshape = (n, module.hidden_size) if batch is None else (n, batch, module.hidden_size)
    return h0, torch.randn(cshape, requires_grad=True)


def run_module(module, x, lengths, hx):
    """Run the real module; returns (padded output with x's T, h_n, c_n)."""
    T = x.shape[1] if (module.batch_first and x.dim() == 3) else x.shape[0]
    if lengths is not None:
        packed = pack_padded_sequence(
            x, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False
        )
        out, state = module(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=module.batch_first, total_length=T)
    else:
        out, state = module(x, hx)
    if isinstance(state, tuple):
        return out, state[0], state[1]
    return out, state, None


def _flat_state(hx):
    if hx is None:
        return []
    return list(hx) if isinstance(hx, tuple) else [hx]


GRID = list(
    itertools.product(
        MODES,
        [1, 2],  # num_layers
        [False, True],  # bidirectional
        ["padded", "packed", "packed_short", "unbatched"],
        [False, True],  # initial state
    )
)


@pytest.mark.parametrize("mode,num_layers,bidir,inp,given", GRID)
def test_reference_matches_module(mode, num_layers, bidir, inp, given):
    seed = zlib.crc32(repr((mode, num_layers, bidir, inp, given)).encode())
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    batch_first = bool(torch.randint(0, 2, (1,), generator=g))
    bias = bool(torch.randint(0, 2, (1,), generator=g))
    I, H, T, B = 3, 4, 5, 3
    module = make_module(mode, I, H, num_layers, bidir, batch_first, bias)
    lengths = None
    if inp == "unbatched":
        x = torch.randn(T, I, requires_grad=True)
        hx = initial_state(module, None) if given else None
    else:
        shape = (B, T, I) if batch_first else (T, B, I)
        x = torch.randn(shape, requires_grad=True)
        hx = initial_state(module, B) if given else None
        if inp == "packed":
            lengths = [2, T, 1]
        elif inp == "packed_short":
            lengths = [2, T - 1, 3]  # longest < T
    out, h_n, c_n = run_module(module, x, lengths, hx)
    ref = reference_unroll(module, x, lengths=lengths, hx=hx)

    torch.testing.assert_close(ref.output, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.h_n, h_n, rtol=1e-5, atol=1e-5)
    if c_n is not None:
        torch.testing.assert_close(ref.c_n, c_n, rtol=1e-5, atol=1e-5)
    else:
        assert ref.c_n is None

    # identical loss on both -> identical gradients w.r.t. inputs, state, params
    R = torch.randn(out.shape)
    S = torch.randn(h_n.shape)
    leaves = [x, *_flat_state(hx), *module.parameters()]

    def loss_of(o, h, c):
        loss = (o * R).sum() + (h * S).sum()
        if c is not None:
            loss = loss + (c * c).sum()
        return loss

    g_mod = torch.autograd.grad(loss_of(out, h_n, c_n), leaves, allow_unused=True)
    g_ref = torch.autograd.grad(
        loss_of(ref.output, ref.h_n, ref.c_n), leaves, retain_graph=True, allow_unused=True
    )
    for a, b in zip(g_ref, g_mod, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # now fill the taps and check the decomposition holds as vectors. A fresh
    # unroll: torch.autograd.grad above also fills retained .grad of non-leaves.
    ref = reference_unroll(module, x, lengths=lengths, hx=hx)
    loss_of(ref.output, ref.h_n, ref.c_n).backward()
    v = ref.vectors()
    torch.testing.assert_close(v["total"], v["direct"] + v["carried_h"], rtol=1e-5, atol=1e-6)
    st = ref.stats()
    D = 2 if bidir else 1
    assert st["total"].shape == (num_layers, D, T)
    assert st["total"].dtype == torch.float32
    # carried is zero at the last step in processing order
    lens = ref.lengths
    for b, n in enumerate(lens):
        assert v["carried_h"][:, 0, n - 1, b].abs().max() == 0
        if bidir:
            assert v["carried_h"][:, 1, 0, b].abs().max() == 0
        # nothing at all beyond the sequence end
        assert v["total"][:, :, n:, b].abs().sum() == 0
    if ref.is_lstm:
        assert st["cell_total"].shape == (num_layers, D, T)
        torch.testing.assert_close(v["cell_total"].norm(dim=-1).max() > 0, torch.tensor(True))
    else:
        assert st["cell_total"] is None


@pytest.mark.parametrize("mode", ["rnn_tanh", "rnn_relu", "gru"])
def test_total_is_direct_plus_carried_as_vectors(mode):
    torch.manual_seed(1)
    module = make_module(mode, 2, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 2)
    ref = reference_unroll(module, x, lengths=[6, 2, 4])
    ((ref.output * torch.randn(ref.output.shape)).sum() + (ref.h_n**2).sum()).backward()
    v = ref.vectors()
    # per-sample vector sum, then the same statistic as the library's
    summed = (v["direct"] + v["carried_h"]).norm(dim=-1)  # [L, D, T, B]
    mask = ref.valid_mask().double()
    stat = (summed * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(stat.float(), ref.stats()["total"], rtol=1e-5, atol=1e-7)
    # and the triangle inequality on the statistics
    st = ref.stats()
    assert torch.all(st["total"] <= st["direct"] + st["carried"] + 1e-6)


def test_tanh_rnn_closed_form():
    torch.manual_seed(0)
    H, I, T = 4, 3, 6
    rnn = nn.RNN(I, H, nonlinearity="tanh")
    x = torch.randn(T, 1, I)
    ref = reference_unroll(rnn, x)
    w = torch.randn(H)
    (ref.output[-1, 0] * w).sum().backward()
    got = ref.stats()["total"][0, 0]

    with torch.no_grad():
        h = rnn(x)[0][:, 0].double()  # [T, H]
        W_hh = rnn.weight_hh_l0.double()
        delta = w.double()
        expected = [0.0] * T
        expected[T - 1] = delta.norm().item()
        for t in range(T - 1, 0, -1):
            delta = (delta * (1 - h[t] ** 2)) @ W_hh
            expected[t - 1] = delta.norm().item()
    torch.testing.assert_close(
        got, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-7
    )
    # loss only on the last output: direct is w at T-1 and zero elsewhere
    st = ref.stats()
    assert st["direct"][0, 0, :-1].abs().max() == 0
    assert st["direct"][0, 0, -1].item() == pytest.approx(w.norm().item(), rel=1e-6)
    torch.testing.assert_close(st["carried"][0, 0, :-1], got[:-1])


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.1])
def test_linear_regime_decays_like_rho_power(rho):
    torch.manual_seed(0)
    H, T = 6, 7
    rnn = nn.RNN(H, H, nonlinearity="tanh", bias=False)
    Q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))
    with torch.no_grad():
        rnn.weight_hh_l0.copy_((rho * Q).float())
    x = 1e-4 * torch.randn(T, 1, H)
    ref = reference_unroll(rnn, x)
    w = torch.randn(H)
    (ref.output[-1, 0] * w).sum().backward()
    total = ref.stats()["total"][0, 0].double()
    for k in range(T):
        expected = rho**k * w.norm().item()
        assert total[T - 1 - k].item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("H", [1, 3])
def test_lstm_cell_gradient_ratio_is_forget_gate(H):
    torch.manual_seed(0)
    I, T = 2, 6
    lstm = nn.LSTM(I, H)
    with torch.no_grad():
        lstm.weight_hh_l0.zero_()
    x = torch.randn(T, 1, I)
    ref = reference_unroll(lstm, x)
    w = torch.randn(H)
    (ref.c_n[0, 0] * w).sum().backward()
    ct = ref.stats()["cell_total"][0, 0].double()
    # forget gates: rows H..2H of the gate pre-activations
    with torch.no_grad():
        pre = x[:, 0] @ lstm.weight_ih_l0.t() + lstm.bias_ih_l0 + lstm.bias_hh_l0
        f = torch.sigmoid(pre[:, H : 2 * H]).double()  # [T, H]
    expected = w.double().clone()
    assert ct[T - 1].item() == pytest.approx(expected.norm().item(), rel=1e-6)
    for t in range(T - 2, -1, -1):
        expected = expected * f[t + 1]
        assert ct[t].item() == pytest.approx(expected.norm().item(), rel=1e-5)
        if H == 1:
            assert (ct[t] / ct[t + 1]).item() == pytest.approx(f[t + 1, 0].item(), rel=1e-5)
    st = ref.stats()
    # h is never used: total/direct/carried-h are zero; carried = the c part only
    assert st["total"].abs().max() == 0
    assert st["direct"].abs().max() == 0
    torch.testing.assert_close(st["carried"][0, 0, :-1], st["cell_total"][0, 0, :-1])
    assert st["carried"][0, 0, -1] == 0


def test_lstm_proj_reference_shapes():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, proj_size=2, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 3)
    ref = reference_unroll(lstm, x)
    (ref.output.sum() + ref.c_n.sum()).backward()
    v = ref.vectors()
    assert v["total"].shape == (2, 2, 4, 2, 2)
    assert v["cell_total"].shape == (2, 2, 4, 2, 5)


def test_packed_input_accepted_directly():
    torch.manual_seed(0)
    gru = nn.GRU(2, 3, batch_first=True)
    x = torch.randn(3, 5, 2)
    lengths = [3, 5, 1]
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    ref_a = reference_unroll(gru, packed)
    ref_b = reference_unroll(gru, x, lengths=lengths)
    assert ref_a.lengths == lengths
    torch.testing.assert_close(ref_a.output, ref_b.output)
    torch.testing.assert_close(ref_a.h_n, ref_b.h_n)


# ---------------------------------------------------------------------------------- cells


def make_cell(mode, I, H, bias=True):
    if mode == "rnn_tanh":
        return nn.RNNCell(I, H, bias=bias, nonlinearity="tanh")
    if mode == "rnn_relu":
        return nn.RNNCell(I, H, bias=bias, nonlinearity="relu")
    if mode == "lstm":
        return nn.LSTMCell(I, H, bias=bias)
    if mode == "gru":
        return nn.GRUCell(I, H, bias=bias)
    raise ValueError(mode)


def cell_loop(cell_fn, xs, state, is_lstm):
    """The loop a user would write; returns (stacked outputs, final state)."""
    outs = []
    for t in range(xs.shape[0]):
        state = cell_fn(xs[t], state)
        outs.append(state[0] if is_lstm else state)
    return torch.stack(outs), state


@pytest.mark.parametrize(
    "mode,bias,given,unbatched",
    list(
        itertools.product(
            ["rnn_tanh", "rnn_relu", "lstm", "gru"], [True, False], [True, False], [True, False]
        )
    ),
)
def test_cell_reference_matches_cell(mode, bias, given, unbatched):
    torch.manual_seed(3)
    I, H, T, B = 3, 4, 5, 2
    cell = make_cell(mode, I, H, bias)
    is_lstm = mode == "lstm"
    xs = torch.randn((T, I) if unbatched else (T, B, I), requires_grad=True)
    sshape = (H,) if unbatched else (B, H)
    state = None
    if given:
        state = (torch.randn(sshape), torch.randn(sshape)) if is_lstm else torch.randn(sshape)
    out, fin = cell_loop(cell, xs, state, is_lstm)
    ref = CellReference(cell)
    rout, rfin = cell_loop(ref, xs, state, is_lstm)
    torch.testing.assert_close(rout, out, rtol=1e-5, atol=1e-5)
    if is_lstm:
        torch.testing.assert_close(rfin[1], fin[1], rtol=1e-5, atol=1e-5)
    R = torch.randn(out.shape)

    def loss_of(o, f):
        loss = (o * R).sum()
        if is_lstm:
            loss = loss + (f[1] ** 2).sum()
        return loss

    leaves = [xs, *cell.parameters()]
    g_mod = torch.autograd.grad(loss_of(out, fin), leaves)
    g_ref = torch.autograd.grad(loss_of(rout, rfin), leaves, retain_graph=True)
    for a, b in zip(g_ref, g_mod, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # fresh run: torch.autograd.grad above also fills retained .grad of non-leaves
    ref = CellReference(cell)
    rout, rfin = cell_loop(ref, xs, state, is_lstm)
    loss_of(rout, rfin).backward()
    st = ref.stats()
    assert st["total"].shape == (1, 1, T)
    assert st["carried"][0, 0, -1] == 0
    if not is_lstm:
        assert st["cell_total"] is None
        for s in ref.taps:
            torch.testing.assert_close(_grad(s.h), _grad(s.h_out) + _grad(s.h_rec))
    # direct = ||R_t|| per sample (output used only through the loss)
    Rn = R.reshape(T, -1, H).norm(dim=-1).mean(dim=1)
    torch.testing.assert_close(st["direct"][0, 0], Rn, rtol=1e-5, atol=1e-7)


def test_cell_reference_rejects_foreign_state():
    cell = nn.GRUCell(2, 3)
    ref = CellReference(cell)
    h = ref(torch.randn(1, 2))
    ref(torch.randn(1, 2), h)
    with pytest.raises(ValueError):
        ref(torch.randn(1, 2), h.detach())


def test_reference_is_finite_for_degenerate_sizes():
    torch.manual_seed(0)
    rnn = nn.RNN(1, 1, num_layers=3, bidirectional=True)
    x = torch.randn(1, 1, 1)
    ref = reference_unroll(rnn, x)
    ref.h_n.sum().backward()
    st = ref.stats()
    assert all(torch.isfinite(v).all() for v in st.values() if v is not None)
    assert not math.isnan(st["total"].sum().item())
