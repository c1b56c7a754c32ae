"""One command that checks gradwatch on a GPU: exactness, host syncs, spike lag, cost, memory.

    python benchmarks/gpu_check.py                      # on CUDA (about 5 minutes at most)
    python benchmarks/gpu_check.py --device cpu --quick # the same checks on the CPU, small (CI)

Prints one table and exits 1 if any correctness check fails (status FAIL). Cost and memory
rows are measurements against targets (status "over" when above, not a failure).

* exact: every fused configuration (RNN tanh/relu, LSTM, LSTM with proj_size, GRU; 1-2
  layers; bidirectional; batch_first; packed) in each math mode of the device (CUDA: TF32
  off and on; fp16 autocast with a GradScaler and bf16 autocast on nn.LSTM; CPU: float32 and
  bf16 autocast), against a float64 unrolled reference (benchmarks/_reference.py). FAIL when
  a report says exact while it deviates from the reference by more than its mode's tolerance.
* sync (CUDA): cheap steps of Monitor and GradWatch under torch.cuda.set_sync_debug_mode
  ("error") raise nothing; a capture step's syncs are counted under "warn".
* spike: a gradient spike planted at step s is captured at step s + 1 (CPU, flags read at
  once; cheap steps record nothing to replay) or s + 2 (async flags, the default on CUDA),
  as docs/lightning.md documents.
* cost: replay + diagnostics over the module's fused forward + backward (LSTM 2x256 and 1x64,
  T 100, batch 32; target <= 2 at hidden size >= 256), and on the reference language model
  (embedding 64, LSTM 2x256, T 64, batch 32) the default overhead and the capture-every-step
  ratio.
* memory: extra peak of a capture over the module's own training step (target <= 0.5).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contextlib

from _reference import reference_totals

import gradwatch
from gradwatch._analysis import analyze
from gradwatch._capture.families.fused import capture_call
from gradwatch._capture.fused import FusedCall, record_fused_call
from gradwatch._capture.math_mode import TOLERANCE


@dataclass
class Row:
    check: str
    config: str
    value: str
    limit: str
    status: str  # ok, FAIL, over, n/a


ROWS: list[Row] = []


def add(check: str, config: str, value: str, limit: str, status: str) -> None:
    ROWS.append(Row(check, config, value, limit, status))


def replay_fused_call(call: FusedCall) -> gradwatch.ModuleReport:
    """The report of one recorded call: its raw capture (the replay), analysed."""
    return analyze(capture_call(call))


# ---------------------------------------------------------------------------- exactness
KINDS: dict[str, Callable[[int, int, bool, bool], nn.RNNBase]] = {
    "RNN tanh": lambda i, layers, bi, bf: nn.RNN(i, 16, layers, bidirectional=bi, batch_first=bf),
    "RNN relu": lambda i, layers, bi, bf: nn.RNN(
        i, 16, layers, nonlinearity="relu", bidirectional=bi, batch_first=bf
    ),
    "LSTM": lambda i, layers, bi, bf: nn.LSTM(i, 16, layers, bidirectional=bi, batch_first=bf),
    "LSTM proj": lambda i, layers, bi, bf: nn.LSTM(
        i, 16, layers, bidirectional=bi, batch_first=bf, proj_size=8
    ),
    "GRU": lambda i, layers, bi, bf: nn.GRU(i, 16, layers, bidirectional=bi, batch_first=bf),
}


def _modes(device: str) -> list[str]:
    if device == "cuda":
        return ["tf32 off", "tf32 on", "fp16+scaler", "bf16"]
    return ["float32", "bf16"]


def _exact_one(kind, layers, bi, bf, packed, mode, device, steps) -> tuple[bool, float, float]:
    """(report exact, its fidelity, deviation of its totals from the float64 reference)."""
    torch.manual_seed(0)
    module = KINDS[kind](6, layers, bi, bf).to(device)
    x = torch.randn(steps, 4, 6, device=device)
    lengths = torch.tensor([steps, steps - 3, 2, steps - 1]) if packed else None
    dirs = 2 if bi else 1
    out_size = (module.proj_size or module.hidden_size) * dirs
    r = torch.randn(steps, 4, out_size, device=device)
    s = torch.randn(layers * dirs, 4, module.proj_size or module.hidden_size, device=device)
    inp = x.transpose(0, 1) if bf else x
    if packed:
        inp = pack_padded_sequence(inp, lengths, batch_first=bf, enforce_sorted=False)
    low = {"fp16+scaler": torch.float16, "bf16": torch.bfloat16}.get(mode)
    tf32 = mode == "tf32 on"
    old = torch.backends.cudnn.rnn.fp32_precision
    torch.backends.cudnn.rnn.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        with gradwatch.trace(module) as tr:
            with torch.autocast(device, dtype=low or torch.float32, enabled=low is not None):
                out, state = module(inp)
            if packed:
                out = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=bf)[0]
            out = out.transpose(0, 1) if bf else out
            h_n = state[0] if isinstance(state, tuple) else state
            loss = (out.float() * r[: out.shape[0]]).sum() + (h_n.float() * s).sum()
            scale = 1024.0 if mode == "fp16+scaler" else 1.0  # what a GradScaler multiplies by
            (loss * scale).backward()
    finally:
        torch.backends.cudnn.rnn.fp32_precision = old
    rep = tr.report()[type(module).__name__]
    ref = reference_totals(module.cpu(), x.cpu(), lengths, r.cpu(), s.cpu())
    got = rep.total.double() / scale
    dev = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return rep.exact, rep.fidelity, dev


def check_exactness(device: str, quick: bool) -> None:
    steps = 8 if quick else 20
    for mode in _modes(device):
        kinds = ["LSTM"] if mode in ("fp16+scaler", "bf16") else list(KINDS)
        tol = TOLERANCE[
            {"tf32 on": "tf32", "fp16+scaler": "float16", "bf16": "bfloat16"}.get(mode, "float32")
        ]
        worst, n_exact, n, fails = 0.0, 0, 0, []
        for kind, layers, bi, bf, packed in itertools.product(
            kinds, (1, 2), (False, True), (False, True), (False, True)
        ):
            flags = [n for n, on in (("bi", bi), ("bf", bf), ("packed", packed)) if on]
            label = " ".join([kind, f"{layers}L", *flags])
            try:
                exact, fidelity, dev = _exact_one(kind, layers, bi, bf, packed, mode, device, steps)
            except Exception as e:  # an unsupported mode on this device is reported, not hidden
                add("exact", f"{mode}: {label}", f"error {e!r:.60}", "-", "FAIL")
                continue
            n += 1
            n_exact += exact
            if exact:
                worst = max(worst, dev)
            if exact and not dev <= 2 * tol:  # never exact and wrong
                fails.append(f"{label} dev {dev:.1e} fid {fidelity:.1e}")
        status = "FAIL" if fails else "ok"
        value = f"{n_exact}/{n} exact, worst dev {worst:.1e}"
        add("exact", f"{mode}: {len(kinds)} kinds x 16 configs", value, f"<= {2 * tol:.0e}", status)
        for f in fails[:5]:
            add("exact", f"{mode}: {f}", "exact but off", f"<= {2 * tol:.0e}", "FAIL")


# ---------------------------------------------------------------------------- reference LM
class LM(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, num_layers=2)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def _lm(device: str, quick: bool, lr: float = 0.01):
    torch.manual_seed(0)
    vocab, emb, hidden, steps, batch = (50, 16, 32, 16, 8) if quick else (1000, 64, 256, 64, 32)
    model = LM(vocab, emb, hidden).to(device)
    data = torch.randint(0, vocab, (steps, batch), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(mon=None, scale: float = 1.0) -> None:
        loss = nn.functional.cross_entropy(model(data).flatten(0, 1), data.flatten()) * scale
        loss.backward()
        if mon is not None:
            mon.step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


# ---------------------------------------------------------------------------- host sync
def check_sync(device: str, quick: bool) -> None:
    if device != "cuda":
        add("sync", "cheap steps (Monitor, GradWatch)", "-", "0 syncs", "n/a")
        return
    model, step = _lm(device, quick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # signals at every step (no budget stride): every cheap step is checked
        with gradwatch.Monitor(model, every_n_steps=1000, overhead_budget=None) as mon:
            step(mon)  # step 0: a scheduled capture
            torch.cuda.synchronize()
            try:
                torch.cuda.set_sync_debug_mode("error")
                for _ in range(5):
                    step(mon)
                add("sync", "Monitor: 5 cheap steps", "0 syncs", "0", "ok")
            except RuntimeError as e:
                add("sync", "Monitor: cheap step", f"{e!s:.60}", "0", "FAIL")
            finally:
                torch.cuda.set_sync_debug_mode("default")
    _check_sync_lightning(device, quick)
    model, step = _lm(device, quick)
    with (
        gradwatch.Monitor(model, every_n_steps=1) as mon,
        warnings.catch_warnings(record=True) as w,
    ):
        warnings.simplefilter("always")
        step(mon)
        torch.cuda.synchronize()
        w.clear()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(mon)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(x.message) for x in w)
    add("sync", "Monitor: one capture step", f"{syncs} syncs", "recorded", "ok")


def _check_sync_lightning(device: str, quick: bool) -> None:
    try:
        import lightning.pytorch as pl
    except ImportError:
        add("sync", "GradWatch: cheap steps", "lightning not installed", "0", "n/a")
        return
    errors: list[str] = []

    class Strict(gradwatch.GradWatch):
        """Every hook of the callback on a cheap step runs under sync debug mode 'error'."""

    for name in dir(gradwatch.GradWatch):
        if not name.startswith("on_"):
            continue
        base = getattr(gradwatch.GradWatch, name)

        def wrapped(self, trainer, *args, _base=base, **kwargs):
            cheap = trainer.global_step % self_every(self) != 0
            if cheap:
                torch.cuda.set_sync_debug_mode("error")
            try:
                return _base(self, trainer, *args, **kwargs)
            except RuntimeError as e:
                errors.append(f"{e!s:.60}")
                raise
            finally:
                torch.cuda.set_sync_debug_mode("default")

        setattr(Strict, name, wrapped)

    model, _ = _lm(device, quick)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def training_step(self, batch, batch_idx):
            (x,) = batch
            x = x.t()
            return nn.functional.cross_entropy(self.lm(x).flatten(0, 1), x.flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.randint(0, model.emb.num_embeddings, (48, 16))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Strict(every_n_steps=100, overhead_budget=None)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(RuntimeError):
            trainer.fit(Module(), loader)
    add("sync", "GradWatch: 5 cheap steps", f"{len(errors)} syncs", "0", "FAIL" if errors else "ok")


def self_every(cb) -> int:
    return int(getattr(cb, "every_n_steps", None) or getattr(cb, "_every_n_steps", 100) or 100)


# ---------------------------------------------------------------------------- spike lag
def check_spike(device: str, quick: bool) -> None:
    planted = 8
    for async_flags, lag in ((False, 1), (True, 2)):
        if async_flags is False and device == "cuda":
            continue  # the default on CUDA is async; the synchronous path is covered on the CPU
        model, step = _lm(device, True, lr=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with gradwatch.Monitor(  # signals at every step: no budget stride
                model,
                every_n_steps=1000,
                overhead_budget=None,
                warmup_steps=3,
                async_flags=async_flags,
            ) as mon:
                for i in range(planted + 4):
                    step(mon, scale=1e4 if i == planted else 1.0)
        forced = sorted(k for k in mon.reports if k != 0)
        want = [planted + lag]
        label = f"async_flags={async_flags}: planted at {planted}"
        add("spike", label, f"captured {forced}", f"{want}", "ok" if forced == want else "FAIL")


# ---------------------------------------------------------------------------- cost
def _timed(fn: Callable[[], None], device: str, rounds: int) -> float:
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once()
    return statistics.median(once() for _ in range(rounds))


def check_cost(device: str, quick: bool) -> None:
    rounds = 3 if quick else 15
    steps, batch = (30, 8) if quick else (100, 32)
    for layers, hidden in ((2, 256), (1, 64)):
        h = hidden // 4 if quick else hidden
        torch.manual_seed(0)
        module = nn.LSTM(h, h, num_layers=layers).to(device)
        x = torch.randn(steps, batch, h, device=device)
        r = torch.randn(steps, batch, h, device=device)

        def fwd_bwd(module=module, x=x, r=r) -> None:
            out, (h_n, _) = module(x)
            ((out * r).sum() + h_n.sum()).backward()

        out, state = module(x)
        call = record_fused_call("m", "m", module, (x,), {}, (out, state))
        g = torch.autograd.grad(
            (out * r).sum() + state[0].sum(), [out, state[0], state[1]], allow_unused=True
        )
        call.grads = {k: v for k, v in zip(("out", "h_n", "c_n"), g, strict=True) if v is not None}
        base = _timed(fwd_bwd, device, rounds)
        replay = _timed(lambda call=call: replay_fused_call(call), device, rounds)
        ratio = replay / base
        target = 2.0 if hidden >= 256 else None
        status = "ok" if target is None or ratio <= target else "over"
        add(
            "cost",
            f"LSTM {layers}x{h} T{steps} B{batch}: replay+diag / fwd+bwd",
            f"{ratio:.2f} ({base * 1e3:.1f} ms base)",
            "<= 2" if target else "-",
            status,
        )
    _check_lm_cost(device, quick, rounds)


def _check_lm_cost(device: str, quick: bool, rounds: int) -> None:
    model, step = _lm(device, quick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):  # warm up the allocator and the kernels
            step()
        off_before = _timed(step, device, rounds)
        with gradwatch.Monitor(model, every_n_steps=10**9, overhead_budget=None) as mon:
            step(mon)  # step 0 is a scheduled capture: the rest are cheap
            cheap = _timed(lambda: step(mon), device, rounds)
        with gradwatch.Monitor(model, every_n_steps=1) as mon:
            capture = _timed(lambda: step(mon), device, rounds)
        off = min(off_before, _timed(step, device, rounds))  # before and after: drift-robust
    default = (99 * cheap + capture) / (100 * off)
    add(
        "cost",
        "reference LM: default (every 100)",
        f"{default:.3f}",
        "<= 1.03",
        "ok" if default <= 1.03 else "over",
    )
    add("cost", "reference LM: capture every step", f"{capture / off:.2f}", "-", "ok")


# ---------------------------------------------------------------------------- memory
def check_memory(device: str, quick: bool) -> None:
    if device != "cuda":
        import subprocess

        # a size where a capture's memory matters
        size = ["--hidden", "256", "--steps", "300" if quick else "1000", "--batch", "16"]
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "capture_memory.py")
        done = subprocess.run(
            [sys.executable, script, *size], capture_output=True, text=True, check=True
        )
        row = [c.strip() for c in done.stdout.splitlines()[2].strip("|").split("|")]
        ratio = float(row[-1])
        add(
            "memory",
            f"{row[0]}: capture adds / step holds (RSS)",
            f"{row[4]} MB / {row[3]} MB = {ratio:.2f}",
            "<= 0.5",
            "ok" if ratio <= 0.5 else "over",
        )
        return
    hidden, steps = (128, 200) if quick else (512, 1000)
    torch.manual_seed(0)
    module = nn.LSTM(hidden, hidden, num_layers=2).to(device)
    x = torch.randn(steps, 32, hidden, device=device)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)

    def one(mon=None) -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out, (h_n, _) = module(x)
        (out.sum() + h_n.sum()).backward()
        if mon is not None:
            mon.step(opt)
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    holds = one()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradwatch.Monitor(module, every_n_steps=1) as mon:
            traced = one(mon)
    ratio = (traced - holds) / holds
    add(
        "memory",
        f"LSTM 2x{hidden} T{steps} B32: capture adds / step holds (CUDA)",
        f"{traced - holds:.0f} MB / {holds:.0f} MB = {ratio:.2f}",
        "<= 0.5",
        "ok" if ratio <= 0.5 else "over",
    )


# ---------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description="gradwatch GPU readiness check")
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds")
    p.add_argument("--only", nargs="*", choices=["exact", "sync", "spike", "cost", "memory"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; run with --device cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    checks = {
        "exact": check_exactness,
        "sync": check_sync,
        "spike": check_spike,
        "cost": check_cost,
        "memory": check_memory,
    }
    start = time.perf_counter()
    for name, fn in checks.items():
        if args.only is None or name in args.only:
            try:
                fn(args.device, args.quick)
            except Exception as e:  # a crashed check is a failed check, and the table still prints
                add(name, "check crashed", f"{e!r:.70}", "-", "FAIL")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    took = time.perf_counter() - start
    print(f"gradwatch gpu_check on {device}, torch {torch.__version__}, {took:.0f} s")
    widths = [
        max(len(getattr(r, f)) for r in [*ROWS, Row("check", "config", "value", "limit", "status")])
        for f in ("check", "config", "value", "limit", "status")
    ]
    for r in [Row("check", "config", "value", "limit", "status"), *ROWS]:
        cells = [
            getattr(r, f).ljust(w)
            for f, w in zip(("check", "config", "value", "limit", "status"), widths, strict=True)
        ]
        print("| " + " | ".join(cells) + " |")
    failed = [r for r in ROWS if r.status == "FAIL"]
    print(f"{len(failed)} failed" if failed else "all correctness checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
