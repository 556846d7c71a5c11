"""Run plumbing: one-line errors, system flags, seeding, run folder, checkpoints, results, progress.

A run folder holds `metrics.jsonl` (one line per finished phase), `checkpoint.pt` (rewritten atomically after
each phase, everything needed to continue), `in_phase.pt` (inside a phase, every --checkpoint-minutes at an epoch
boundary and on SIGTERM / Ctrl-C after the current step) and, only once the run has really finished,
`results.json`. Each checkpoint keeps the one before it as `*.prev.pt`: a damaged file gets one line naming it and
--resume falls back to the previous one. Checkpoints hold only tensors and plain types: they load with
`torch.load(weights_only=True)`, which unpickles nothing else.
"""
import argparse
import hashlib
import json
import os
import math
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from common import dist


class UserError(Exception):
    """Bad input: printed as one line (`error: ...`), exit code 2, no traceback."""


class Stopped(BaseException):  # BaseException, like KeyboardInterrupt: no `except Exception` swallows it
    """SIGTERM or Ctrl-C: the current step finished and a checkpoint was written; `code` is the exit status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


_STOP_SIGNALS = []  # signals received; the training loop checks it after every step (Stage.batches)
_STAGES_USED = []  # non-empty once a training loop runs through Stage, i.e. can stop after a step


def _request_stop(signum, frame):
    name = signal.Signals(signum).name
    if _STOP_SIGNALS or not _STAGES_USED:  # a second signal, or no Stage loop: stop at once
        raise Stopped(128 + signum, f"stopped by {name}; the last checkpoint in the run folder is kept; rerun "
                      "with --resume")
    _STOP_SIGNALS.append(signum)
    if dist.is_main():  # torchrun passes the signal to every rank
        print(f"\n{name}: finishing the current step, then writing a checkpoint (send it again "
              "to stop at once)", file=sys.stderr, flush=True)


def run_main(main):
    """Call `main()`; turn a UserError into one line on stderr and exit code 2. SIGTERM and Ctrl-C finish the
    current training step, write a checkpoint, print how to resume and exit 143 / 130. Under torchrun the
    process ends through `dist.exit_now` (no interpreter teardown: see there why)."""
    previous = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        main()
        dist.close(wait=True)
    except UserError as e:
        if dist.is_main():  # under torchrun every rank meets the same error; rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except Stopped as e:
        if dist.is_main():
            print(str(e), file=sys.stderr)
        code = e.code
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint in the run folder is kept; rerun with --resume", file=sys.stderr)
        code = 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STOP_SIGNALS.clear()
        dist.close()
    if dist.launched():
        dist.exit_now(code)
    if code:
        sys.exit(code)


# ----------------------------------------------------------------------------------------------- flags
def new_parser(doc: str):
    """A script's parser (described by the first paragraph of its docstring `doc`) and its protocol group, which
    the script fills with the flags whose defaults are its paper's protocol. Returns (parser, group)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    return p, p.add_argument_group("protocol (None = the --dataset default, printed at start-up)")


def add_system_flags(parser: argparse.ArgumentParser):
    """System flags, identical in every script (no paper source: they change how, not what, is run)."""
    g = parser.add_argument_group("system")
    g.add_argument("--seed", type=int, default=0, help="training seed (init, batches, augmentation); "
                   "the class order has its own --class-order-seed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast (on by default on CUDA and on a "
                   "CPU with native bf16, AVX512-BF16 or AMX; elsewhere a CPU runs fp32: emulated bf16 is slower)")
    g.add_argument("--no-graph", action="store_true", help="run the training step eagerly instead of as a "
                   "captured CUDA graph")
    g.add_argument("--workers", type=int, default=8, help="DataLoader workers (large-image datasets only)")
    g.add_argument("--out-dir", default=None, help="run folder (default: results/<method>__<dataset>_B<base>"
                   "_Inc<inc>__seed<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from the last finished phase in --out-dir")
    g.add_argument("--stop-after", type=int, default=None, metavar="PHASE", help="exit after this phase is "
                   "finished and checkpointed (continue later with --resume)")
    g.add_argument("--checkpoint-minutes", type=float, default=10.0, help="inside a phase, write in_phase.pt at "
                   "the first epoch boundary after this many minutes (0: every epoch); SIGTERM / Ctrl-C write one "
                   "after the current step")
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: as SIGTERM
    g.add_argument("--smoke", action="store_true", help="tiny end-to-end run on generated data, seconds on CPU")
    g.add_argument("--class-list", default=None, help="imagenet100: file with the 100 class folder names, one "
                   "a line (default: LUCIR's rule, 100 folders drawn with seed 1993)")
    return g


