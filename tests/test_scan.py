"""The diagonal-linear-recurrence family (`gradwatch.mark_scan`) against an independent
float64 unrolled reference and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from scan_reference import stats, unroll_reference

import gradwatch
from gradwatch._analysis.quantities import diagonal
from gradwatch._analysis.quantities.diagonal import diagonal_propagation
from gradwatch._analysis.quantities.propagation import _MIN_PROBES, _PROBE_SEED, propagate


# -- three ways to compute the same scan -------------------------------------------------------
def scan_sequential(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    h, out = torch.zeros_like(u[:, 0]), []
    for t in range(u.shape[1]):
        h = a[:, t] * h + u[:, t]
        out.append(h)
    return torch.stack(out, 1)


def scan_associative(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Hillis-Steele doubling: combine (a1, u1), (a2, u2) -> (a1 a2, a2 u1 + u2)."""
    a, h = a.expand(u.shape), u
    step = 1
    while step < u.shape[1]:
        a_prev = torch.nn.functional.pad(a[:, :-step], (0, 0) * (u.dim() - 2) + (step, 0), value=1)
        h_prev = torch.nn.functional.pad(h[:, :-step], (0, 0) * (u.dim() - 2) + (step, 0))
        h = h + a * h_prev
        a = a * a_prev
        step *= 2
    return h


