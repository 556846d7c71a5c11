"""Run plumbing: one-line errors, system flags, seeding, run folder, checkpoints, results, progress.

A run folder holds `metrics.jsonl` (one line per finished phase), `checkpoint.pt` (rewritten atomically after
each phase, everything needed to continue) and, only once the run has really finished, `results.json`.
"""
import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch


class UserError(Exception):
    """Bad input: printed as one line (`error: ...`), exit code 2, no traceback."""


def run_main(main):
    """Call `main()`; turn a UserError into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last finished phase is in the checkpoint; rerun with --resume", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------- flags
def add_system_flags(parser: argparse.ArgumentParser):
    """System flags, identical in every script (no paper source: they change how, not what, is run)."""
    g = parser.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="training seed (init, batches, augmentation); "
                   "the class order has its own --class-order-seed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    g.add_argument("--no-graph", action="store_true", help="run the training step eagerly instead of as a "
                   "captured CUDA graph")
    g.add_argument("--workers", type=int, default=8, help="DataLoader workers (large-image datasets only)")
    g.add_argument("--out-dir", default=None, help="run folder (default: results/<method>__<dataset>_B<base>"
                   "_Inc<inc>__seed<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from the last finished phase in --out-dir")
    g.add_argument("--stop-after", type=int, default=None, metavar="PHASE", help="exit after this phase is "
                   "finished and checkpointed (continue later with --resume)")
    g.add_argument("--smoke", action="store_true", help="tiny end-to-end run on generated data, seconds on CPU")
    g.add_argument("--class-list", default=None, help="imagenet100: file with the 100 class folder names, one "
                   "a line (default: LUCIR's rule, 100 folders drawn with seed 1993)")
    return g


def resolve_defaults(args, table: dict, smoke: dict):
    """Fill flags left at None from the per-dataset default table; `--smoke` overrides protocol flags."""
    if args.smoke:
        for key, value in smoke.items():
            setattr(args, key, value)
    if args.dataset not in table:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(sorted(table))}")
    for key, value in table[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def print_args(args):
    width = max(len(k) for k in vars(args))
    for key, value in sorted(vars(args).items()):
        print(f"  {key:<{width}}  {value}")


# ----------------------------------------------------------------------------------------------- device
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_device(args) -> torch.device:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no GPU is visible; pass --device cpu (or --smoke)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (BN stays fp32 under autocast). cache_enabled=False so it can be graph-captured."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda",
                          cache_enabled=False)


# ----------------------------------------------------------------------------------------------- run folder
def default_out_dir(method: str, args) -> str:
    """results/<method>__<dataset>[_C<classes>_T<train-per-class>_S<image-size>]_B<base>_Inc<inc>__seed<seed>
    (subset tags only where those flags are set). A --smoke run's default folder holds only a throw-away run on
    generated data, so a new --smoke run (without --resume) replaces it."""
    subset = "".join(f"_{tag}{getattr(args, key)}" for key, tag in
                     (("classes", "C"), ("train_per_class", "T"), ("image_size", "S")) if getattr(args, key, None))
    path = os.path.join("results", f"{method}__{args.dataset}{subset}_B{args.base_classes}_Inc{args.increment}"
                        f"__seed{args.seed}")
    if args.smoke and not args.resume and os.path.isdir(path):
        shutil.rmtree(path)
    return path


def prepare_out_dir(out_dir: str, resume: bool):
    """Refuse to overwrite a run unless --resume; return the checkpoint to continue from (or None)."""
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if os.path.exists(os.path.join(out_dir, "results.json")) and not resume:
        raise UserError(f"{out_dir} holds a finished run; pass --resume to reuse it or choose another --out-dir")
    if os.path.exists(ckpt_path) and not resume:
        raise UserError(f"{out_dir} holds an unfinished run; pass --resume to continue it or choose another "
                        "--out-dir")
    os.makedirs(out_dir, exist_ok=True)
    if resume and os.path.exists(ckpt_path):
        return torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return None


RUN_ONLY_FLAGS = ("resume", "device", "no_graph", "workers", "stop_after")  # may change between resumed runs


def check_resume_args(saved: dict, now: dict):
    """A resumed run must use the settings of the checkpoint, except flags that do not change the numbers."""
    diff = sorted(k for k in set(saved) | set(now) if k not in RUN_ONLY_FLAGS and saved.get(k) != now.get(k))
    if diff:
        raise UserError(f"--resume with settings that differ from the checkpoint's ({', '.join(diff)}); use the "
                        "original flags or another --out-dir")


def _atomic(path: str, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out_dir: str, state: dict):
    _atomic(os.path.join(out_dir, "checkpoint.pt"), lambda p: torch.save(state, p))


def write_metrics(out_dir: str, rows: list):
    """Rewrite metrics.jsonl from the finished phases (so a resumed run never duplicates a line)."""
    _atomic(os.path.join(out_dir, "metrics.jsonl"),
            lambda p: open(p, "w").write("".join(json.dumps(r) + "\n" for r in rows)))


def write_results(out_dir: str, results: dict):
    _atomic(os.path.join(out_dir, "results.json"), lambda p: open(p, "w").write(json.dumps(results, indent=1)))


def memory_policy(args) -> str:
    if args.memory_total is not None:
        return f"fixed total {args.memory_total}"
    return f"growing, {args.memory_per_class} per class" if args.memory_per_class else "none (memory-free)"


def finish_run(args, method: str, data, order: list, device, script_path: str, start_time: float, metrics: dict,
               **extra) -> dict:
    """Write results.json (atomically, only now that every phase is done) and print the summary line."""
    results = {"method": method, **extra, "finished": True, "args": vars(args), "class_order": order,
               "normalization": {"mean": data.mean, "std": data.std}, "backbone": args.backbone,
               "memory_policy": memory_policy(args), **metrics, "wall_s_this_process": time.time() - start_time,
               **environment(device, script_path)}
    write_results(args.out_dir, results)

    def fmt(x):
        return "n/a" if x is None else f"{x:.2f}"
    print(f"average incremental accuracy: CNN {fmt(metrics['avg_inc_acc'])}  NME {fmt(metrics['nme_avg_inc_acc'])}"
          f"   last: CNN {fmt(metrics['last_acc'])}  NME {fmt(metrics['nme_last_acc'])}   forgetting (CNN): "
          f"{fmt(metrics['forgetting'])}")
    print(f"results: {os.path.join(args.out_dir, 'results.json')}")
    return results


PAIRED_METRICS = ("avg_inc_acc", "last_acc", "forgetting", "nme_avg_inc_acc", "nme_last_acc", "nme_forgetting",
                  "wall_s")


def write_paired(root: str, arms: dict, baseline: str, extra_metrics=(), **info) -> dict:
    """paired.json for a paired claim: each arm's metrics and its difference to the baseline arm (same seed,
    data, class order). `arms` maps an arm name to its results dict. Same schema in every script."""
    keys = PAIRED_METRICS + tuple(extra_metrics)
    paired = {**info, "baseline": baseline, "arms": {n: {k: r.get(k) for k in keys} for n, r in arms.items()},
              "difference": {n: {k: r[k] - arms[baseline][k] for k in keys
                                 if r.get(k) is not None and arms[baseline].get(k) is not None}
                             for n, r in arms.items() if n != baseline}}
    _atomic(os.path.join(root, "paired.json"), lambda p: open(p, "w").write(json.dumps(paired, indent=1)))
    print(f"paired (CNN, difference to {baseline}): avg inc / last / forgetting / wall s")
    for name, d in paired["difference"].items():
        print(f"  {name} - {baseline}: " + " / ".join(f"{d[k]:+.2f}" if k in d else "n/a" for k in
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
    }


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """A rate/ETA line for long loops: rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.start = total, label, time.time()
        self.tty = sys.stdout.isatty()

    def update(self, done: int, extra: str = ""):
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        line = f"{self.label} {done}/{self.total} {extra} [{elapsed:.0f}s, eta {eta:.0f}s]"
        print("\r" + line if self.tty else line, end="" if self.tty and done < self.total else "\n", flush=True)