def resolve_defaults(args, table: dict, smoke: dict):
    """Fill flags left at None from the per-dataset default table; `--smoke` overrides protocol flags."""
    if args.smoke:  # a bad value given with --smoke is an error too, before the smoke value replaces it
        check_flags(argparse.Namespace(**{k: getattr(args, k, None) for k in smoke if flag_rule(k) != "milestones"}))
        for key, value in smoke.items():
            setattr(args, key, value)
    if args.dataset not in table:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(sorted(table))}")
    for key, value in table[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check_flags(args)
    return args


# Every numeric flag is checked before training, by name (flag names are the same in every script). Rules:
# count >= 1, count0 >= 0, positive > 0, nonneg >= 0, prob in [0, 1], unit in [0, 1), milestones in
# [1, epochs] of the matching *epochs flag. Exact names first, then name endings. None = off / default.
FLAG_RULES = {
    "base_classes": "count", "increment": "count", "memory_total": "count", "k_hard": "count",
    "batch_memory": "count", "cn_groups": "count", "classes": "count", "train_per_class": "count",
    "test_per_class": "count", "image_size": "count", "memory_per_class": "count0", "workers": "count0",
    "seed": "count0", "class_order_seed": "count0", "stop_after": "count0", "stop_after_steps": "count",
    "checkpoint_minutes": "nonneg", "momentum": "unit", "weight_decay": "nonneg", "lambda_base": "nonneg",
    "margin": "nonneg", "r1_gamma": "nonneg", "eta": "positive", "tau": "prob", "beta1": "unit", "beta2": "unit",
    "ada_target": "prob", "ada_max": "prob", "random_compress_step": "prob", "ema_half_life_kimg": "positive",
    "meta_iters_per_class": "positive", "lr_ratio": "positive", "lr_gamma": "positive", "ada_ksteps": "positive",
    "gan_epochs_first": "count", "validation": "unit",
}
FLAG_SUFFIX_RULES = (("epochs", "count"), ("batch_size", "count"), ("_interval", "count"), ("milestones",
                     "milestones"), ("lr", "positive"), ("_weight", "nonneg"), ("_coef", "nonneg"),
                     ("temperature", "positive"), ("fraction", "prob"), ("prob", "prob"), ("_dim", "count"),
                     ("_channels", "count"), ("_width", "count"), ("grad_norm", "positive"))
RULE_TEXT = {"count": "an integer >= 1", "count0": "an integer >= 0", "positive": "a number > 0",
             "nonneg": "a number >= 0", "prob": "a probability in [0, 1]", "unit": "a number in [0, 1)"}


def flag_rule(name: str):
    return FLAG_RULES.get(name) or next((rule for end, rule in FLAG_SUFFIX_RULES if name.endswith(end)), None)


def check_flags(args):
    """One line (UserError, exit 2) naming every numeric flag whose value makes no sense, before any work."""
    problems = []
    for name, value in sorted(vars(args).items()):
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        flag, rule = "--" + name.replace("_", "-"), flag_rule(name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            problems.append(f"{flag} {value} is not a finite number")
        elif rule == "milestones":
            epochs = getattr(args, name[:-len("milestones")] + "epochs", None)
            if epochs is not None and not all(1 <= v <= epochs for v in values):
                problems.append(f"{flag} {' '.join(map(str, values))} must lie in 1..{epochs} (the epochs)")
        elif rule is not None and not all({"count": v >= 1 and v == int(v), "count0": v >= 0 and v == int(v),
                                           "positive": v > 0, "nonneg": v >= 0, "prob": 0 <= v <= 1,
                                           "unit": 0 <= v < 1}[rule] for v in values):
            problems.append(f"{flag} {value} must be {RULE_TEXT[rule]}")
    if problems:
        raise UserError("; ".join(problems))


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
    """Every generator's state as tensors and plain types (so a checkpoint loads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_device(args) -> torch.device:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no GPU is visible; pass --device cpu (or --smoke)")
    device = torch.device(args.device)
    if dist.launched():  # torchrun: one process a GPU (cuda:LOCAL_RANK), or CPU processes with gloo
        device = dist.init(device)
        check_batch_sizes(args)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def check_batch_sizes(args):
    """--batch-size (and every *-batch-size flag) stays the global batch under torchrun: each of the N ranks
    takes 1/N of it, so N must divide it."""
    world = dist.world_size()
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
           if k.endswith("batch_size") and isinstance(v, int) and v % world]
    if bad:
        raise UserError(f"{', '.join(bad)} must be divisible by the {world} processes of torchrun (the batch "
                        "size is the global batch)")


def cpu_has_bf16() -> bool:
    """A CPU with native bf16 (AVX512-BF16 or AMX tiles). Without it bf16 is emulated: about 10x slower than fp32
    for a ResNet-32 step on an AVX2 CPU (README "Speed"), so autocast stays off there."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported",
                                                               "_is_amx_tile_supported"))


