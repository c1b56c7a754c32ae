"""gradwatch.trace against the independent autograd reference (tests/reference.py).

The reference is evaluated in float64 on a copy of the module, so it is the exact
value up to float64 round-off; the library (float32) must match it to 1e-4 relative.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import CellReference, reference_unroll
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import gradwatch

MODES = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]
FIELDS = ("total", "direct", "carried", "cell_total")


# ----------------------------------------------------------------------------- helpers


def make_module(
    mode, I, H, num_layers=1, bidirectional=False, batch_first=False, bias=True, proj=0
):
    kw = dict(
        num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
    )
    if mode in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(I, H, nonlinearity=mode[4:], **kw)
    if mode == "lstm":
        return nn.LSTM(I, H, **kw)
    if mode == "lstm_proj":
        return nn.LSTM(I, H, proj_size=proj, **kw)
    if mode == "gru":
        return nn.GRU(I, H, **kw)
    raise ValueError(mode)


def out_size(module):
    if isinstance(module, nn.LSTM) and module.proj_size > 0:
        return module.proj_size
    return module.hidden_size


def random_state(module, batch, requires_grad=False):
    """(h0[, c0]) shaped like PyTorch's; ``batch=None`` for unbatched input."""
    n = module.num_layers * (2 if module.bidirectional else 1)
    lead = (n,) if batch is None else (n, batch)
    h0 = torch.randn(*lead, out_size(module)).requires_grad_(requires_grad)
    if not isinstance(module, nn.LSTM):
        return h0
    return h0, torch.randn(*lead, module.hidden_size).requires_grad_(requires_grad)


def to64(obj):
    if obj is None:
        return None
    if isinstance(obj, tuple):
        return tuple(to64(o) for o in obj)
    return obj.detach().double().requires_grad_(obj.requires_grad)


def split_state(state):
    return state if isinstance(state, tuple) else (state, None)


def scale_of(t):
    return max(float(t.abs().max()), 1e-30) if t.numel() else 1.0


def assert_stat(got, want, name):
    assert got is not None, f"{name}: reported None"
    assert isinstance(got, torch.Tensor), f"{name}: {type(got)}"
    assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}"
    assert got.device.type == "cpu", f"{name}: device {got.device}"
    assert tuple(got.shape) == tuple(want.shape), (
        f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    )
    torch.testing.assert_close(
        got, want.float(), rtol=1e-4, atol=1e-6 * scale_of(want), msg=lambda m: f"{name}: {m}"
    )


def assert_report(m, want: dict, num_layers, num_directions, steps, is_lstm, max_fidelity=1e-5):
    assert m.num_layers == num_layers
    assert m.num_directions == num_directions
    assert m.steps == steps
    assert m.exact is True
    assert m.fidelity < max_fidelity, m.fidelity
    for f in ("total", "direct", "carried"):
        assert_stat(getattr(m, f), want[f][..., :steps], f)
    if is_lstm:
        assert_stat(m.cell_total, want["cell_total"][..., :steps], "cell_total")
    else:
        assert m.cell_total is None


class Wrap(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx=None):
        return self.rnn(x, hx)


# --------------------------------------------------------------------- property tests


@dataclass(frozen=True)
class Config:
    mode: str
    num_layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    hidden: int
    proj: int
    input_size: int
    T: int
    B: int
    kind: str  # padded | packed | unbatched
    lengths: tuple | None
    given_state: bool
    state_grad: bool
    x_grad: bool
    loss: str  # output | state | both
    loss_on_c: bool
    seed: int


