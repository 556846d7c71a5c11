"""Benchmark: the training step of each method script, eager vs captured as a CUDA graph, on generated inputs.

    python -m common.bench                     # every script, its paper protocol's shapes (GPU)
    python -m common.bench --scripts lucir --steps 20 --batch-size 16   # small sizes (CPU, tests)

A script's `bench_step(args, device) -> (step, optimizer, inputs)` is the real step of an incremental phase
from its defaults (several steps: `bench_steps -> [(name, step, optimizer, inputs)]`, e.g. genifer's). Each is
timed after warm-up, eagerly and through CapturedStep (eager on CPU); prints images/s for both and the ratio.
"""
import argparse
import importlib
import time

import torch

from common.graph import CapturedStep

SCRIPTS = ("lucir", "tbbn", "bsce", "cim", "genifer")


def time_steps(step, inputs, steps, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        out = step(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    else:
        out.sum().item()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scripts", nargs="+", default=None, help=f"which scripts (default: those present of "
                   f"{', '.join(SCRIPTS)})")
    p.add_argument("--steps", type=int, default=200, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per mode before timing")
    p.add_argument("--batch-size", type=int, default=None, help="override each script's batch size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--script-flags", default="", help="extra flags for each script, e.g. '--smoke' (tiny sizes)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    names = args.scripts or [s for s in SCRIPTS if importlib.util.find_spec(s) is not None]
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up steps")
    print(f"{'script':<18} {'batch':>5} {'eager img/s':>12} {'graph img/s':>12} {'ratio':>6}")
    rows = []
    for name in names:
        module = importlib.import_module(name)
        flags = ["--device", args.device] + (["--batch-size", str(args.batch_size)] if args.batch_size else []) + \
            args.script_flags.split()
        rates = {}
        for graph in (False, True):
            torch.manual_seed(0)
            script_args = module.parse_args(flags + ([] if graph else ["--no-graph"]))
            steps = module.bench_steps(script_args, device) if hasattr(module, "bench_steps") else \
                [(None, *module.bench_step(script_args, device))]
            for step_name, step, optimizer, inputs in steps:
                runner = CapturedStep(step, device, enabled=graph, optimizer=optimizer)
                if args.warmup:
                    time_steps(runner, inputs, args.warmup, device)
                batch = inputs[0].shape[0]
                label = name if step_name is None else f"{name} {step_name}"
                rates.setdefault(label, [batch]).append(batch / time_steps(runner, inputs, args.steps, device))
        for label, (batch, eager, graph) in rates.items():
            rows.append((label, batch, eager, graph))
            print(f"{label:<18} {batch:>5} {eager:>12.0f} {graph:>12.0f} {graph / eager:>5.1f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
