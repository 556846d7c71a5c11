"""The run folder, its checkpoints and resume (what each file holds: README, "Outputs, resume"). A checkpoint
keeps the one before as `*.prev.pt`, the fallback of a damaged one; it holds only tensors and plain types."""
import json
import os
import shutil
import sys
import time

import torch

from common import dist
from common.device import rng_state, set_rng_state
from common.errors import UserError
from common.flags import print_args
from common.stop import _STOP_SIGNALS, _stopped


def default_out_dir(method: str, args) -> str:
    """results/<method>__<dataset>[_C<classes>_T<train-per-class>_S<image-size>]_B<base>_Inc<inc>__seed<seed>
    (tags of the subset flags set). A new --smoke run (without --resume) replaces its throw-away default folder."""
    subset = "".join(f"_{tag}{getattr(args, key)}" for key, tag in
                     (("classes", "C"), ("train_per_class", "T"), ("image_size", "S")) if getattr(args, key, None))
    path = os.path.join("results", f"{method}__{args.dataset}{subset}_B{args.base_classes}_Inc{args.increment}"
                        f"__seed{args.seed}")
    if args.smoke and not args.resume and os.path.isdir(path) and dist.is_main():
        shutil.rmtree(path)
    return path


MIN_FREE_BYTES = 256 << 20  # a run folder needs room for two checkpoints and a temporary copy
CHECKPOINT, IN_PHASE = "checkpoint.pt", "in_phase.pt"
_RUNS = {}  # out_dir -> what the in-phase checkpoints of the run in that folder need (see Stage)


def run_record(out_dir: str) -> dict:  # what Stage and end_phase share about the run in `out_dir`
    return _RUNS.setdefault(out_dir, {"in_phase": None, "finished": {}, "last_save": time.time(), "steps": 0})


def prepare_out_dir(out_dir: str, resume: bool):
    """Refuse to overwrite a run unless --resume; check that the folder takes files (a probe file, free space);
    return the phase-end checkpoint to continue from, or None. Under torchrun rank 0 checks for every rank."""
    error = None
    if dist.is_main():
        try:
            _check_out_dir(out_dir, resume)
        except UserError as e:
            error = str(e)
    error = dist.broadcast_error(error)
    if error is not None:
        raise UserError(error)
    ckpt = load_state(os.path.join(out_dir, CHECKPOINT)) if resume else None
    _RUNS.pop(out_dir, None)  # a run opened again in this process (an in-process test) starts a new record
    run_record(out_dir)["in_phase"] = load_state(os.path.join(out_dir, IN_PHASE)) if resume else None
    return ckpt


def _check_out_dir(out_dir: str, resume: bool):
    if os.path.exists(os.path.join(out_dir, "results.json")) and not resume:
        raise UserError(f"{out_dir} holds a finished run; pass --resume to reuse it or choose another --out-dir")
    if not resume and any(os.path.exists(os.path.join(out_dir, n)) for n in (CHECKPOINT, IN_PHASE, _prev(CHECKPOINT),
                                                                             _prev(IN_PHASE))):
        raise UserError(f"{out_dir} holds an unfinished run; pass --resume to continue it or choose another "
                        "--out-dir")
    probe = os.path.join(out_dir, ".write_probe")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        free = shutil.disk_usage(out_dir).free
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}") from None
    if free < MIN_FREE_BYTES:
        raise UserError(f"only {free >> 20} MiB free on the disk of --out-dir {out_dir}; checkpoints need at least "
                        f"{MIN_FREE_BYTES >> 20} MiB")


def _prev(path: str) -> str:
    return path[:-len(".pt")] + ".prev.pt"


def load_state(path: str):
    """The newest readable of `path` and its `.prev.pt`, loaded safely (weights_only=True); None if neither
    exists. A damaged file gets one line naming it; when no file is usable, one line says so (UserError)."""
    damaged = []
    for candidate in (c for c in (path, _prev(path)) if os.path.exists(c)):
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, disk error, foreign pickle: all mean "not usable"
            reason = (str(e).strip().splitlines() or [""])[0][:100]
            if dist.is_main():
                print(f"warning: {candidate} is damaged or unreadable ({type(e).__name__}: {reason}); not used",
                      file=sys.stderr)
            damaged.append(candidate)
        else:
            if damaged and dist.is_main():
                print(f"falling back to the previous checkpoint {candidate}", file=sys.stderr)
            return state
    if damaged:
        raise UserError(f"no usable checkpoint: {' and '.join(damaged)} are damaged; move them away to start the "
                        "run again")
    return None