@st.composite
def configs(draw):
    mode = draw(st.sampled_from(MODES))
    hidden = draw(st.integers(2 if mode == "lstm_proj" else 1, 8))
    proj = draw(st.integers(1, hidden - 1)) if mode == "lstm_proj" else 0
    T = draw(st.integers(1, 7))
    B = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    lengths = None
    if kind == "packed":
        lengths = tuple(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    if kind == "unbatched":
        B = 1
    return Config(
        mode=mode,
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        hidden=hidden,
        proj=proj,
        input_size=draw(st.integers(1, 5)),
        T=T,
        B=B,
        kind=kind,
        lengths=lengths,
        given_state=draw(st.booleans()),
        state_grad=draw(st.booleans()),
        x_grad=draw(st.booleans()),
        loss=draw(st.sampled_from(["output", "state", "both"])),
        loss_on_c=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_config(cfg: Config):
    torch.manual_seed(cfg.seed)
    rnn = make_module(
        cfg.mode,
        cfg.input_size,
        cfg.hidden,
        cfg.num_layers,
        cfg.bidirectional,
        cfg.batch_first,
        cfg.bias,
        cfg.proj,
    ).eval()
    model = Wrap(rnn)
    is_lstm = isinstance(rnn, nn.LSTM)
    L, D = cfg.num_layers, 2 if cfg.bidirectional else 1
    if cfg.kind == "unbatched":
        x = torch.randn(cfg.T, cfg.input_size)
        hx = random_state(rnn, None, cfg.state_grad) if cfg.given_state else None
    else:
        shape = (
            (cfg.B, cfg.T, cfg.input_size) if cfg.batch_first else (cfg.T, cfg.B, cfg.input_size)
        )
        x = torch.randn(shape)
        hx = random_state(rnn, cfg.B, cfg.state_grad) if cfg.given_state else None
    x.requires_grad_(cfg.x_grad)
    steps = max(cfg.lengths) if cfg.lengths else cfg.T
    use_out = cfg.loss in ("output", "both")
    use_state = cfg.loss in ("state", "both")
    use_c = use_state and is_lstm and cfg.loss_on_c
    # output weights for the (possibly shortened) padded output
    if cfg.kind == "unbatched":
        R = torch.randn(steps, D * out_size(rnn))
    elif cfg.batch_first:
        R = torch.randn(cfg.B, steps, D * out_size(rnn))
    else:
        R = torch.randn(steps, cfg.B, D * out_size(rnn))
    h_shape = (L * D, out_size(rnn)) if cfg.kind == "unbatched" else (L * D, cfg.B, out_size(rnn))
    S = torch.randn(h_shape)
    U = torch.randn(*h_shape[:-1], cfg.hidden)

    def loss_of(out, h_n, c_n):
        loss = torch.zeros((), dtype=out.dtype)
        if use_out:
            loss = loss + (out * R.to(out.dtype)).sum()
        if use_state:
            loss = loss + (h_n * S.to(h_n.dtype)).sum()
        if use_c:
            loss = loss + (c_n * U.to(c_n.dtype)).sum()
        return loss

    # --- library (float32); the same run once untraced to check the trace changes nothing
    leaves = [
        *rnn.parameters(),
        x,
        *(hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()),
    ]

    def run(traced):
        for leaf in leaves:
            leaf.grad = None
        inp = x
        if cfg.kind == "packed":
            inp = pack_padded_sequence(
                x, torch.tensor(cfg.lengths), batch_first=cfg.batch_first, enforce_sorted=False
            )
        ctx = gradwatch.trace(model) if traced else contextlib.nullcontext()
        with ctx as tr:
            out, state = model(inp, hx)
            if isinstance(out, PackedSequence):
                out, _ = pad_packed_sequence(out, batch_first=cfg.batch_first)
            h_n, c_n = split_state(state)
            loss_of(out, h_n, c_n).backward()
        grads = [None if leaf.grad is None else leaf.grad.clone() for leaf in leaves]
        return out.detach(), grads, tr

    plain_out, plain_grads, _ = run(traced=False)
    out, grads, tr = run(traced=True)
    rep = tr.report()
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for g, g0 in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, g0, rtol=0, atol=0)

    # --- reference (float64)
    rnn64 = copy.deepcopy(rnn).double()
    x64, hx64 = to64(x), to64(hx)
    ref = reference_unroll(rnn64, x64, lengths=cfg.lengths, hx=hx64)
    ref_out = ref.output
    if cfg.kind != "unbatched":
        ref_out = ref_out[:, :steps] if cfg.batch_first else ref_out[:steps]
    else:
        ref_out = ref_out[:steps]
    loss_of(ref_out, ref.h_n, ref.c_n).backward()
    want = ref.stats()

    # the real outputs agree with the reference (sanity check of the harness)
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=1e-5, atol=1e-5)

    assert "rnn" in rep, sorted(rep)
    # fidelity is relative to the largest output/state magnitude; a tiny final state that is
    # the result of cancellation (relu, small T) legitimately shows ~1e-5 in float32
    assert_report(rep["rnn"], want, L, D, steps, is_lstm, max_fidelity=1e-4)


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


