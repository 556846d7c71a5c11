"""Flags: a script's parser, the system flags every script shares, per-dataset defaults and the rules every
numeric flag is checked against before any work."""
import argparse
import math

import torch

from common.errors import UserError


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
                   "CPU where measured faster: AMX, or AVX512-BF16 on AMD; elsewhere a CPU runs fp32; README Speed)")
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


# Every numeric flag is checked before training by its name (the same in every script): exact names first, then
# name endings; milestones lie in [1, epochs] of the matching *epochs flag. None = off / default.
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
