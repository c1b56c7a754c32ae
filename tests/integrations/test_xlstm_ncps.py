"""GradWatch on xlstm's sLSTM (``backend="vanilla"``) and ncps' CfC, with no change to user
code, and ncps' LTC declared with ``gradwatch.mark_state`` (the snippet of
docs/integrations.md, run as written).

Each test trains a small regressor with Lightning and ``GradWatch(every_n_steps=1)``, then
checks the first step's report against an independent float64 reference: the recurrent
module rewritten from its own parameters with the recurrence unrolled step by step
(``xlstm_reference``, ``ncps_reference``), on the same initial weights and the first batch.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")
pytest.importorskip("xlstm")
pytest.importorskip("ncps")

import ncps_reference as ncps_ref  # noqa: E402
import xlstm_reference as xlstm_ref  # noqa: E402
from integration_checks import check_module_report  # noqa: E402

import gradwatch  # noqa: E402

pytestmark = pytest.mark.integrations

WIDTH, STEPS_T, BATCH = 8, 10, 6
DOCS = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


class Regressor(L.LightningModule):
    def __init__(self, body: torch.nn.Module, width: int = WIDTH) -> None:
        super().__init__()
        self.body = body
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        y = self.body(x)
        y = y[0] if isinstance(y, tuple) else y
        return self.head(y[:, -1]) + 0.1 * self.head(y).mean(1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(model, tmp_path, width=WIDTH, **options):
    torch.manual_seed(0)
    x = torch.randn(3 * BATCH, STEPS_T, width)
    y = torch.randn(3 * BATCH, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    cb = gradwatch.GradWatch(every_n_steps=1, figures=False, **options)
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
    return cb, (x[:BATCH], y[:BATCH])


def _reference(model, modules: dict[str, object], batch):
    """Run ``model`` in float64 on ``batch`` with each named module's forward replaced by
    its unrolled reference ``fn(module, *args) -> (output, taps)``; returns the taps."""
    model = model.double()
    taps = {}
    named = dict(model.named_modules())
    for name, fn in modules.items():
        mod = named[name]

        def forward(*args, _fn=fn, _mod=mod, _name=name, **kwargs):
            out, taps[_name] = _fn(_mod, *args, **kwargs)
            return out

        mod.forward = forward
    x, y = (t.double() for t in batch)
    model.training_step((x, y), 0).backward()
    return taps


def _compare(mr, want, keys=("total", "carried", "direct")):
    for key in keys:
        got = getattr(mr, key)[0, 0].double()
        scale = float(want["total"].max())
        torch.testing.assert_close(got, want[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


# -- xlstm: sLSTM, vanilla backend -------------------------------------------------------------
def _xlstm_stack():
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMBlockStack,
        xLSTMBlockStackConfig,
    )

    config = xLSTMBlockStackConfig(
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(conv1d_kernel_size=2, qkv_proj_blocksize=4, num_heads=2)
        ),
        slstm_block=sLSTMBlockConfig(
            slstm=sLSTMLayerConfig(
                backend="vanilla",
                num_heads=2,
                conv1d_kernel_size=2,
                recurrent_weight_init="standard",
            ),
            feedforward=FeedForwardConfig(proj_factor=1.5, act_fn="gelu"),
        ),
        context_length=STEPS_T,
        num_blocks=3,
        embedding_dim=WIDTH,
        slstm_at=[0, 2],
    )
    return xLSTMBlockStack(config)


def _slstm_forward(cell, x, state=None):
    assert state is None
    out, final, taps = xlstm_ref.slstm_unrolled(cell, x)
    return (out, final), taps


def test_xlstm_slstm_in_lightning_matches_unrolled_reference(tmp_path):
    torch.manual_seed(0)
    model = Regressor(_xlstm_stack())
    initial = copy.deepcopy(model)
    cb, batch = _fit(model, tmp_path)
    names = {f"body.blocks.{i}.xlstm.slstm_cell" for i in (0, 2)}
    # the mLSTM block (parallel form, no per-step state) is not a watched module
    assert set(cb.reports[0]) == names, cb.reports[0].failures
    assert list(cb.reports) == [0, 1, 2]
    taps = _reference(initial, dict.fromkeys(names, _slstm_forward), batch)
    for name in names:
        mr = cb.reports[0][name]
        check_module_report(mr, kind="sLSTM", layers=1, steps=STEPS_T, batch=BATCH)
        assert mr.cell_total is not None
        want = xlstm_ref.slstm_stats(taps[name])
        _compare(mr, want, ("total", "carried", "direct", "cell_total"))
    assert all(not r.failures for r in cb.reports.values())


def test_xlstm_cuda_backend_is_named_unsupported():
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda, sLSTMCellConfig

    cell = sLSTMCell_cuda(sLSTMCellConfig(hidden_size=8, num_heads=2), skip_backend_init=True)
    watched = torch.nn.ModuleDict({"cell": cell})
    unsupported = pytest.raises(gradwatch.UnsupportedModuleError, match="backend='vanilla'")
    with unsupported, gradwatch.trace(watched):
        pass


# -- ncps: CfC built in, LTC declared ----------------------------------------------------------
def _cfc_forward(layer, x, hx=None, timespans=None):
    assert hx is None and timespans is None
    readout, final, taps = ncps_ref.cfc_unrolled(layer, x)
    return (readout, final), taps


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mixed_memory": True, "mode": "no_gate"},
        {"mode": "pure", "proj_size": WIDTH},
        {"backbone_layers": 0, "batch_first": True},
    ],
    ids=["default", "mixed-no_gate", "pure-proj", "no-backbone"],
)
def test_ncps_cfc_in_lightning_matches_unrolled_reference(options, tmp_path):
    from ncps.torch import CfC

    torch.manual_seed(0)
    body = CfC(WIDTH, WIDTH, backbone_units=16, **options)
    model = Regressor(body)
    initial = copy.deepcopy(model)
    cb, batch = _fit(model, tmp_path)
    assert list(cb.reports) == [0, 1, 2]
    assert all(set(r) == {"body"} and not r.failures for r in cb.reports.values())
    mr = cb.reports[0]["body"]
    check_module_report(mr, kind="CfC", layers=1, steps=STEPS_T, batch=BATCH)
    taps = _reference(initial, {"body": _cfc_forward}, batch)
    _compare(mr, ncps_ref.cfc_stats(taps["body"]))


@pytest.mark.parametrize("which", ["LTC", "wired CfC", "CfC return_sequences=False"])
def test_ncps_unobservable_configurations_are_named(which):
    from ncps.torch import LTC, CfC
    from ncps.wirings import AutoNCP

    if which == "LTC":
        layer = LTC(4, 8)
    elif which == "wired CfC":
        layer = CfC(4, AutoNCP(8, 2))
    else:
        layer = CfC(4, 8, return_sequences=False)
    watched = torch.nn.ModuleDict({"rnn": layer})
    unsupported = pytest.raises(gradwatch.UnsupportedModuleError, match="mark_state")
    with unsupported, gradwatch.trace(watched):
        pass


def _docs_snippet(marker: str) -> str:
    """The python block after ``<!-- tested: marker -->`` in docs/integrations.md."""
    text = DOCS.read_text()
    found = re.search(rf"<!-- tested: {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"no tested snippet {marker!r} in {DOCS}"
    return found.group(1)


def test_ncps_ltc_declared_with_mark_state_as_documented(tmp_path):
    """The docs' LTC snippet, run as written inside a LightningModule, against the same loop
    unrolled in float64 with identity-view taps."""
    from ncps.torch import LTC

    namespace: dict = {}
    exec(compile(_docs_snippet("ncps-ltc"), str(DOCS), "exec"), namespace)
    run_ltc = namespace["run_ltc"]

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ltc = LTC(WIDTH, 12, ode_unfolds=2)

        def forward(self, x):
            return run_ltc(self.ltc, x)

    torch.manual_seed(0)
    model = Regressor(Body(), width=12)  # the LTC's motor neurons: all 12 without a wiring
    initial = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as seen:  # the LTC excluded, as the docs say
        warnings.simplefilter("always")
        cb, batch = _fit(model, tmp_path, exclude=[LTC])
    assert not any("not watching" in str(w.message) for w in seen)
    assert list(cb.reports) == [0, 1, 2]
    mr = cb.reports[0]["ltc"]
    check_module_report(mr, kind="custom", layers=1, steps=STEPS_T, batch=BATCH)

    def unrolled(body, x):
        taps = ncps_ref.unroll_cell(body.ltc.rnn_cell, x, body.ltc.state_size)
        return torch.stack([t["y"] for t in taps], 1), taps

    taps = _reference(initial, {"body": unrolled}, batch)
    _compare(mr, ncps_ref.cfc_stats(taps["body"]))


@pytest.mark.parametrize(
    ("marker", "name", "watched"),
    [
        ("xlstm-config", "body", {"blocks.0.xlstm.slstm_cell", "blocks.1.xlstm.slstm_cell"}),
        ("ncps-cfc", "rnn", {"CfC"}),  # the root module is named by its class
    ],
)
def test_docs_snippets_build_watched_modules(marker, name, watched):
    """The construction snippets of docs/integrations.md, run as written: what they build is
    found with no change to user code and reported exactly."""
    namespace: dict = {"in_features": 4}
    exec(compile(_docs_snippet(marker), str(DOCS), "exec"), namespace)
    module = namespace[name]
    width = 32 if marker == "xlstm-config" else 4
    x = torch.randn(2, 64 if marker == "xlstm-config" else 5, width)
    with gradwatch.trace(module) as tr:
        y = module(x)
        (y[0] if isinstance(y, tuple) else y).square().sum().backward()
    report = tr.report()
    assert set(report) == watched and not report.failures
    assert all(mr.exact and mr.received_gradient for mr in report.values())


@pytest.mark.parametrize("package", ["xlstm", "ncps"])
def test_training_is_bit_identical_with_and_without_gradwatch(package):
    """The hooks only read: every parameter gradient of a few training steps is bitwise the
    same with and without a capture."""
    from ncps.torch import CfC

    def grads(watch: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        body = _xlstm_stack() if package == "xlstm" else CfC(WIDTH, WIDTH, mixed_memory=True)
        model = Regressor(body)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        for step in range(3):
            x, y = torch.randn(BATCH, STEPS_T, WIDTH), torch.randn(BATCH, 1)
            opt.zero_grad()
            if watch:
                with gradwatch.trace(model) as tr:
                    model.training_step((x, y), step).backward()
                assert tr.report() and not tr.report().failures
            else:
                model.training_step((x, y), step).backward()
            out += [p.grad.clone() for p in model.parameters() if p.grad is not None]
            opt.step()
        return out

    for a, b in zip(grads(False), grads(True), strict=True):
        assert torch.equal(a, b)


def test_cfc_step_hooks_live_only_during_a_captured_call():
    """The per-step hooks exist only while a captured call runs, and are removed when the
    call raises (nothing is left on the model)."""
    from ncps.torch import CfC

    layer = CfC(4, 6, mixed_memory=True)
    seen = []
    layer.fc.register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_pre_hooks)))
    with gradwatch.trace(torch.nn.ModuleDict({"rnn": layer})) as tr:
        layer(torch.randn(2, 5, 4))[0].sum().backward()
        assert seen == [2] * 5  # ours and the test's, at every step
        assert len(layer.fc._forward_pre_hooks) == 1 and not layer.lstm._forward_hooks
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 5, 3))  # wrong feature size: raises inside the loop
        assert len(layer.fc._forward_pre_hooks) == 1 and not layer.lstm._forward_hooks
    assert tr.report()["rnn"].exact


def test_slstm_with_another_loop_is_a_named_failure_not_a_wrong_report():
    """A subclass whose states do not come from the vanilla loop's graph: nothing is
    measured, and the failure says why and what to do."""
    from xlstm.blocks.slstm.cell import sLSTMCell_vanilla, sLSTMCellConfig

    class Rebuilt(sLSTMCell_vanilla):
        def _impl(self, training, input, state):
            states = super()._impl(training, input, state)
            return states.detach().clone().requires_grad_(True)  # a graph of its own

    cell = Rebuilt(sLSTMCellConfig(hidden_size=8, num_heads=2, backend="vanilla"))
    failed = pytest.raises(gradwatch.CaptureError, match=r"cell: could not find.*mark_state")
    with failed, gradwatch.trace(torch.nn.ModuleDict({"cell": cell})) as tr:
        out, _ = cell(torch.randn(2, 5, 32))
        out.sum().backward()
        tr.report()
