"""Scalar tags of a report: the documented scheme, the values, and non-finite handling.

``make_module`` builds synthetic reports for every outputs test (no replay needed).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from gradwatch._analysis.report import Causes, Explanation, ModuleReport, NonfiniteLocation, Report
from gradwatch._clipping import ClipEvent
from gradwatch._outputs import layout as layout_mod
from gradwatch._outputs.scalars import (
    VERDICT_CODES,
    clip_scalars,
    layer_tag,
    module_tag,
    param_grad_scalars,
    safe_name,
    scalars_for,
)

GATES = {"LSTM": ("forget", "input", "output"), "GRU": ("update", "reset")}


def make_module(
    name: str = "enc.rnn",
    *,
    kind: str = "LSTM",
    layers: int = 2,
    directions: int = 1,
    steps: int = 20,
    gain: float = 0.7,
    verdict: str | None = None,
    cause: str = "forget_gate",
    nonfinite_t: int | None = None,
    diagnostics: bool = True,
) -> ModuleReport:
    """A report whose profile decays (or grows) geometrically with ``gain`` per step."""
    shape = (layers, directions)
    k = torch.arange(steps, dtype=torch.float64)
    carried_1d = gain ** (steps - 1 - k)  # gradient carried back from the last step
    carried = carried_1d.expand(*shape, steps).float().clone()
    direct = torch.full((*shape, steps), 0.1)
    total = (carried**2 + direct**2).sqrt()
    if nonfinite_t is not None:
        total[0, 0, : nonfinite_t + 1] = math.nan
        carried[0, 0, : nonfinite_t + 1] = math.inf
    if verdict is None:
        verdict = (
            "healthy"
            if abs(math.log10(gain)) * steps < 2
            else ("vanishing" if gain < 1 else "exploding")
        )
    fields: dict = {}
    if diagnostics:
        log_gain = math.log10(gain)
        horizon = math.ceil(2 / -log_gain) if gain < 1 else math.inf
        if gain < 1 and horizon >= steps:
            horizon = math.inf
        full = torch.full(shape, 1.0)
        gates = GATES.get(kind.removesuffix("Cell"), ())
        fields = dict(
            seq_len=steps,
            propagation=(k * log_gain).expand(*shape, steps).float().clone(),
            gain=torch.full(shape, gain),
            horizon=torch.full(shape, float(horizon)),
            efold=torch.full(shape, 1 / abs(math.log(gain)) if gain != 1 else math.inf),
            log10_attenuation=torch.full(shape, (steps - 1) * log_gain),
            actual_gain=torch.full(shape, gain * 1.01),
            causes=Causes(
                weight_norm=full * 0.9,
                weight_radius=full * 0.8,
                pascanu_bound=full * (math.nan if gates else 0.9),
                act_derivative=full * 0.6,
                saturation=full * 0.25,
                gate_mean={g: full * (0.3 + 0.1 * i) for i, g in enumerate(gates)},
                gate_saturation={g: full * 0.05 for g in gates},
                forget_bias=full * -0.5 if "forget" in gates else None,
                sampled_steps=steps,
            ),
            verdicts=tuple(tuple(verdict for _ in range(directions)) for _ in range(layers)),
            verdict=verdict,
            nonfinite_at=(
                NonfiniteLocation(name, 0, 0, nonfinite_t) if nonfinite_t is not None else None
            ),
            explanation=Explanation(
                verdict=verdict,
                cause=cause if verdict != "healthy" else "none",
                text=f"{name}: {verdict}; the forget gate averages 0.30 (cause {cause}).",
                layer=layers - 1,
                direction=0,
                remedies=("a remedy from the diagnostics",) if verdict != "healthy" else (),
            ),
        )
    return ModuleReport(
        name=name,
        module_name=name.split("#")[0],
        kind=kind,
        num_layers=layers,
        num_directions=directions,
        total=total,
        carried=carried,
        direct=direct,
        cell_total=total.clone() if kind == "LSTM" else None,
        valid_samples=torch.full((steps,), 4, dtype=torch.int64),
        **fields,
    )


def make_report(*modules: ModuleReport) -> Report:
    return Report({m.name: m for m in modules})


def test_tag_scheme_is_stable_and_flat():
    m = make_module("enc.rnn", kind="LSTM", layers=2, directions=2)
    scalars = scalars_for(make_report(m))
    assert scalars["gradwatch/enc.rnn/l0d0/gain"] == pytest.approx(0.7)
    assert scalars["gradwatch/enc.rnn/l1d1/horizon"] == 13.0  # ceil(2 / -log10 0.7)
    assert scalars["gradwatch/enc.rnn/verdict"] == VERDICT_CODES["vanishing"] == 1.0
    expected_layer = {
        "gain", "actual_gain", "horizon", "horizon_fraction", "efold", "log10_attenuation",
        "carried_fraction", "hgrad_mean", "hgrad_start", "hgrad_end", "weight_norm",
        "weight_radius", "act_derivative", "saturation", "forget_bias", "verdict",
        "forget_gate_mean", "input_gate_mean", "output_gate_mean", "forget_gate_saturation",
        "input_gate_saturation", "output_gate_saturation",
    }  # fmt: skip
    for layer in range(2):
        for direction in range(2):
            found = {
                t.rsplit("/", 1)[1]
                for t in scalars
                if t.startswith(f"gradwatch/enc.rnn/l{layer}d{direction}/")
            }
            assert found == expected_layer
    assert {t for t in scalars if t.count("/") == 2} == {
        "gradwatch/enc.rnn/verdict",
        "gradwatch/enc.rnn/fidelity",
        "gradwatch/enc.rnn/seq_len",
    }
    # every tag: prefix / module / [lXdY /] metric, and plain floats
    pattern = re.compile(r"^gradwatch/[A-Za-z0-9_.:\-]+/(l\d+d\d+/)?[a-z0-9_]+$")
    assert all(pattern.match(t) and isinstance(v, float) for t, v in scalars.items())


def test_values_follow_the_report():
    m = make_module("rnn", kind="RNN_TANH", layers=1, gain=0.5, steps=30)
    s = scalars_for({"rnn": m})
    assert s["gradwatch/rnn/l0d0/pascanu_bound"] == pytest.approx(0.9)  # plain RNN: logged
    assert s["gradwatch/rnn/l0d0/horizon"] == 7.0
    assert s["gradwatch/rnn/l0d0/horizon_fraction"] == pytest.approx(7 / 30)
    assert s["gradwatch/rnn/l0d0/log10_attenuation"] == pytest.approx(29 * math.log10(0.5))
    assert s["gradwatch/rnn/l0d0/hgrad_end"] == pytest.approx(math.hypot(1.0, 0.1), rel=1e-6)
    assert s["gradwatch/rnn/l0d0/hgrad_start"] == pytest.approx(0.1, rel=1e-6)
    carried = sum(0.5**k for k in range(30))
    assert s["gradwatch/rnn/l0d0/carried_fraction"] == pytest.approx(
        carried / (carried + 3.0), rel=1e-5
    )
    assert not any("gate" in t for t in s)  # nn.RNN has no gates


def test_gated_cells_skip_the_undefined_pascanu_bound_and_name_their_gates():
    s = scalars_for({"g": make_module("g", kind="GRU", layers=1)})
    assert "gradwatch/g/l0d0/pascanu_bound" not in s
    assert s["gradwatch/g/l0d0/update_gate_mean"] == pytest.approx(0.3)
    assert s["gradwatch/g/l0d0/reset_gate_saturation"] == pytest.approx(0.05)
    assert "gradwatch/g/l0d0/forget_bias" not in s


def test_horizon_never_reached_is_inf_and_its_fraction_is_one():
    s = scalars_for({"r": make_module("r", gain=0.999, layers=1)})
    assert s["gradwatch/r/l0d0/horizon"] == math.inf
    assert s["gradwatch/r/l0d0/horizon_fraction"] == 1.0
    assert s["gradwatch/r/verdict"] == 0.0


def test_nonfinite_values_are_kept_and_located():
    m = make_module("r", layers=1, verdict="nonfinite", nonfinite_t=4, cause="nonfinite")
    s = scalars_for({"r": m})
    assert math.isnan(s["gradwatch/r/l0d0/hgrad_mean"])
    assert math.isnan(s["gradwatch/r/l0d0/hgrad_start"])
    assert math.isfinite(s["gradwatch/r/l0d0/carried_fraction"])  # over the finite steps
    assert s["gradwatch/r/nonfinite_timestep"] == 4.0
    assert s["gradwatch/r/verdict"] == 3.0


def test_missing_diagnostics_are_left_out_not_zero_filled():
    m = make_module("r", layers=1, diagnostics=False)
    s = scalars_for({"r": m})
    assert "gradwatch/r/l0d0/gain" not in s
    assert "gradwatch/r/l0d0/weight_norm" not in s
    assert s["gradwatch/r/l0d0/hgrad_end"] > 0  # the profile is always there
    assert s["gradwatch/r/verdict"] == 0.0


def test_call_suffix_and_odd_names_become_one_safe_segment():
    assert safe_name("encoder.rnn#1") == "encoder.rnn:1"
    assert safe_name("my state/with space") == "my_state_with_space"
    assert safe_name("") == "_"
    assert layer_tag("dec.cell#2", 0, 1, "gain") == "gradwatch/dec.cell:2/l0d1/gain"
    assert module_tag("LSTM", "verdict") == "gradwatch/LSTM/verdict"
    s = scalars_for(make_report(make_module("dec#1", layers=1)))
    assert "gradwatch/dec:1/l0d0/gain" in s


def test_caller_inputs_param_grad_norms_and_clipping():
    s = scalars_for(
        make_report(make_module("rnn", layers=1)),
        param_grad_norms={"rnn": torch.tensor(3.5), "other.gru": 0.25},
        clip=ClipEvent(
            3,
            "norm",
            total_norm=8.0,
            threshold=2.0,
            coefficient=0.25,
            reason="always",
            clipped=True,
        ),
    )
    assert s["gradwatch/rnn/param_grad_norm"] == 3.5
    assert s["gradwatch/other.gru/param_grad_norm"] == 0.25
    assert s["gradwatch/clip/pre_norm"] == 8.0
    assert s["gradwatch/clip/threshold"] == 2.0
    assert s["gradwatch/clip/coefficient"] == 0.25
    assert s["gradwatch/clip/clipped"] == 1.0
    assert clip_scalars({"pre_norm": 1.0, "coefficient": 1.0, "z": float("inf")}) == {
        "gradwatch/clip/pre_norm": 1.0,
        "gradwatch/clip/coefficient": 1.0,
        "gradwatch/clip/z": math.inf,
        "gradwatch/clip/clipped": 0.0,
    }
    assert param_grad_scalars({"m": float("nan")})["gradwatch/m/param_grad_norm"] != 0.0


def test_layout_regexes_match_exactly_the_scalar_tags():
    mods = [make_module("enc.rnn", layers=2, directions=2), make_module("enc.rnn#1", layers=1)]
    scalars = scalars_for(
        make_report(*mods),
        param_grad_norms={"enc.rnn": 1.0},
        clip=ClipEvent(0, "norm", 1.0, 2.0, 1.0, "always", clipped=False),
    )
    layout = layout_mod.layout_for(["enc.rnn", "enc.rnn#1"])
    assert list(layout) == ["gradwatch: enc.rnn", "gradwatch"]  # one category per module
    charts = layout["gradwatch: enc.rnn"]
    gain = re.compile(charts["per-step gain (1 lossless, <1 vanishing, >1 exploding)"][1][0])
    matched = {t for t in scalars if gain.match(t)}
    assert matched == {t for t in scalars if t.endswith("/gain")}
    assert "gradwatch/enc.rnn:1/l0d0/gain" in matched  # the second call is covered
    covered = {
        t
        for t in scalars
        for cat in layout.values()
        for _, (_, regexes) in cat.items()
        for r in regexes
        if re.match(r, t)
    }
    missing = set(scalars) - covered
    assert missing <= {t for t in scalars if t.endswith(("/fidelity", "/seq_len"))} | {
        t for t in scalars if t.endswith("/clip/clipped")
    }
    assert not any(t.endswith("/gain") for t in missing)
    # Lightning's TensorBoardLogger writes f"{prefix}-{tag}"
    prefixed = layout_mod.layout_for(["enc.rnn"], logger_prefix="exp")
    regex = prefixed["gradwatch: enc.rnn"]["gain of the actual gradient (loss-weighted)"][1][0]
    assert re.match(regex, "exp-gradwatch/enc.rnn/l0d0/actual_gain")
    assert not re.match(regex, "gradwatch/enc.rnn/l0d0/actual_gain")


def test_layout_covers_the_callbacks_per_step_signals():
    layout = layout_mod.layout_for(["enc.rnn"])
    regexes = [r for cat in layout.values() for _, (_, rs) in cat.items() for r in rs]
    for tag in (
        "gradwatch/enc.rnn/param_grad_norm",
        "gradwatch/enc.rnn/injected_grad_norm",
        "gradwatch/step/skipped",
        "gradwatch/step/spike",
        "gradwatch/clip/pre_norm",
    ):
        assert any(re.match(r, tag) for r in regexes), tag