def amp_used(device: torch.device, enabled: bool) -> bool:
    """Whether `autocast` runs bf16: asked for (not --no-amp), on CUDA or on a CPU with native bf16."""
    return enabled and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where `amp_used` (BN stays fp32 under autocast). cache_enabled=False so it can be captured."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_used(device, enabled), cache_enabled=False)


# ----------------------------------------------------------------------------------------------- run folder
def default_out_dir(method: str, args) -> str:
    """results/<method>__<dataset>[_C<classes>_T<train-per-class>_S<image-size>]_B<base>_Inc<inc>__seed<seed>
    (subset tags only where those flags are set). A --smoke run's default folder holds only a throw-away run on
    generated data, so a new --smoke run (without --resume) replaces it."""
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


def prepare_out_dir(out_dir: str, resume: bool):
    """Refuse to overwrite a run unless --resume; check that the folder takes files (a probe file, free space)
    before any training; return the phase-end checkpoint to continue from (or None). Under torchrun rank 0
    checks and every rank waits for it (its error ends every rank); then every rank loads the same checkpoint."""
    ckpt_path, in_phase_path = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, IN_PHASE)
    error = None
    if dist.is_main():
        try:
            _check_out_dir(out_dir, resume)
        except UserError as e:
            error = str(e)
    error = dist.broadcast_error(error)
    if error is not None:
        raise UserError(error)
    ckpt = load_state(ckpt_path) if resume else None
    _RUNS[out_dir] = {"in_phase": load_state(in_phase_path) if resume else None, "finished": {},
                      "last_save": time.time(), "steps": 0}
    return ckpt


def _check_out_dir(out_dir: str, resume: bool):
    started = any(os.path.exists(os.path.join(out_dir, n)) for n in (CHECKPOINT, IN_PHASE, _prev(CHECKPOINT),
                                                                      _prev(IN_PHASE)))
    if os.path.exists(os.path.join(out_dir, "results.json")) and not resume:
        raise UserError(f"{out_dir} holds a finished run; pass --resume to reuse it or choose another --out-dir")
    if started and not resume:
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
    for candidate in (path, _prev(path)):
        if not os.path.exists(candidate):
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, disk error, foreign pickle: all mean "not usable"
            reason = (str(e).strip().splitlines() or [""])[0][:100]
            if dist.is_main():
                print(f"warning: {candidate} is damaged or unreadable ({type(e).__name__}: {reason}); not used",
                      file=sys.stderr)
            damaged.append(candidate)
            continue
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


def start_state(ckpt, args, shared_base: str = None, arm_keys=()):
    """The phase-end state a run starts from: its own checkpoint (--resume; the settings must match), else the
    base phase of a pair written by the other arm to `shared_base` (every setting but `arm_keys` must match),
    else None (scripts reach it through open_run). The caller rebuilds its model, loads the state, then calls
    resume_point (after any layer it creates, so the resumed run draws what the uninterrupted one draws)."""
    if ckpt is None and shared_base is not None and os.path.exists(shared_base):
        ckpt = torch.load(shared_base, map_location="cpu", weights_only=True)
        if ckpt["base_key"] != _base_key(args, arm_keys):
            raise UserError(f"{shared_base} was trained with other settings; delete it or choose another --out-dir")
        print(f"base phase shared with the other arm: {shared_base}")
    elif ckpt is not None:
        check_resume_args(ckpt["args"], vars(args))
        print(f"resumed after phase {ckpt['phase']} from {args.out_dir}")
    return ckpt