def scan_log_space(log_a: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """Heinsen's log-space scan (positive values), as minGRU computes it."""
    a_star = log_a.cumsum(1)
    return (a_star + (log_u - a_star).logcumsumexp(1)).exp()


class Diagonal(torch.nn.Module):
    """a_t = sigmoid(x W_a + b), u_t = x W_u: a selective diagonal recurrence."""

    def __init__(self, d_in: int, state: tuple[int, ...], bias: float, dtype=torch.float64):
        super().__init__()
        width = math.prod(state)
        self.state = state
        self.wa = torch.nn.Linear(d_in, width, dtype=dtype)
        self.wu = torch.nn.Linear(d_in, width, dtype=dtype)
        self.head = torch.nn.Linear(width, 1, dtype=dtype)
        torch.nn.init.constant_(self.wa.bias, bias)

    def parts(self, x):
        shape = (*x.shape[:2], *self.state)
        pre = self.wa(x).reshape(shape)
        return pre, torch.sigmoid(pre), self.wu(x).reshape(shape)

    def loss(self, h):
        flat = h.reshape(*h.shape[:2], -1)
        return self.head(flat[:, -1]).square().sum() + 0.1 * self.head(flat).sum()


def _check(report, ref, rtol):
    want = stats(ref)
    for key in ("total", "carried", "direct"):
        got = getattr(report, key)[0, 0].double()
        torch.testing.assert_close(got, want[key], rtol=rtol, atol=rtol * want["total"].max())


@pytest.mark.parametrize("state", [(), (6,), (4, 3)], ids=["scalar", "vector", "DxN"])
@pytest.mark.parametrize("scan", ["sequential", "associative", "log_space"])
@pytest.mark.parametrize("declare", ["a,u", "a,h", "a,u,h"])
def test_scan_matches_unrolled_reference(state, scan, declare):
    torch.manual_seed(0)
    model = Diagonal(5, state, bias=1.0)
    x = torch.randn(3, 17, 5, dtype=torch.float64)
    with gradwatch.trace(model) as tr:
        pre, a, u = model.parts(x)
        if scan == "log_space":
            u = u.abs() + 0.1  # the log-space scan needs positive inputs
            h = scan_log_space(-torch.nn.functional.softplus(-pre), u.log())
        else:
            h = (scan_sequential if scan == "sequential" else scan_associative)(a, u)
        marks = {"u": u if "u" in declare else None, "h": h if "h" in declare else None}
        gradwatch.mark_scan("ssm", a, **marks)
        model.loss(h).backward()
    report = tr.report()["ssm"]
    ref = unroll_reference(a, u, model.loss)
    _check(report, ref, rtol=1e-6)  # reports hold float32
    assert report.exact and report.kind == "scan" and report.received_gradient
    assert report.fidelity < 1e-9


def test_log_a_time_dim_and_float32():
    """Transition given as log |a| with time in dimension 2 ([B, D, T, N], as HF Mamba lays it)."""
    torch.manual_seed(1)
    log_a = -torch.rand(2, 4, 9, 3) * 0.3
    u = torch.randn(2, 4, 9, 3, requires_grad=True)
    w = torch.randn(4, 3)
    with gradwatch.trace(torch.nn.Module()) as tr:
        h = scan_sequential(log_a.exp().transpose(1, 2), u.transpose(1, 2)).transpose(1, 2)
        gradwatch.mark_scan("ssm", log_a, u, h, log_a=True, time_dim=2)
        (h[:, :, -1] * w).sum().square().backward()
    rep = tr.report()["ssm"]
    ref = unroll_reference(
        log_a.exp().transpose(1, 2),
        u.transpose(1, 2),
        lambda hs: (hs[:, -1] * w.double()).sum().square(),
    )
    _check(rep, ref, rtol=1e-5)
    assert rep.exact


def test_complex_transition():
    """LRU-style complex diagonal: carried uses conj(a); norms of complex gradients."""
    torch.manual_seed(2)
    lam = torch.polar(torch.full((6,), 0.9), torch.linspace(0, 3, 6)).to(torch.complex128)
    a = lam.view(1, 1, 6)
    u = torch.randn(2, 11, 6, dtype=torch.complex128, requires_grad=True)
    c = torch.randn(6, dtype=torch.complex128)
    loss_fn = lambda hs: (hs * c).real.square().sum()  # noqa: E731
    with gradwatch.trace(torch.nn.Module()) as tr:
        h = scan_sequential(a.expand(u.shape), u)
        gradwatch.mark_scan("lru", a, u, h)
        loss_fn(h).backward()
    rep = tr.report()["lru"]
    _check(rep, unroll_reference(a, u, loss_fn), rtol=1e-6)
    assert rep.exact
    assert float(rep.gain[0, 0]) == pytest.approx(0.9, rel=1e-6)


# -- closed forms -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.5, 0.9, 0.999, 1.02])
def test_constant_transition_gives_powers_exactly(value):
    a = torch.full((4, 40, 8), value, dtype=torch.float64)
    prop = diagonal_propagation(a.double().log())
    k = torch.arange(40, dtype=torch.float64)
    torch.testing.assert_close(prop.curve, k * math.log(value), rtol=1e-12, atol=1e-12)
    assert float(prop.gain) == pytest.approx(value, rel=1e-12)
    if value < 1:
        assert float(prop.horizon) == pytest.approx(math.log(0.01) / math.log(value), rel=1e-9)
    else:
        assert math.isinf(float(prop.horizon))


def test_mixture_of_decays_gives_its_curve():
    """Half the coordinates decay with 0.5, half with 0.95: the curve is the probes' norm under
    the two powers, log sqrt(sum_i v_i^2 a_i^(2k)), averaged over the documented probes."""
    batch, steps, size = 2, 60, 10
    rates = torch.tensor([0.5] * 5 + [0.95] * 5, dtype=torch.float64)
    prop = diagonal_propagation(rates.log().expand(batch, steps, size))
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    curves = []
    for _ in range(math.ceil(_MIN_PROBES / batch)):
        v = torch.randn(batch, size, generator=gen, dtype=torch.float64)
        v = v / v.norm(dim=1, keepdim=True)
        k = torch.arange(steps, dtype=torch.float64).view(-1, 1, 1)
        curves.append(0.5 * (v.square() * rates.pow(2 * k)).sum(-1).log())
    want = torch.stack(curves).mean(0).mean(1)
    torch.testing.assert_close(prop.curve, want, rtol=1e-10, atol=1e-10)
    # far back only the slow half is left: the per-step slope tends to log 0.95
    assert float(prop.curve[-1] - prop.curve[-2]) == pytest.approx(math.log(0.95), rel=1e-6)


class _DiagonalWalk:
    """The generic step-by-step walker's view of a diagonal recurrence (for cross-checking)."""

    reverse = False

    def __init__(self, a):  # a [T, B, S]
        self.a, self.steps = a, a.shape[0]
        self.weight = a[0]  # device and dtype of the walk

    def order(self, steps):
        return range(steps)

    def step_back(self, t, dh, dc, valid):
        return None, self.a[t] * dh, None, None


@pytest.mark.parametrize("block", [None, 7], ids=["one-block", "blocks-of-one-step"])
def test_closed_form_equals_the_generic_walk(block, monkeypatch):
    if block is not None:  # 3 samples x 7 states: one time step per block
        monkeypatch.setattr(diagonal, "_CHUNK_ELEMENTS", block)
    torch.manual_seed(3)
    a = torch.rand(3, 25, 7, dtype=torch.float64) * 0.4 + 0.6
    fast = diagonal_propagation(a.log())
    slow = propagate(_DiagonalWalk(a.transpose(0, 1)), None, torch.full((3,), 25), (7,))
    for key in ("curve", "gain", "horizon", "efold", "log_attenuation"):
        torch.testing.assert_close(getattr(fast, key), getattr(slow, key), rtol=1e-10, atol=1e-10)


# -- verdicts and causes ----------------------------------------------------------------------
@pytest.mark.parametrize(("bias", "verdict"), [(6.0, "healthy"), (-1.0, "vanishing")])
def test_verdict_and_causes_follow_the_transition(bias, verdict):
    torch.manual_seed(4)
    model = Diagonal(3, (8,), bias=bias)
    x = torch.randn(4, 60, 3, dtype=torch.float64) * 0.1
    with gradwatch.trace(model) as tr:
        _, a, u = model.parts(x)
        h = scan_associative(a, u)
        gradwatch.mark_scan("ssm", a, u, h, input_gate=1 - a)
        a = a.detach()
        model.loss(h).backward()
    rep = tr.report()["ssm"]
    assert rep.verdict == verdict
    t = rep.causes.transition
    assert float(t["mean"]) == pytest.approx(float(a.mean()), rel=1e-6)
    assert float(t["spread"]) == pytest.approx(float(a.std(unbiased=False)), rel=1e-5)
    assert float(t["near_zero"]) == pytest.approx(float((a < 0.1).double().mean()))
    assert float(t["near_one"]) == pytest.approx(float((a > 0.99).double().mean()))
    assert float(t["input_gate"]) == pytest.approx(float((1 - a).mean()), rel=1e-6)
    if verdict == "vanishing":
        assert rep.explanation.cause == "transition_decay"
        assert "transition |a_t| averages" in rep.explain() and rep.explanation.remedies


def test_growing_transition_is_exploding():
    a = torch.full((2, 30, 4), 1.3, dtype=torch.float64)
    u = torch.randn(2, 30, 4, dtype=torch.float64, requires_grad=True)
    with gradwatch.trace(torch.nn.Module()) as tr:
        h = scan_sequential(a, u)
        gradwatch.mark_scan("ssm", a, u)
        h[:, -1].sum().backward()
    rep = tr.report()["ssm"]
    assert rep.verdict == "exploding" and rep.explanation.cause == "transition_growth"
    assert float(rep.causes.transition["above_one"]) == 1.0


# -- exactness guard, training unchanged, bad input ---------------------------------------------
def test_wrong_time_dim_is_flagged_not_exact():
    torch.manual_seed(5)
    a = torch.rand(3, 8, 8, dtype=torch.float64)
    u = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    with gradwatch.trace(torch.nn.Module()) as tr:
        h = scan_sequential(a, u)
        gradwatch.mark_scan("ssm", a, u, h, time_dim=2)  # wrong: time is dimension 1
        h.square().sum().backward()
    rep = tr.report()["ssm"]
    assert not rep.exact and "time_dim" in rep.approximate_reason


def test_training_is_bit_identical_with_and_without_mark_scan():
    def step(watch: bool):
        torch.manual_seed(6)
        model = Diagonal(4, (3, 2), bias=0.5, dtype=torch.float32)
        x = torch.randn(2, 13, 4)

        def run():
            _, a, u = model.parts(x)
            h = scan_associative(a, u)
            gradwatch.mark_scan("ssm", a, u, h)
            return model.loss(h) + h.sum()

        if watch:
            with gradwatch.trace(model):
                run().backward()
        else:
            run().backward()
        return [p.grad.clone() for p in model.parameters()]

    for g0, g1 in zip(step(False), step(True), strict=True):
        assert torch.equal(g0, g1)


def test_mark_scan_outside_a_trace_does_nothing():
    u = torch.randn(2, 5, 3, requires_grad=True)
    gradwatch.mark_scan("ssm", torch.rand(2, 5, 3), u)
    assert u._backward_hooks is None or not u._backward_hooks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"a": "x"}, "a must be a tensor"),
        ({"u": None}, "give u"),
        ({"a": torch.rand(2, 5)}, "'ssm'.*a \\(2, 5\\)"),
        ({"time_dim": 0}, "time_dim=0"),
        ({"h": torch.rand(2, 4, 3)}, "differ in shape"),
        ({"step": torch.rand(3, 5, 3)}, "step"),
        ({"lengths": torch.tensor([5.0, 3.0])}, "lengths must hold integers"),
        ({"lengths": torch.tensor([5, 3, 2])}, "lengths must be \\[B\\] = \\[2\\]"),
    ],
)
def test_bad_declarations_name_the_scan_and_the_argument(kwargs, message):
    args = {"a": torch.rand(2, 5, 3), "u": torch.rand(2, 5, 3), **kwargs}
    with pytest.raises((TypeError, ValueError), match=message):
        gradwatch.mark_scan("ssm", **args)


