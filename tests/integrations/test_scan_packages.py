"""GradWatch on diagonal linear recurrences from real packages, with no change to user code:
mambapy (Mamba, parallel scan), Hugging Face transformers (MambaModel with
``use_mambapy=True``) and minGRU-pytorch (minGRU and minLSTM, log-space scan).

Each test trains a small regressor with Lightning and ``GradWatch(every_n_steps=1)``, then
checks the first step's report against an independent float64 reference: the same modules
rewritten from their own parameters with the recurrence unrolled step by step
(``scan_references``), run on the same initial weights and the same first batch.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

L = pytest.importorskip("lightning")
pytest.importorskip("mambapy")
pytest.importorskip("minGRU_pytorch")
pytest.importorskip("transformers")

import scan_references as refs  # noqa: E402
from scan_reference import stats, unroll_reference  # noqa: E402  (tests/, for every group)

import gradwatch  # noqa: E402
from gradwatch._analysis.quantities.propagation import propagate  # noqa: E402

pytestmark = pytest.mark.integrations

WIDTH, STEPS_T, BATCH = 8, 12, 8


class Regressor(L.LightningModule):
    def __init__(self, body: torch.nn.Module, out: str | None = None) -> None:
        super().__init__()
        self.body, self.out = body, out
        self.head = torch.nn.Linear(WIDTH, 1)

    def forward(self, x):
        y = self.body(inputs_embeds=x) if self.out else self.body(x)
        y = getattr(y, self.out) if self.out else y
        return self.head(y[:, -1]) + 0.1 * self.head(y).mean(1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _build(package: str):
    """The model, the watched module names and the reference forward of those modules."""
    if package == "mambapy":
        from mambapy.mamba import Mamba, MambaConfig

        body = Mamba(MambaConfig(d_model=WIDTH, n_layers=2, d_state=4, expand_factor=2))
        names = {f"body.layers.{i}.mixer" for i in range(2)}
        return Regressor(body), names, refs.mambapy_block
    if package == "transformers":
        from transformers import MambaConfig, MambaModel

        config = MambaConfig(
            vocab_size=16,
            hidden_size=WIDTH,
            state_size=4,
            expand=2,
            num_hidden_layers=2,
            use_mambapy=True,
        )
        body = MambaModel(config)
        names = {f"body.layers.{i}.mixer" for i in range(2)}
        return Regressor(body, out="last_hidden_state"), names, refs.hf_mixer
    if package == "minLSTM":
        from minGRU_pytorch.minLSTM import minLSTM

        body = torch.nn.Sequential(minLSTM(WIDTH), minLSTM(WIDTH, expansion_factor=1.5))
        return Regressor(body), {"body.0", "body.1"}, refs.min_lstm
    from minGRU_pytorch import minGRU

    body = torch.nn.Sequential(minGRU(WIDTH), minGRU(WIDTH, expansion_factor=1.5))
    return Regressor(body), {"body.0", "body.1"}, refs.min_gru


def _reference(model, names, forward, batch):
    """Per module: the unrolled float64 statistics and transition for ``batch``."""
    model = model.double()
    modules = dict(model.named_modules())
    taps = {}
    for name in names:
        mod = modules[name]
        taps[name] = refs.Taps()
        mod.forward = partial(lambda f, m, t, x, *a, **k: f(m, x, t), forward, mod, taps[name])
    x, y = (t.double() for t in batch)
    model.training_step((x, y), 0).backward()
    return taps


class _Diagonal:
    """The generic step-by-step walk over diag(a_t) (the classic families' definition)."""

    reverse = False

    def __init__(self, a):  # [T, B, S]
        self.a, self.steps, self.weight = a, a.shape[0], a[0]

    def order(self, steps):
        return range(steps)

    def step_back(self, t, dh, dc, valid):
        return None, self.a[t] * dh, None, None


@pytest.mark.parametrize("package", ["mambapy", "transformers", "minGRU", "minLSTM"])
def test_lightning_run_matches_unrolled_reference(package, tmp_path):
    torch.manual_seed(0)
    model, names, forward = _build(package)
    initial = copy.deepcopy(model)
    x = torch.randn(4 * BATCH, STEPS_T, WIDTH)
    y = torch.randn(4 * BATCH, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    cb = gradwatch.GradWatch(every_n_steps=1, figures=False)
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, data)
    assert list(cb.reports) == [0, 1, 2]
    for step, report in cb.reports.items():
        assert set(report) == names and not report.failures, (step, report.failures)
    first = cb.reports[0]
    taps = _reference(initial, names, forward, (x[:BATCH], y[:BATCH]))
    for name in names:
        mr, ref = first[name], taps[name]
        assert mr.kind == "scan" and mr.source == "hooks" and mr.received_gradient
        assert mr.exact and mr.fidelity < 1e-4, (name, mr.approximate_reason)
        assert tuple(mr.total.shape) == (1, 1, STEPS_T)
        want = ref.stats()
        for key in ("total", "carried", "direct"):
            got = getattr(mr, key)[0, 0].double()
            scale = float(want["total"].max())
            torch.testing.assert_close(got, want[key], rtol=1e-4, atol=1e-5 * scale)
        a = ref.a.reshape(BATCH, STEPS_T, -1).transpose(0, 1)
        walk = propagate(_Diagonal(a), None, torch.full((BATCH,), STEPS_T), (a.shape[-1],))
        assert float(mr.gain[0, 0]) == pytest.approx(float(walk.gain), rel=1e-4)
        assert float(mr.horizon[0, 0]) == pytest.approx(float(walk.horizon), rel=1e-3)
        assert float(mr.causes.transition["mean"][0, 0]) == pytest.approx(
            float(ref.a.mean()), rel=1e-4
        )
        assert mr.verdict in ("healthy", "vanishing", "exploding"), mr.explain()
        if package not in ("minGRU", "minLSTM"):
            assert "step_size" in mr.causes.transition
        else:
            assert "input_gate" in mr.causes.transition
    assert set(cb.verdicts) == names


@pytest.mark.parametrize("package", ["mambapy", "transformers"])
def test_unsupported_configuration_is_named(package):
    """A configuration whose states are locals of a Python loop is left out with its reason."""
    if package == "mambapy":
        from mambapy.mamba import Mamba, MambaConfig

        body = Mamba(MambaConfig(d_model=WIDTH, n_layers=1, d_state=4, pscan=False))
    else:
        from transformers import MambaConfig, MambaModel

        body = MambaModel(MambaConfig(hidden_size=WIDTH, num_hidden_layers=1, use_mambapy=False))
    with pytest.raises(gradwatch.UnsupportedModuleError, match="mark_scan"), gradwatch.trace(body):
        pass


@pytest.mark.parametrize("package", ["minGRU", "minLSTM"])
def test_sequential_mode_steps_form_one_sequence(package):
    """One-step calls chained through ``prev_hidden`` (minGRU-pytorch's sequential mode) are
    the steps of one recurrence across calls: recorded as marked states, checked against the
    sequential form unrolled in float64 (``h_t = a_t h_{t-1} + u_t``)."""
    from minGRU_pytorch import minGRU
    from minGRU_pytorch.minLSTM import minLSTM

    torch.manual_seed(0)
    cell = (minGRU if package == "minGRU" else minLSTM)(6).double()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    w = torch.randn(6, dtype=torch.float64)

    def loss(hs):
        return (hs @ w).square().sum()

    class Loop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, x):
            h, outs = None, []
            for t in range(x.shape[1]):
                out, h = self.cell(x[:, t : t + 1], h, return_next_prev_hidden=True)
                outs.append(out)
            return torch.cat(outs, 1)

    model = Loop()
    with gradwatch.trace(model) as tr:
        loss(model(x)).backward()
    report = tr.report()
    assert list(report) == ["cell"] and not report.failures
    mr = report["cell"]
    assert mr.kind == "custom" and mr.exact and tuple(mr.total.shape) == (1, 1, 7)
    with torch.no_grad():
        g = torch.nn.functional.sigmoid
        if package == "minGRU":
            hidden, gate = cell.to_hidden_and_gate(x).chunk(2, -1)
            a, z = 1 - g(gate), g(gate)
            u = z * torch.where(hidden >= 0, hidden + 0.5, g(hidden))
        else:
            hidden, f, i = cell.to_hidden_and_f_i_gate(x).chunk(3, -1)
            f, i = g(f), g(i)
            a, u = f / (f + i), i / (f + i) * torch.where(hidden >= 0, hidden + 0.5, g(hidden))
    want = stats(unroll_reference(a, u, loss))  # h_{-1} = 0: a_0 does not matter
    for key in ("total", "carried", "direct"):
        got = getattr(mr, key)[0, 0].double()
        torch.testing.assert_close(
            got, want[key], rtol=1e-5, atol=1e-6 * float(want["total"].max())
        )
