"""The extension points: recurrence families, raw captures, the one module selection."""

from __future__ import annotations

import contextlib
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gradwatch
from gradwatch._analysis import analyze
from gradwatch._capture import RawCapture, Recorder, Recurrences, Walkable, select_modules
from gradwatch._capture.families import Family, family_of, register, registered, unregister

# -- a toy family: a diagonal linear scan h_t = a * h_(t-1) + x_t --------------------------


class Scan(nn.Module):
    """A recurrence no built-in family knows."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay

    def forward(self, x: Tensor) -> Tensor:  # [T, B, H] -> [T, B, H]
        h, out = torch.zeros_like(x[0]), []
        for x_t in x:
            h = self.decay * h + x_t
            out.append(h)
        return torch.stack(out)


class ScanSteps:
    """`Walkable` for the scan: one multiplication by ``decay`` per step."""

    def __init__(self, decay: float, steps: int, like: Tensor) -> None:
        self.decay, self.steps, self.reverse, self._like = decay, steps, False, like

    state_sizes = property(lambda self: (self._like.shape[-1],))
    gated = property(lambda self: False)
    weight = property(lambda self: self._like)

    def order(self, steps: int) -> range:
        return range(steps)

    def step_back(self, t, dh, dc, valid):
        return dh, self.decay * dh, None, None

    def recurrent_matrix(self) -> Tensor:
        return self.decay * torch.eye(self._like.shape[-1], dtype=self._like.dtype)

    candidate_block = recurrent_matrix

    def forget_bias(self) -> None:
        return None

    def trajectory(self, steps: Tensor) -> dict[str, Tensor]:
        return {"derivative": torch.ones(len(steps), *self._like.shape, dtype=self._like.dtype)}


@dataclass
class ScanCall:
    name: str
    module_name: str
    decay: float
    grad: Tensor | None = None
    handles: list[Any] = field(default_factory=list)

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.grad = None


class ScanFamily(Family):
    name = "toy-scan"
    looks_for = "Scan"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, Scan)

    def hook(self, recorder, name, module):
        def on_call(mod, args, out):
            if not recorder.watching(name):
                return
            call = ScanCall(recorder.new_name(name), name, mod.decay)

            def on_grad(g: Tensor) -> None:
                call.grad = g.detach().clone()
                recorder.gradient_arrived(call)

            call.handles.append(out.register_hook(on_grad))
            recorder.add(call, self)

        return [module.register_forward_hook(on_call)]

    def capture(self, record: ScanCall) -> RawCapture:
        direct = record.grad  # [T, B, H]: what the outputs inject at each step
        steps, batch = direct.shape[0], direct.shape[1]
        walk = ScanSteps(record.decay, steps, direct[0])
        totals, carry = [None] * steps, torch.zeros_like(direct[0])
        carried = [None] * steps
        for t in reversed(range(steps)):
            carried[t] = carry
            totals[t] = direct[t] + carry
            _, carry, _, _ = walk.step_back(t, totals[t], None, None)

        def stat(x: list[Tensor] | Tensor) -> Tensor:
            x = torch.stack(list(x))
            return x.double().norm(dim=-1).mean(-1).float().view(1, 1, steps)

        return RawCapture(
            name=record.name,
            module_name=record.module_name,
            kind="scan",
            num_layers=1,
            num_directions=1,
            stats={"total": stat(totals), "carried": stat(carried), "direct": stat(direct)},
            valid_samples=torch.full((steps,), batch),
            reverse=(False,),
            source="hooks",
            received_gradient=True,
            recurrences=Recurrences({(0, 0): walk}, None, torch.full((batch,), steps)),
        )


@pytest.fixture
def scan_family():
    family = register(ScanFamily())
    yield family
    unregister(family)


def test_a_family_registered_in_a_test_module_is_picked_up(scan_family):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scan(0.5))
    assert family_of(model[1]) is scan_family and scan_family in registered()
    assert select_modules(model).names == ["1"]
    x = torch.randn(30, 2, 3)
    w = torch.randn(30, 2, 4)
    with gradwatch.trace(model) as tr:
        (model(x) * w).sum().backward()
    m = tr.report()["1"]
    assert (m.kind, m.source, m.exact) == ("scan", "hooks", True)

    # independent: autograd through the same scan with every state kept
    xs = model[0](x).detach().requires_grad_()
    h, states = torch.zeros(2, 4), []
    for t in range(30):
        h = 0.5 * h + xs[t]
        h.retain_grad()
        states.append(h)
    (torch.stack(states) * w).sum().backward()
    expected = torch.stack([s.grad.double().norm(dim=-1).mean() for s in states]).float()
    torch.testing.assert_close(m.total[0, 0], expected, rtol=1e-5, atol=0)
    # the analysis walks the toy's own step_back: gain 0.5 per step, horizon ln 0.01 / ln 0.5
    assert m.gain[0, 0].item() == pytest.approx(0.5, rel=1e-5)
    assert m.horizon[0, 0].item() == pytest.approx(math.log(0.01) / math.log(0.5), rel=1e-4)
    assert m.causes.weight_norm[0, 0].item() == pytest.approx(0.5, rel=1e-4)
    assert m.verdict == "vanishing"


def test_without_the_family_the_module_is_not_recurrent():
    model = nn.Sequential(Scan(0.5))
    assert all(not isinstance(f, ScanFamily) for f in registered())
    with pytest.raises(gradwatch.NoRecurrentModuleError, match="no recurrent module"):
        gradwatch.trace(model).report()


def test_capture_returns_raw_undiagnosed_data_that_analyze_turns_into_the_report():
    torch.manual_seed(1)
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(7, 2, 3)
    raws: list[RawCapture] = []
    recorder = Recorder(lstm, select_modules(lstm).watched, raws.append)
    recorder.attach()
    out, _ = lstm(x)
    out.pow(2).sum().backward()
    recorder.detach()
    (raw,) = raws
    assert isinstance(raw, RawCapture) and not hasattr(raw, "verdict")
    assert raw.stats["total"].shape == (2, 2, 7) and raw.stats["cell_total"] is not None
    assert isinstance(raw.fidelity, Tensor)  # still on the device: no host copy in capture
    assert set(raw.recurrences.layers) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(isinstance(w, Walkable) for w in raw.recurrences.layers.values())
    assert raw.reverse == (False, True)
    report = analyze(raw)
    with gradwatch.trace(lstm) as tr:
        out, _ = lstm(x)
        out.pow(2).sum().backward()
    traced = next(iter(tr.report().values()))
    assert torch.equal(report.total, traced.total) and report.verdict == traced.verdict
    assert torch.equal(report.horizon, traced.horizon)


# -- include / exclude ----------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.LSTM(2, 3)
        self.dec = nn.GRU(3, 3)


@pytest.mark.parametrize(
    ("include", "exclude", "watched"),
    [
        ("enc", None, ["enc"]),
        (nn.LSTM, None, ["enc"]),
        (["enc", nn.GRU], None, ["enc", "dec"]),
        (None, "enc", ["dec"]),
        (None, nn.GRU, ["enc"]),
        (None, ("e*", "d*"), []),
    ],
)
def test_selectors_take_one_pattern_one_type_or_an_iterable(include, exclude, watched):
    assert select_modules(Net(), include, exclude).names == watched
    none = pytest.warns(RuntimeWarning, match="no recurrent module found")
    with none if not watched else contextlib.nullcontext():
        mon = gradwatch.Monitor(Net(), include=include, exclude=exclude)
    assert mon._core.names == watched
    mon.close()


@pytest.mark.parametrize("bad", [123, [3], ["enc", 1.5], [nn.Linear(2, 2)], object()])
@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_a_bad_selector_is_a_value_error_naming_the_argument(bad, argument):
    for make in (
        lambda: gradwatch.trace(Net(), **{argument: bad}),
        lambda: gradwatch.Monitor(Net(), **{argument: bad}),
        lambda: gradwatch.GradWatch(**{argument: bad}),
    ):
        with pytest.raises(ValueError, match=argument):
            make()


def test_selectors_survive_pickling_unchanged():
    cb = gradwatch.GradWatch(include=nn.LSTM, exclude="net.enc")
    back = pickle.loads(pickle.dumps(cb))
    assert back._core.include == (nn.LSTM,)
    assert back._core.exclude == ("net.enc",)  # not split into characters
    many = pickle.loads(pickle.dumps(gradwatch.GradWatch(include=["a.*", nn.GRU])))
    assert many._core.include == ("a.*", nn.GRU)


def test_a_filter_that_matches_nothing_is_named():
    with pytest.raises(gradwatch.NoRecurrentModuleError, match=r"include='nope\*'"):
        gradwatch.trace(Net(), include="nope*").report()
    with pytest.warns(RuntimeWarning, match=r"exclude='typo' matched no recurrent module"):
        tr = gradwatch.trace(Net(), exclude=["dec", "typo"])
    assert tr.names == ["enc"]
    with pytest.warns(RuntimeWarning, match=r"include=GRU matched no recurrent module"):
        gradwatch.Monitor(nn.Sequential(nn.LSTM(2, 2)), include=[nn.LSTM, nn.GRU]).close()
