"""A finished run's results.json (metrics, settings, environment) and a paired claim's arms and paired.json."""
import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

from common import dist
from common.checkpoints import _atomic
from common.device import amp_used


def memory_policy(args) -> str:
    if args.memory_total is not None:
        return f"fixed total {args.memory_total}"
    return f"growing, {args.memory_per_class} per class" if args.memory_per_class else "none (memory-free)"


def finish_run(args, method: str, data, order: list, device, script_path: str, start_time: float, metrics: dict,
               **extra) -> dict:
    """Write results.json (atomically, only now that every phase is done) and print the summary line."""
    command = None  # how to run it again, when it was started from the command line
    if os.path.basename(sys.argv[0]) == os.path.basename(script_path):
        command = shlex.join(dist.launcher() + [os.path.basename(script_path)] +
                             [a for a in sys.argv[1:] if a != "--resume"])
    results = {"method": method, **extra, "finished": True, "command": command, "args": vars(args),
               "class_order": order, "normalization": {"mean": data.mean, "std": data.std}, "backbone": args.backbone,
               "memory_policy": memory_policy(args), **metrics, "wall_s_this_process": time.time() - start_time,
               "bf16_autocast": amp_used(device, not args.no_amp), **environment(device, script_path)}
    _atomic(os.path.join(args.out_dir, "results.json"), lambda p: open(p, "w").write(json.dumps(results, indent=1)))
    fmt = {k: "n/a" if metrics[k] is None else f"{metrics[k]:.2f}"
           for k in ("avg_inc_acc", "nme_avg_inc_acc", "last_acc", "nme_last_acc", "forgetting")}
    print(f"average incremental accuracy: CNN {fmt['avg_inc_acc']}  NME {fmt['nme_avg_inc_acc']}   last: CNN "
          f"{fmt['last_acc']}  NME {fmt['nme_last_acc']}   forgetting (CNN): {fmt['forgetting']}")
    print(f"results: {os.path.join(args.out_dir, 'results.json')}")
    return results


def run_arms(args, run, arms, root: str, **kwargs):
    """The arms of a paired claim in turn: `arms` is [(name, flag overrides)], each runs `run(arm_args, **kwargs)`
    into root/<name>/. Returns {name: results}, or None once an arm stops (--stop-after; --resume continues)."""
    results = {}
    for name, overrides in arms:
        arm_args = argparse.Namespace(**{**vars(args), **overrides, "paired": None, "out_dir": os.path.join(root, name)})
        results[name] = run(arm_args, **kwargs)
        if results[name] is None:
            return None
    return results


PAIRED_METRICS = ("avg_inc_acc", "last_acc", "forgetting", "nme_avg_inc_acc", "nme_last_acc", "nme_forgetting",
                  "wall_s")


def write_paired(root: str, arms: dict, baseline: str, extra_metrics=(), compare=None, **info) -> dict:
    """paired.json, one schema in every script: each arm's metrics ({name: results} `arms`) and its difference to
    the baseline arm or, for an arm in `compare` ({arm: its baseline}: a ladder's rung below), to that arm. `arms`
    None (run_arms after --stop-after): nothing is written, returns None."""
    if arms is None:
        return None
    keys, compare = PAIRED_METRICS + tuple(extra_metrics), compare or {}
    versus = {n: compare.get(n, baseline) for n in arms if n != baseline}
    paired = {**info, "baseline": baseline, "arms": {n: {k: r.get(k) for k in keys} for n, r in arms.items()},
              "difference": {n: {k: arms[n][k] - arms[b][k] for k in keys
                                 if arms[n].get(k) is not None and arms[b].get(k) is not None}
                             for n, b in versus.items()}}
    if compare:
        paired["versus"] = versus
    _atomic(os.path.join(root, "paired.json"), lambda p: open(p, "w").write(json.dumps(paired, indent=1)))
    print("paired (CNN difference): avg inc / last / forgetting / wall s")
    for name, d in paired["difference"].items():
        print(f"  {name} - {versus[name]}: " + " / ".join(f"{d[k]:+.2f}" if k in d else "n/a" for k in
                                                   ("avg_inc_acc", "last_acc", "forgetting", "wall_s")))
    print(f"paired: {os.path.join(root, 'paired.json')}")
    return paired


def environment(device: torch.device, script_path: str) -> dict:
    import timm
    import torchvision
    here = os.path.dirname(os.path.abspath(script_path))

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    with open(script_path, "rb") as f:
        script_sha256 = hashlib.sha256(f.read()).hexdigest()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "numpy": np.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "script_sha256": script_sha256, "hostname": platform.node(), "date": time.strftime("%Y-%m-%d"),
        "processes": dist.world_size(),  # torchrun --nproc_per_node (times nodes); 1 for a plain run
    }