@settings(max_examples=25, deadline=None, suppress_health_check=_HEALTH)
@given(cfg=configs())
def test_fused_matches_reference(cfg):
    check_config(cfg)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=_HEALTH)
@given(cfg=configs())
def test_fused_matches_reference_slow(cfg):
    check_config(cfg)


# --------------------------------------------------------------------- explicit cases


@pytest.mark.parametrize("mode", ["rnn_tanh", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_output_discarded_only_h_n_used(mode, bidirectional):
    torch.manual_seed(0)
    rnn = make_module(mode, 3, 4, bidirectional=bidirectional).eval()

    class OnlyFinal(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            _, state = self.rnn(x)
            return split_state(state)[0]

    model = OnlyFinal()
    T, B = 6, 2
    x = torch.randn(T, B, 3)
    S = torch.randn(2 if bidirectional else 1, B, 4)
    with gradwatch.trace(model) as tr:
        (model(x) * S).sum().backward()
    m = tr.report()["rnn"]

    ref = reference_unroll(copy.deepcopy(rnn).double(), x.double())
    (ref.h_n * S.double()).sum().backward()
    want = ref.stats()
    D = 2 if bidirectional else 1
    assert_report(m, want, 1, D, T, mode == "lstm")
    # direct only at the last step in processing order; earlier steps only carried
    assert torch.all(m.direct[0, 0, :-1] == 0)
    assert m.direct[0, 0, -1] > 0
    assert torch.all(m.total[0, 0, :-1] > 0)
    if mode != "lstm":  # for LSTM carried also holds the c part
        torch.testing.assert_close(m.total[0, 0, :-1], m.carried[0, 0, :-1], rtol=1e-4, atol=0)
    if bidirectional:
        assert torch.all(m.direct[0, 1, 1:] == 0)
        assert torch.all(m.total[0, 1, 1:] > 0)


@pytest.mark.parametrize("mode", ["gru", "lstm"])
def test_same_module_called_twice(mode):
    torch.manual_seed(1)
    rnn = make_module(mode, 2, 3, num_layers=2, batch_first=True).eval()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x1, x2):
            out1, s1 = self.rnn(x1)
            out2, s2 = self.rnn(x2, s1)  # second call continues from the first
            return out1, out2, s2

    model = Twice()
    x1, x2 = torch.randn(2, 4, 2), torch.randn(2, 3, 2)
    R1, R2, S = torch.randn(2, 4, 3), torch.randn(2, 3, 3), torch.randn(2, 2, 3)

    def loss_of(o1, o2, s2):
        return (
            (o1 * R1.to(o1)).sum()
            + 0.5 * (o2 * R2.to(o2)).sum()
            + (split_state(s2)[0] * S.to(o1)).sum()
        )

    with gradwatch.trace(model) as tr:
        loss_of(*model(x1, x2)).backward()
    rep = tr.report()
    assert {"rnn", "rnn#1"} <= set(rep), sorted(rep)

    rnn64 = copy.deepcopy(rnn).double()
    ref1 = reference_unroll(rnn64, x1.double())
    s1 = (ref1.h_n, ref1.c_n) if mode == "lstm" else ref1.h_n
    ref2 = reference_unroll(rnn64, x2.double(), hx=s1)
    s2 = (ref2.h_n, ref2.c_n) if mode == "lstm" else ref2.h_n
    loss_of(ref1.output, ref2.output, s2).backward()
    assert_report(rep["rnn"], ref1.stats(), 2, 1, 4, mode == "lstm")
    assert_report(rep["rnn#1"], ref2.stats(), 2, 1, 3, mode == "lstm")


class MyLSTM(nn.LSTM):
    """A user subclass with its own forward."""

    def forward(self, x, hx=None):
        out, state = super().forward(x, hx)
        return out, state


def test_lstm_subclass():
    torch.manual_seed(2)
    lstm = MyLSTM(3, 4, num_layers=2, bidirectional=True).eval()
    model = Wrap(lstm)
    x = torch.randn(5, 2, 3)
    R = torch.randn(5, 2, 8)
    with gradwatch.trace(model) as tr:
        out, (_h, c) = model(x)
        ((out * R).sum() + (c**2).sum()).backward()
    ref = reference_unroll(copy.deepcopy(lstm).double(), x.double())
    ((ref.output * R.double()).sum() + (ref.c_n**2).sum()).backward()
    assert_report(tr.report()["rnn"], ref.stats(), 2, 2, 5, True)


def test_two_different_modules_stacked():
    torch.manual_seed(3)

    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.GRU(3, 5, bidirectional=True)
            self.dec = nn.LSTM(10, 4, num_layers=2)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            e, _ = self.enc(x)
            d, (h, _c) = self.dec(e)
            return self.head(d).sum() + h.pow(2).sum()

    model = EncDec().eval()
    x = torch.randn(6, 2, 3)
    with gradwatch.trace(model) as tr:
        model(x).backward()
    rep = tr.report()
    assert {"enc", "dec"} <= set(rep), sorted(rep)

    m64 = copy.deepcopy(model).double()
    ref_e = reference_unroll(m64.enc, x.double())
    ref_d = reference_unroll(m64.dec, ref_e.output)
    (m64.head(ref_d.output).sum() + ref_d.h_n.pow(2).sum()).backward()
    assert_report(rep["enc"], ref_e.stats(), 1, 2, 6, False)
    assert_report(rep["dec"], ref_d.stats(), 2, 1, 6, True)


CELLS = {
    "rnn_tanh": lambda: nn.RNNCell(3, 4),
    "rnn_relu": lambda: nn.RNNCell(3, 4, nonlinearity="relu"),
    "lstm": lambda: nn.LSTMCell(3, 4),
    "gru": lambda: nn.GRUCell(3, 4),
    "gru_nobias": lambda: nn.GRUCell(3, 4, bias=False),
}


class CellLoop(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, xs, state=None, cell_fn=None):
        fn = cell_fn or self.cell
        outs = []
        for t in range(xs.shape[0]):
            state = fn(xs[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs), state


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("given_state", [False, True])
def test_cell_loop(name, given_state):
    torch.manual_seed(4)
    cell = CELLS[name]()
    is_lstm = isinstance(cell, nn.LSTMCell)
    model = CellLoop(cell)
    T, B = 5, 3
    xs = torch.randn(T, B, 3)
    state = None
    if given_state:
        state = (torch.randn(B, 4), torch.randn(B, 4)) if is_lstm else torch.randn(B, 4)
    R = torch.randn(T, B, 4)
    U = torch.randn(B, 4)

    def loss_of(outs, fin):
        loss = (outs * R.to(outs)).sum()
        if is_lstm:
            loss = loss + (fin[1] * U.to(outs)).sum()
        return loss

    with gradwatch.trace(model) as tr:
        loss_of(*model(xs, state)).backward()
    rep = tr.report()
    assert "cell" in rep, sorted(rep)

    cell64 = copy.deepcopy(cell).double()
    ref = CellReference(cell64)
    loss_of(*model(xs.double(), to64(state), cell_fn=ref)).backward()
    assert_report(rep["cell"], ref.stats(), 1, 1, T, is_lstm)


def test_cell_loop_only_final_state_used():
    torch.manual_seed(5)
    cell = nn.GRUCell(2, 3)
    model = CellLoop(cell)
    xs = torch.randn(4, 2, 2)
    with gradwatch.trace(model) as tr:
        _, h = model(xs)
        h.pow(2).sum().backward()
    ref = CellReference(copy.deepcopy(cell).double())
    _, h64 = model(xs.double(), cell_fn=ref)
    h64.pow(2).sum().backward()
    m = tr.report()["cell"]
    assert_report(m, ref.stats(), 1, 1, 4, False)
    assert torch.all(m.direct[0, 0, :-1] == 0)


def test_lstm_interlayer_dropout_in_training_is_not_exact():
    torch.manual_seed(6)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5).train()
    model = Wrap(lstm)
    x = torch.randn(5, 2, 3)
    with gradwatch.trace(model) as tr:
        out, _ = model(x)
        out.sum().backward()
    m = tr.report()["rnn"]
    assert m.exact is False
    assert m.total.shape == (2, 1, 5)


def test_dropout_in_eval_mode_is_exact():
    torch.manual_seed(7)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5).eval()
    model = Wrap(lstm)
    x = torch.randn(5, 2, 3)
    with gradwatch.trace(model) as tr:
        out, _ = model(x)
        out.sum().backward()
    ref = reference_unroll(copy.deepcopy(lstm).double(), x.double())
    ref.output.sum().backward()
    assert_report(tr.report()["rnn"], ref.stats(), 2, 1, 5, True)


def _hook_counts(module):
    from torch.nn.modules import module as mod

    local = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in module.modules()
    ]
    glob = (
        len(mod._global_forward_hooks),
        len(mod._global_forward_pre_hooks),
        len(mod._global_backward_hooks),
    )
    return local, glob