def open_run(args, title: str, shared_base: str = None, arm_keys=()):
    """The start of every run, once bad input has had its one-line error: prepare the run folder
    (prepare_out_dir), print `title` with the folder and the settings, and return the phase-end state the run
    starts from (start_state), or None."""
    ckpt = prepare_out_dir(args.out_dir, args.resume)
    print(f"{title}, out: {args.out_dir}")
    print_args(args)
    return start_state(ckpt, args, shared_base, arm_keys)


def resume_point(ckpt) -> tuple:
    """(rows, first phase to run) of a run starting from the phase-end state `ckpt`; ([], 0) without one. Call it
    once the model is rebuilt and loaded: it restores the checkpoint's RNG state, so the resumed run draws what the
    uninterrupted one draws."""
    if ckpt is None:
        return [], 0
    set_rng_state(ckpt["rng"])
    return ckpt["rows"], ckpt["phase"] + 1


def _base_key(args, arm_keys) -> dict:
    return {k: v for k, v in vars(args).items() if k not in set(arm_keys) | set(RUN_ONLY_FLAGS) | {"out_dir"}}


def end_phase(args, phase: int, rows: list, state: dict, num_phases: int, shared_base: str = None,
              arm_keys=()) -> bool:
    """After each phase: metrics.jsonl, the base phase of a pair for the other arm (`shared_base`, once), the
    checkpoint (which stops the run here on SIGTERM / Ctrl-C), then --stop-after. The checkpoint holds the
    script's own `state` (model, memory, ...) and the phase, rows, RNG state and args. Returns True when the run
    stops here (it continues with --resume)."""
    state = {"phase": phase, **state, "rows": rows, "rng": rng_state(), "args": vars(args)}
    write_metrics(args.out_dir, rows)
    if phase == 0 and shared_base is not None and not os.path.exists(shared_base):
        _atomic(shared_base, lambda p: torch.save({**state, "base_key": _base_key(args, arm_keys)}, p))
    save_checkpoint(args.out_dir, state)
    if args.stop_after == phase and phase < num_phases - 1:
        print(f"stopped after phase {state['phase']} (--stop-after); continue with the same flags and --resume")
        return True
    return False


def _atomic(path: str, write):
    if not dist.is_main():  # torchrun: rank 0 writes every file
        return
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_state(path: str, state: dict):
    """Write atomically; the file it replaces stays beside it as `.prev.pt`. A full disk: one line. Under
    torchrun only rank 0 writes."""
    if not dist.is_main():
        return
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        if os.path.exists(path):
            os.replace(path, _prev(path))
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}; the previous checkpoint is kept") from None


def save_checkpoint(out_dir: str, state: dict):
    """The phase-end checkpoint; the in-phase ones of that phase are dropped. Stops here on SIGTERM / Ctrl-C."""
    save_state(os.path.join(out_dir, CHECKPOINT), state)
    for name in (IN_PHASE, _prev(IN_PHASE)):
        if dist.is_main() and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    run = _RUNS.setdefault(out_dir, {"in_phase": None, "steps": 0})
    run.update(finished={}, last_save=time.time())
    if _STOP_SIGNALS:
        raise _stopped(f"after phase {state['phase']}, checkpoint {os.path.join(out_dir, CHECKPOINT)}")


def _stopped(where: str) -> Stopped:
    signum = _STOP_SIGNALS[0] if _STOP_SIGNALS else signal.SIGTERM
    _STOP_SIGNALS.clear()  # the request is served (matters only to several runs in one process, e.g. tests)
    argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    argv = [a for i, a in enumerate(argv) if a != "--stop-after-steps" and argv[i - 1:i] != ["--stop-after-steps"]]
    return Stopped(128 + signum, f"stopped by {signal.Signals(signum).name} {where}\ncontinue with: "
                   f"{shlex.join(dist.launcher() + [os.path.basename(sys.argv[0])] + argv)}")