RUN_ONLY_FLAGS = ("resume", "device", "no_graph", "workers", "stop_after", "checkpoint_minutes",
                  "stop_after_steps")  # may change between resumed runs


def check_resume_args(saved: dict, now: dict):
    """A resumed run must use the settings of the checkpoint, except flags that do not change the numbers."""
    diff = sorted(k for k in set(saved) | set(now) if k not in RUN_ONLY_FLAGS and saved.get(k) != now.get(k))
    if diff:
        raise UserError(f"--resume with settings that differ from the checkpoint's ({', '.join(diff)}); use the "
                        "original flags or another --out-dir")


def open_run(args, title: str, shared_base: str = None, arm_keys=()):
    """After bad input had its one-line error: prepare the run folder, print `title` and the settings, and return
    the phase-end state to start from: its own checkpoint (--resume; same settings), else the base phase a pair's
    other arm wrote to `shared_base` (same settings but `arm_keys`), else None. The caller rebuilds its model and
    loads the state, then calls resume_point after any layer it creates (so the random draws stay the same)."""
    ckpt = prepare_out_dir(args.out_dir, args.resume)
    print(f"{title}, out: {args.out_dir}")
    print_args(args)
    if ckpt is None and shared_base is not None and os.path.exists(shared_base):
        ckpt = torch.load(shared_base, map_location="cpu", weights_only=True)
        if ckpt["base_key"] != base_key(args, arm_keys):
            raise UserError(f"{shared_base} was trained with other settings; delete it or choose another --out-dir")
        print(f"base phase shared with the other arm: {shared_base}")
    elif ckpt is not None:
        check_resume_args(ckpt["args"], vars(args))
        print(f"resumed after phase {ckpt['phase']} from {args.out_dir}")
    return ckpt


def resume_point(ckpt) -> tuple:
    """(rows, first phase to run) of a run starting from the phase-end state `ckpt`; ([], 0) without one. It
    restores the checkpoint's RNG state, so call it once the model is rebuilt and loaded."""
    if ckpt is None:
        return [], 0
    set_rng_state(ckpt["rng"])
    return ckpt["rows"], ckpt["phase"] + 1


def base_key(args, arm_keys) -> dict:
    return {k: v for k, v in vars(args).items() if k not in set(arm_keys) | set(RUN_ONLY_FLAGS) | {"out_dir"}}


def end_phase(args, phase: int, rows: list, state: dict, num_phases: int, shared_base: str = None,
              arm_keys=()) -> bool:
    """After each phase: metrics.jsonl, the base phase of a pair for the other arm (`shared_base`, once), the
    checkpoint (`state` with phase, rows, RNG and args; SIGTERM / Ctrl-C stop here), then True if --stop-after."""
    state = {"phase": phase, **state, "rows": rows, "rng": rng_state(), "args": vars(args)}
    _atomic(os.path.join(args.out_dir, "metrics.jsonl"),  # rewritten whole: a resumed run never repeats a line
            lambda p: open(p, "w").write("".join(json.dumps(r) + "\n" for r in rows)))
    if phase == 0 and shared_base is not None and not os.path.exists(shared_base):
        _atomic(shared_base, lambda p: torch.save({**state, "base_key": base_key(args, arm_keys)}, p))
    save_state(os.path.join(args.out_dir, CHECKPOINT), state)
    for name in (IN_PHASE, _prev(IN_PHASE)):  # the phase's in-phase checkpoints are spent
        if dist.is_main() and os.path.exists(os.path.join(args.out_dir, name)):
            os.remove(os.path.join(args.out_dir, name))
    run_record(args.out_dir).update(finished={}, last_save=time.time())
    if _STOP_SIGNALS:
        raise _stopped(f"after phase {phase}, checkpoint {os.path.join(args.out_dir, CHECKPOINT)}")
    if args.stop_after == phase and phase < num_phases - 1:
        print(f"stopped after phase {phase} (--stop-after); continue with the same flags and --resume")
        return True
    return False


def _atomic(path: str, write, keep_prev: bool = False):
    """`write(tmp)`, then rename over `path` (`keep_prev`: the file replaced stays as `.prev.pt`). Under torchrun
    rank 0 writes every file."""
    if not dist.is_main():
        return
    tmp = path + ".tmp"
    write(tmp)
    if keep_prev and os.path.exists(path):
        os.replace(path, _prev(path))
    os.replace(tmp, path)


def save_state(path: str, state: dict):
    """A checkpoint, atomically, the one it replaces kept as `.prev.pt`; a full disk: one line."""
    try:
        _atomic(path, lambda p: torch.save(state, p), keep_prev=True)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise UserError(f"cannot write {path}: {e.strerror or e}; the previous checkpoint is kept") from None