def test_scalars_publish_the_transition_not_the_weight_fields():
    from gradwatch._outputs.scalars import module_scalars

    a = torch.full((2, 20, 4), 0.8, dtype=torch.float64)
    u = torch.randn(2, 20, 4, dtype=torch.float64, requires_grad=True)
    with gradwatch.trace(torch.nn.Module()) as tr:
        h = scan_sequential(a, u)
        gradwatch.mark_scan("ssm", a, u, h)
        h[:, -1].sum().backward()
    tags = module_scalars(tr.report()["ssm"])
    mean = [v for k, v in tags.items() if k.endswith("transition_mean")]
    assert mean == [pytest.approx(0.8)]
    assert not any("weight_norm" in k or "act_derivative" in k for k in tags)


# -- padded batches (lengths) -----------------------------------------------------------------
LENGTHS = [17, 9, 13, 1]


def _padded_run(scan: str, lengths: list[int], declare: str = "a,u,h"):
    """A selective scan over a right-padded batch, run over every step as usual; the loss
    reads only the covered steps."""
    torch.manual_seed(4)
    model = Diagonal(5, (6,), bias=1.5)
    x = torch.randn(len(lengths), 17, 5, dtype=torch.float64)
    covered = torch.arange(17).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)

    def loss(h):  # [B, T, S] -> per-step readout of the covered steps, and each final state
        y = model.head(h.reshape(*h.shape[:2], -1)).squeeze(-1)
        last = torch.stack([y[b, n - 1] for b, n in enumerate(lengths)])
        return (y * covered).sum() * 0.1 + last.square().sum()

    with gradwatch.trace(model) as tr:
        _, a, u = model.parts(x)
        scan_fn = scan_sequential if scan == "sequential" else scan_associative
        h = scan_fn(a, u)
        # padding steps are also scanned (a padded scan computes them); they are left out
        marks = {"u": u if "u" in declare else None, "h": h if "h" in declare else None}
        gradwatch.mark_scan("ssm", a, **marks, lengths=torch.tensor(lengths))
        loss(h).backward()
    return tr.report()["ssm"], a.detach(), u.detach(), model