def test_hooks_removed_on_exit():
    torch.manual_seed(8)
    model = Wrap(nn.GRU(2, 3))
    before = _hook_counts(model)
    x = torch.randn(4, 1, 2)
    with gradwatch.trace(model) as tr:
        model(x)[0].sum().backward()
    assert _hook_counts(model) == before
    rep_before = {k: v.total.clone() for k, v in tr.report().items()}
    # running again outside the context must not change the report
    model(x)[0].sum().backward()
    rep_after = tr.report()
    assert set(rep_after) == set(rep_before)
    for k, v in rep_before.items():
        torch.testing.assert_close(rep_after[k].total, v)


def test_seq2seq_state_handoff_by_keyword():
    """The encoder's h_n initialises the decoder (passed as ``hx=``)."""
    torch.manual_seed(9)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.GRU(2, 3, num_layers=2)
            self.dec = nn.GRU(2, 3, num_layers=2)

        def forward(self, a, b):
            _, h = self.enc(a)
            out, _ = self.dec(b, hx=h)
            return out

    model = Seq2Seq().eval()
    a, b = torch.randn(5, 2, 2), torch.randn(4, 2, 2)
    with gradwatch.trace(model) as tr:
        model(a, b).pow(2).sum().backward()
    rep = tr.report()
    m64 = copy.deepcopy(model).double()
    ref_e = reference_unroll(m64.enc, a.double())
    ref_d = reference_unroll(m64.dec, b.double(), hx=ref_e.h_n)
    ref_d.output.pow(2).sum().backward()
    want_e = ref_e.stats()
    assert_report(rep["enc"], want_e, 2, 1, 5, False)
    assert_report(rep["dec"], ref_d.stats(), 2, 1, 4, False)
    # the encoder's outputs are unused: its top layer's direct is h_n's gradient only
    assert torch.all(rep["enc"].direct[1, 0, :-1] == 0)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_cell_loop_unbatched_and_keyword_state(name):
    torch.manual_seed(10)
    cell = CELLS[name]()

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, xs, fn=None):
            fn = fn or self.cell
            state, outs = None, []
            for t in range(xs.shape[0]):
                state = fn(xs[t], hx=state) if fn is self.cell else fn(xs[t], state)
                outs.append(state[0] if isinstance(state, tuple) else state)
            return torch.stack(outs)

    model = Loop()
    xs = torch.randn(4, 3)  # unbatched: each step's input is [I]
    R = torch.randn(4, 4)
    with gradwatch.trace(model) as tr:
        (model(xs) * R).sum().backward()
    ref = CellReference(copy.deepcopy(cell).double())
    (model(xs.double(), fn=ref) * R.double()).sum().backward()
    assert_report(tr.report()["cell"], ref.stats(), 1, 1, 4, name == "lstm")
