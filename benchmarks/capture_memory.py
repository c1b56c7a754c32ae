"""Peak memory of a capture next to the module's own training step (CPU, fresh processes).

For each configuration two fresh processes run one training step of a fused module
(``loss = (out * r).sum() + h_n.sum()``): one plain, one through ``gradwatch.Monitor`` with a
capture at that step (replay and diagnostics). Each reports its resident set size before the
step (module, data and PyTorch loaded) and its peak (``getrusage`` max RSS). Then

* step holds  = plain peak - plain before: what the module's own training step holds;
* capture     = traced peak - plain peak: what a capture adds to the peak;
* ratio       = capture / step holds (target: at most 0.5).

    python benchmarks/capture_memory.py                       # LSTM 2x512, T 1000, batch 32
    python benchmarks/capture_memory.py --quick               # small, for CI
    python benchmarks/capture_memory.py --kind GRU --hidden 256 --steps 500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _child(kind: str, layers: int, hidden: int, steps: int, batch: int, traced: bool) -> None:
    import warnings

    import torch
    from torch import nn

    import gradwatch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = getattr(nn, kind)(hidden, hidden, num_layers=layers)
    x = torch.randn(steps, batch, hidden)
    r = torch.randn(steps, batch, hidden)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    monitor = gradwatch.Monitor(module, every_n_steps=1) if traced else None
    if monitor is not None:
        monitor.__enter__()
    before = _rss_now_mb()
    out, state = module(x)
    h_n = state[0] if isinstance(state, tuple) else state
    ((out * r).sum() + h_n.sum()).backward()
    exact = None
    if monitor is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monitor.step(opt)
        exact = bool(monitor.reports[0][kind].exact)
        monitor.__exit__(None, None, None)
    print(json.dumps({"before": before, "peak": _peak_mb(), "exact": exact}))


def _measure(args: argparse.Namespace, traced: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        *("--kind", args.kind, "--layers", str(args.layers), "--hidden", str(args.hidden)),
        *("--steps", str(args.steps), "--batch", str(args.batch)),
    ]
    if traced:
        cmd.append("--traced")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="LSTM", choices=["LSTM", "GRU", "RNN"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--quick", action="store_true", help="LSTM 2x256, T 300, batch 16 (a few seconds)"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        # smaller sizes measure allocator noise: the replay holds every layer of a call below
        # gradwatch._capture.layered.RECOMPUTE_ABOVE (tens of MB at most)
        args.hidden, args.steps, args.batch = 256, 300, 16
    if args.child:
        _child(args.kind, args.layers, args.hidden, args.steps, args.batch, args.traced)
        return
    plain, traced = _measure(args, False), _measure(args, True)
    holds = plain["peak"] - plain["before"]
    extra = traced["peak"] - plain["peak"]
    label = f"{args.kind} {args.layers}x{args.hidden}, T {args.steps}, batch {args.batch}"
    print("| module | plain peak (MB) | traced peak (MB) | step holds (MB) ", end="")
    print("| capture adds (MB) | ratio |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {label} | {plain['peak']:.0f} | {traced['peak']:.0f} | {holds:.0f} | {extra:.0f} "
        f"| {extra / max(holds, 1e-9):.2f} |"
    )
    print(f"capture exact: {traced['exact']}")


if __name__ == "__main__":
    main()