@pytest.mark.parametrize("declare", ["a,u,h", "a,h", "a,u"])
@pytest.mark.parametrize("scan", ["sequential", "associative"])
def test_padded_scan_matches_per_sample_reference(scan, declare):
    """Each sample unrolled over its own length only (the packed-sequence semantics); the
    report's per-step means count the samples that cover the step."""
    report, a, u, model = _padded_run(scan, LENGTHS, declare)
    per_step = {k: torch.zeros(17, dtype=torch.float64) for k in ("total", "carried", "direct")}
    for b, n in enumerate(LENGTHS):

        def loss(h, n=n):
            y = model.head(h.reshape(*h.shape[:2], -1)).squeeze(-1)
            return y.sum() * 0.1 + y[0, n - 1].square()

        ref = stats(unroll_reference(a[b : b + 1, :n], u[b : b + 1, :n], loss))
        for k in per_step:
            per_step[k][:n] += ref[k]
    count = torch.tensor([sum(n > t for n in LENGTHS) for t in range(17)])
    assert report.valid_samples.tolist() == count.tolist()
    for k, total in per_step.items():
        want = total / count
        got = getattr(report, k)[0, 0].double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.max()))
    assert report.exact and report.fidelity < 1e-9


def test_padded_scan_propagation_and_causes_skip_the_padding():
    """Propagation from each sample's own last step (the generic walker with the packed
    mask) and transition statistics over the covered steps only."""
    report, a, _, _ = _padded_run("sequential", LENGTHS)
    lengths = torch.tensor(LENGTHS)
    valid = torch.arange(17).unsqueeze(1) < lengths.unsqueeze(0)  # [T, B]
    walk = propagate(_DiagonalWalk(a.transpose(0, 1)), valid, lengths, (6,))
    assert float(report.gain[0, 0]) == pytest.approx(float(walk.gain), rel=1e-5)
    assert float(report.horizon[0, 0]) == pytest.approx(float(walk.horizon), rel=1e-4)
    torch.testing.assert_close(
        report.propagation[0, 0].double(), walk.curve / math.log(10), rtol=1e-5, atol=1e-6
    )
    covered = a[valid.t()]  # [covered steps, S]
    mean = report.causes.transition["mean"][0, 0]
    assert float(mean) == pytest.approx(float(covered.mean()), rel=1e-6)
    assert float(mean) != pytest.approx(float(a.mean()), rel=1e-3)  # the padding differs