class Stage:
    """The epochs and steps of one training stage (a phase's training, or a finetuning stage after it) with the
    fault handling: an in-phase checkpoint every --checkpoint-minutes at an epoch boundary, and after the current
    step on SIGTERM / Ctrl-C (then `Stopped`). On --resume it continues where that checkpoint was taken, with the
    same numbers as an uninterrupted run: it restores model, optimiser, scheduler, RNG, epoch and step, and
    replays the epoch's data stream up to the step (same shuffle and augmentation draws). `stage.state` holds
    anything else the loop needs back (e.g. the best model so far, the last epoch's loss), tensors and plain
    types only.

        stage = Stage(args, f"phase {phase}", model, optimizer, scheduler, epochs)  # before CapturedStep
        for epoch in stage.epochs():
            stats = stage.running(torch.zeros(2, device=device))
            for x, y in stage.batches(train_batches(data, idx, args.batch_size, device, args.workers)):
                stats += captured(x, y)
            scheduler.step()
            loss_sum, correct = stats.tolist()  # one host sync per epoch
            check_finite(loss_sum, f"phase {phase} epoch {epoch + 1}")
            stage.report(epoch, f"loss {loss_sum / steps:.3f}")  # the progress line, with images/s

    `optimizer` and `scheduler` may each be one object, a list (e.g. a GAN's two optimisers) or None. A stage
    finished before the checkpoint (e.g. the training before a finetuning stage) is restored whole and runs no
    epoch. `stage.seen`, `stage.train_s` and `stage.images_per_s()` count across resumes.
    """

    def __init__(self, args, label: str, model, optimizer, scheduler, epochs: int):
        self.args, self.label, self.model = args, label, model
        self.optimizers, self.schedulers = ([] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
                                            for x in (optimizer, scheduler))
        self.total_epochs, self.epoch, self.step, self.seen, self.train_s = epochs, 0, 0, 0, 0.0
        self.state, self.epoch_rng, self.step_rng, self._since = {}, None, None, time.time()
        self.stats = self._saved_stats = None
        self.progress = Progress(epochs, f"  {label} epoch")
        _STAGES_USED.append(label)
        dist.broadcast_state(model)  # torchrun: every rank starts from rank 0's weights (a resume loads the same)
        self.run = _RUNS.setdefault(args.out_dir, {"in_phase": None, "finished": {}, "last_save": time.time(),
                                                   "steps": 0})
        saved = self.run["in_phase"]
        if saved is None:
            return
        check_resume_args(saved["args"], vars(args))
        if label in saved["finished"]:
            done = saved["finished"][label]
            model.load_state_dict(done["model"])
            set_rng_state(done["rng"])
            self.epoch, self.seen, self.train_s, self.state = epochs, done["seen"], done["train_s"], done["state"]
            self.run["finished"][label] = done
            print(f"  {label}: finished before the checkpoint, restored")
        elif saved["stage"] == label:
            model.load_state_dict(saved["model"])
            for obj, state in zip(self.optimizers + self.schedulers, saved["optimizers"] + saved["schedulers"]):
                obj.load_state_dict(state)
            self.run["finished"] = dict(saved["finished"])
            for key in ("epoch", "step", "seen", "train_s", "state", "epoch_rng", "step_rng"):
                setattr(self, key, saved[key])
            self._saved_stats = saved["stats"] if self.step else None
            set_rng_state(self.epoch_rng)
            self.run["in_phase"] = None
            print(f"  {label}: resumed at epoch {self.epoch + 1} step {self.step + 1} (in-phase checkpoint)")

    def epochs(self):
        minutes = getattr(self.args, "checkpoint_minutes", 10.0)
        while self.epoch < self.total_epochs:
            if self.step == 0:
                self.epoch_rng = rng_state()  # the epoch's data stream starts from here
            self._since = time.time()
            yield self.epoch
            self.train_s += time.time() - self._since
            self.epoch, self.step = self.epoch + 1, 0
            if self.epoch < self.total_epochs and time.time() - self.run["last_save"] >= 60 * minutes:
                self.epoch_rng = rng_state()
                self.save()
        if self.label not in self.run["finished"]:  # kept until the phase-end checkpoint, for later stages
            self.run["finished"][self.label] = {
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}, "rng": rng_state(),
                "seen": self.seen, "train_s": self.train_s, "state": self.state}

    def running(self, stats: torch.Tensor) -> torch.Tensor:
        """The epoch's running sums (e.g. loss and correct count, added to in place): `stats` itself, holding the
        sums at the checkpoint when resumed inside the epoch, so the epoch's printed loss is complete."""
        if self._saved_stats is not None:
            stats.copy_(self._saved_stats)
            self._saved_stats = None
        self.stats = stats
        return stats

    def batches(self, stream):
        """The batches of one epoch; after each step, stop cleanly if asked to."""
        if self.step:  # resumed inside this epoch: replay the stream to the step reached, then its RNG state
            for _ in range(self.step):
                next(stream)
            set_rng_state(self.step_rng)
        vote = dist.StopVote() if dist.active() else None  # torchrun: every rank stops after the same step
        while True:
            try:
                x, y = next(stream)
            except StopIteration:  # torchrun: rank 0's BN statistics everywhere, the ranks' mean epoch sums
                if vote is not None and vote.last():
                    self._stop()
                dist.sync_buffers(self.model)
                dist.average_(self.stats)
                return
            except Exception:  # Ctrl-C also reaches the DataLoader workers, which then exit
                if not _STOP_SIGNALS:
                    raise
                self._stop()
            yield x, y
            self.step, self.seen = self.step + 1, self.seen + len(y)  # torchrun: this process's images
            self.run["steps"] += 1
            limit = getattr(self.args, "stop_after_steps", None)
            if limit is not None and self.run["steps"] >= limit:
                _STOP_SIGNALS.append(signal.SIGTERM)  # the test hook behaves as a real SIGTERM
            if vote is not None:
                if vote(bool(_STOP_SIGNALS)):
                    self._stop()
            elif _STOP_SIGNALS:
                self._stop()

    def images_per_s(self) -> float:
        return self.seen / max(self.train_s + time.time() - self._since, 1e-9)

    def report(self, epoch: int, text: str):
        """The progress line after `epoch`: `text` (losses, accuracy) and the training images/s."""
        self.progress.update(epoch + 1, f"{text} {self.images_per_s():.0f} img/s")

    def _stop(self):
        self.train_s += time.time() - self._since
        self.step_rng = rng_state()
        path = self.save()
        raise _stopped(f"in {self.label}, epoch {self.epoch + 1} after step {self.step}; checkpoint {path}")

    def save(self) -> str:
        path = os.path.join(self.args.out_dir, IN_PHASE)
        save_state(path, {
            "stage": self.label, "epoch": self.epoch, "step": self.step, "seen": self.seen, "train_s": self.train_s,
            "state": self.state, "epoch_rng": self.epoch_rng, "step_rng": self.step_rng,
            "stats": None if self.stats is None else self.stats.detach().cpu(),
            "model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers], "finished": self.run["finished"],
            "args": vars(self.args)})
        self.run["last_save"] = time.time()
        return path


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
    command = None  # how to run it again, when it was started from the command line
    if os.path.basename(sys.argv[0]) == os.path.basename(script_path):
        command = shlex.join(dist.launcher() + [os.path.basename(script_path)] +
                             [a for a in sys.argv[1:] if a != "--resume"])
    results = {"method": method, **extra, "finished": True, "command": command, "args": vars(args),
               "class_order": order,
               "normalization": {"mean": data.mean, "std": data.std}, "backbone": args.backbone,
               "memory_policy": memory_policy(args), **metrics, "wall_s_this_process": time.time() - start_time,
               "bf16_autocast": amp_used(device, not args.no_amp),
               **environment(device, script_path)}
    write_results(args.out_dir, results)

    def fmt(x):
        return "n/a" if x is None else f"{x:.2f}"
    print(f"average incremental accuracy: CNN {fmt(metrics['avg_inc_acc'])}  NME {fmt(metrics['nme_avg_inc_acc'])}"
          f"   last: CNN {fmt(metrics['last_acc'])}  NME {fmt(metrics['nme_last_acc'])}   forgetting (CNN): "
          f"{fmt(metrics['forgetting'])}")
    print(f"results: {os.path.join(args.out_dir, 'results.json')}")
    return results


def run_arms(args, run, arms, root: str, **kwargs):
    """The arms of a paired claim in turn: `arms` is [(name, flag overrides)], each arm runs `run(arm_args,
    **kwargs)` into root/<name>/. Returns {name: results}, or None once an arm stops (--stop-after: the next
    --resume continues there)."""
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
    """paired.json for a paired claim: each arm's metrics and its difference to the baseline arm (same seed,
    data, class order), or, for an arm named in `compare` ({arm: its baseline}, e.g. an ablation ladder's rung
    below it), to that arm. `arms` maps an arm name to its results dict. Same schema in every script. `arms` None
    (run_arms after --stop-after; the next --resume continues): nothing is written, returns None."""
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


# ----------------------------------------------------------------------------------------------- progress
def check_finite(loss: float, where: str, hint: str = "a lower --lr, or --no-amp"):
    """One line (UserError) when an epoch's loss is NaN or infinite: where (`phase 1 epoch 3`) and what to try."""
    if not math.isfinite(loss):
        raise UserError(f"loss is {'NaN' if math.isnan(loss) else loss} in {where}; the last checkpoint in the run "
                        f"folder is kept (try {hint})")


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