def test_padding_is_not_read_as_vanishing():
    """|a| = 0.7 keeps 1% of a gradient for 12.9 steps: healthy for sequences of 10 steps, but
    vanishing if the 30 padding steps counted as sequence (the verdict without lengths)."""
    a = torch.full((3, 40, 4), 0.7, dtype=torch.float64)
    u = torch.randn(3, 40, 4, dtype=torch.float64, requires_grad=True)

    def run(lengths):
        with gradwatch.trace(torch.nn.Module()) as tr:
            h = scan_sequential(a, u)
            gradwatch.mark_scan("ssm", a, u, h, lengths=lengths)
            torch.stack([h[b, n - 1] for b, n in enumerate([10, 8, 10])]).sum().backward()
        u.grad = None
        return tr.report()["ssm"]

    padded, unpadded = run(torch.tensor([10, 8, 10])), run(None)
    assert padded.valid_samples.tolist() == [3] * 8 + [2] * 2 + [0] * 30
    assert padded.seq_len == 10 and unpadded.seq_len == 40
    assert padded.verdict == "healthy", padded.explain()
    assert unpadded.verdict == "vanishing", unpadded.explain()
    assert float(padded.gain[0, 0]) == pytest.approx(0.7, rel=1e-6)
    assert float(padded.horizon[0, 0]) == pytest.approx(math.log(0.01) / math.log(0.7), rel=1e-5)
    assert (padded.total[0, 0, 10:] == 0).all() and padded.exact
