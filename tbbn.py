"""TBBN: Task-Balanced Batch Normalization for exemplar-based class-incremental learning.

Paper: Sungmin Cha, Sungjun Cho, Dasol Hwang, Sunwon Hong, Moontae Lee, Taesup Moon, "Rebalancing Batch
  Normalization for Exemplar-based Class-Incremental Learning", CVPR 2023, pp. 20127-20136 (arXiv 2201.12559 v3;
  v1/v2 titled "Task-Balanced Batch Normalization for Exemplar-based Class-Incremental Learning"). The paper's
  body and tables were not available to us; the layer follows the abstracts and the official code.
Official code: csm9493/TaskBalancedBN @ c4a939c (built on FACIL): src/networks/tbbn.py (the layer; last changed
  by the "debug" commit c3a5dee, which c4a939c did not touch), src/networks/norm_layers.py (CustomSplitBatchNorm,
  ContinualNorm), src/approach/incremental_learning.py (48 + 16 batches, best-validation restore),
  finetuning.py (ER), ssil.py, src/datasets/ (class order, validation split, transforms), src/run_cifar100.sh.

Protocol reproduced by the defaults: CIFAR-100, B0 with 10 tasks of 10 classes, FACIL's seed-0 class order
(np.random.seed(0), shuffle: 26, 86, 2, 55, 75, ...), 10% of each class held out for validation and the
lowest-validation-loss epoch restored at the end of each task, augmentation Pad 4 + RandomResizedCrop 32 + flip,
2000 exemplars in total chosen by herding (ceil(2000 / seen) a class, FACIL), ResNet-32 (FACIL), 160 epochs,
SGD lr 0.1 (/10 at 80 and 120), momentum 0.0, weight decay 1e-4, batches of 48 current samples followed by 16
exemplars, host ER, every BN a TBBN. ImageNet-100: the iCaRL (= seed-1993) order, ResNet-18, 100 epochs.

The claim (abstracts): TBBN in place of BN reduces forgetting and raises the accuracy of exemplar-based hosts
(ER, EEIL, LUCIR, SS-IL); inference is identical to BN. The paper's numbers are unknown to us, so the table holds
paired runs only: same host, seed, data, class order and batch geometry, "bn" = vanilla BN with the same 48 + 16
split (the official "CustomSplitBN" baseline). CNN top-1 %, average incremental accuracy includes task 0,
forgetting as papers.md 0.5; mean +- std over n seeds of each arm and of the paired difference TBBN - BN.
| setting (B0, 10 tasks)  | BN avg / last / forg | TBBN avg / last / forg | TBBN - BN   | n | wall | GPU | date |
|-------------------------|----------------------|------------------------|-------------|---|------|-----|------|
| CIFAR-100, ER           | not run yet          | not run yet            | not run yet |   |      |     |      |
| CIFAR-100, SS-IL        | not run yet          | not run yet            | not run yet |   |      |     |      |
| ImageNet-100, ER        | not run yet          | not run yet            | not run yet |   |      |     |      |
| Tiny-ImageNet, ER (ours) | not run yet         | not run yet            | not run yet |   |      |     |      |
Commands: `python tbbn.py --paired [--host ssil] [--dataset imagenet100] --seed S` (paired.json holds the row).

Usage:
    python tbbn.py --data-dir data --paired              # ER: BN then TBBN, same seed; prints TBBN - BN
    python tbbn.py --host ssil --norm tbbn               # one run, SS-IL host
    python tbbn.py --dataset imagenet100 --data-dir /path/to/imagenet --paired bn tbbn cn
    python tbbn.py --smoke                               # tiny end-to-end run on generated data, CPU

Deviations:
- Validation split: the same rule (round(10%) of each class, np.round) drawn with torch's generator, not
  Python's random.sample, so the held-out images differ. FACIL's loaders also drop the last partial batch of
  the validation and test sets (drop_last=True); we evaluate every image.
- Random-resized crop runs batched on the device (common/batches.py random_resized_crop): torchvision's box
  sampling, bilinear resampling without PIL's antialiasing when a box larger than 32 px is shrunk.
- The ImageNet-100 subset is LUCIR's seed-1993 draw (common/data.py); TBBN's data/imagenet100 folder is
  prepared by the user, its class list is not in the repository.
- tinyimagenet, food101, cub200, imagenet are not in the paper: ResNet-18 (small-input stem for 64 px), B0 with
  10 tasks (food101: 11 + 9 x 10), FACIL's seed-0 shuffle, 2000 exemplars (imagenet: 20000), the CIFAR schedule
  for tinyimagenet and the ImageNet-100 one for the others.
- Partial batches: the official loop skips a batch whose size is not 48 + 16; we fill the last batch of a pass
  by wrapping around the shuffled order (static shapes for CUDA graphs). As officially, an epoch lasts as long
  as the longer stream; the shorter one restarts with a fresh shuffle (official: itertools.cycle, which
  replays the same batches).
- ER and SS-IL heads: one linear layer over all classes sliced to the seen ones; the new classes' rows are
  re-initialised at the start of their task like FACIL's new nn.Linear head.
- Gradient clipping at norm 10000 (FACIL default) is omitted: it practically never binds.
- Only the ER and SS-IL hosts (the official scripts also run EEIL and LUCIR). ER is the default: it has nothing
  else that counters the bias toward the current task, so it isolates the normalisation layer.
- Batch flags: --batch-size is the total (64) and --batch-memory the exemplar part (default batch-size / 4, the
  official --batch-ratio 3); the current part is their difference. Task 0 has no exemplars: every step is
  batch-size current samples (official: the plain loader of batch 64).
- Layer, running statistics: none. src/networks/tbbn.py was last changed by c3a5dee (c4a939c touched only the
  run scripts): for t > 0 an EMA per channel group of the balanced batch statistics (n/(n-1) with
  n = (B_c/r + B_p)*H*W), averaged over the r groups; ours matches it (tests/test_tbbn.py builds the batch by
  hand). Before c3a5dee (9261ac0) the statistics came from the re-assembled output. bf16 autocast of the layer on
  CUDA is untested here.
"""
import copy
import math
import time
from itertools import islice

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.batches import AUGMENTATIONS, eval_batches, train_batches
from common.data import SHAPES, SMALL_IMAGE_DATASETS, add_data_flags, indices_of, load_protocol, phase_splits
from common.dist import per_rank
from common.evaluation import evaluate, results_from_rows
from common.graph import CapturedStep, graph_used
from common.memory import (check_budget, class_means, exemplars_per_class, memory_indices, reduce_memory,
                           select_exemplars)
from common.models import count_parameters, create_backbone, to_channels_last
from common.checkpoints import default_out_dir, end_phase, open_run, resume_point
from common.device import autocast, seed_everything, setup_device
from common.errors import UserError
from common.flags import add_system_flags, new_parser, resolve_defaults
from common.results import finish_run, run_arms, write_paired
from common.stage import Stage, check_finite
from common.stop import run_main

HOSTS, NORMS = ("er", "ssil"), ("bn", "tbbn", "cn")
# Per-dataset defaults; a flag given on the command line wins. Sources: official src/run_cifar100.sh and
# src/run_imagenet100.sh (papers.md 2.2).
# class_order_seed: FACIL shuffles the classes with --seed 0 unless its dataset config hard-codes an order
# (imagenet100: the iCaRL list, which is the seed-1993 order). augmentation: FACIL's Pad(4) + RandomResizedCrop
# + flip for the small-image datasets (dataset_config.py + data_loader.get_transforms).
DATASET_DEFAULTS = {
    "cifar100": dict(data_dir="data", backbone="resnet32", base_classes=10, increment=10, memory_total=2000,
                     epochs=160, milestones=[80, 120], class_order_seed=0, augmentation="resized-crop"),
    "imagenet100": dict(data_dir="data/imagenet", backbone="resnet18", base_classes=10, increment=10,
                        memory_total=2000, epochs=100, milestones=[40, 80], class_order_seed=1993),
    # not in the paper (stated protocol: B0 with 10 tasks, CIFAR schedule for 64 px, ImageNet schedule for the
    # large images, FACIL's seed-0 shuffle, 2000 exemplars; 20000 = 20 a class at the end for ImageNet-1k)
    "tinyimagenet": dict(data_dir="data", backbone="resnet18", base_classes=20, increment=20, memory_total=2000,
                         epochs=160, milestones=[80, 120], class_order_seed=0, augmentation="resized-crop"),
    "food101": dict(data_dir="data", backbone="resnet18", base_classes=11, increment=10, memory_total=2000,
                    epochs=100, milestones=[40, 80], class_order_seed=0),
    "cub200": dict(data_dir="data", backbone="resnet18", base_classes=20, increment=20, memory_total=2000,
                   epochs=100, milestones=[40, 80], class_order_seed=0),
    "imagenet": dict(data_dir="data/imagenet", backbone="resnet18", base_classes=100, increment=100,
                     memory_total=20000, epochs=100, milestones=[40, 80], class_order_seed=0),
    "synthetic": dict(data_dir="", backbone="resnet32", base_classes=5, increment=5, memory_total=40, epochs=6,
                      milestones=[5], class_order_seed=1993, augmentation="resized-crop"),
}
DATASET_DEFAULTS["cifar100-synthetic"] = {**DATASET_DEFAULTS["cifar100"], "data_dir": ""}  # speed runs (common/data.py)
SMOKE = dict(dataset="synthetic", image_size=16, batch_size=32)
PAPER_RESULTS = {}  # the paper's tables were not available to us: no number from the paper (papers.md 2)


def parse_args(argv=None):
    p, g = new_parser(__doc__)
    g.add_argument("--dataset", default="cifar100", help="cifar100 | imagenet100 | tinyimagenet | food101 | "
                   "cub200 | imagenet | synthetic | cifar100-synthetic (generated, CIFAR-100's shapes, for "
                   "timing; official scripts: CIFAR-100, ImageNet-100)")
    add_data_flags(g)  # --data-dir, --classes, --train-per-class, --image-size (laptop protocol, README)
    g.add_argument("--backbone", default=None, help="resnet32 (official CIFAR-100) or a timm name (resnet18 for "
                   "ImageNet-100, official)")
    g.add_argument("--base-classes", type=int, default=None, help="classes of task 0 (official --nc-first-task 10)")
    g.add_argument("--increment", type=int, default=None, help="classes per later task (official: 10, 10 tasks)")
    g.add_argument("--memory-per-class", type=int, default=None, help="growing memory, N exemplars per class "
                   "(used instead of the fixed total unless --memory-total is given too)")
    g.add_argument("--memory-total", type=int, default=None, help="fixed total memory (official --num-exemplars "
                   "2000, herding)")
    g.add_argument("--class-order-seed", type=int, default=None, help="class order seed (official: FACIL's "
                   "seed-0 shuffle on CIFAR-100, np.random.seed(0) + shuffle; the iCaRL = seed-1993 order on "
                   "ImageNet-100)")
    g.add_argument("--validation", type=float, default=0.1, help="fraction of each class's training images "
                   "held out; the task ends with the epoch of lowest validation loss (FACIL: 0.1); 0 = off")
    g.add_argument("--augmentation", choices=list(AUGMENTATIONS), default=None, help="small images: "
                   "resized-crop = Pad 4, RandomResizedCrop, flip (official FACIL CIFAR-100) or crop = padded "
                   "random crop, flip")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs a task (official: 160 CIFAR, 100 ImageNet)")
    g.add_argument("--batch-size", type=int, default=64, help="total batch, current + exemplars (official: 64)")
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate (official: 0.1)")
    g.add_argument("--milestones", type=int, nargs="+", default=None, help="lr /10 at these epochs (official "
                   "--lr-factor 10: 80 120 CIFAR, 40 80 ImageNet)")
    g.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (FACIL default 0.0, not overridden)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="(official: 1e-4)")
    g = p.add_argument_group("method")
    g.add_argument("--host", default="er", help="er (finetuning with exemplars, CE) | ssil (SS-IL); official "
                   "scripts also run eeil, lucir")
    g.add_argument("--norm", default="tbbn", help="bn (vanilla, same 48+16 split: official CustomSplitBN) | tbbn | "
                   "cn (Continual Normalization); --paired sets it per arm")
    g.add_argument("--cn-groups", type=int, default=8, help="CN group count (official --cn-num 8)")
    g.add_argument("--batch-memory", type=int, default=None, help="exemplars at the end of each batch (official "
                   "--batch-ratio 3: batch/4 = 16)")
    g.add_argument("--ssil-kd", default="last", help="SS-IL task-wise KD over: last = the "
                   "latest old task only (official ssil.py, loss_KD[t] overwritten in its loop) | all old tasks "
                   "(SS-IL paper)")
    g.add_argument("--paired", nargs="*", default=None, metavar="NORM", help="run these norms back to back into "
                   "<out-dir>/<norm> (no NORM: bn tbbn) and write paired.json with the differences to bn")
    add_system_flags(p)
    args = p.parse_args(argv)
    growing = args.memory_per_class is not None and args.memory_total is None
    args = resolve_defaults(args, DATASET_DEFAULTS, SMOKE)
    if growing:
        args.memory_total = None
    if args.batch_memory is None:
        args.batch_memory = args.batch_size // 4  # official: B_p = B / (batch_ratio + 1), batch_ratio 3
    if args.augmentation is None:  # large images: the DataLoader's RandomResizedCrop + flip (FACIL's too)
        args.augmentation = "resized-crop"
    if not 0 <= args.validation < 1:
        raise UserError(f"--validation {args.validation} must be a fraction in [0, 1) (official: 0.1; 0 = off)")
    if args.host not in HOSTS:
        raise UserError(f"unknown --host {args.host!r}; choose one of {', '.join(HOSTS)}")
    if args.ssil_kd not in ("last", "all"):
        raise UserError(f"unknown --ssil-kd {args.ssil_kd!r}; choose last or all")
    for norm in [args.norm] + (args.paired or []):
        if norm not in NORMS:
            raise UserError(f"unknown --norm {norm!r}; choose one of {', '.join(NORMS)}")
    if not 1 <= args.batch_memory < args.batch_size:
        raise UserError(f"--batch-memory {args.batch_memory} with --batch-size {args.batch_size} leaves no room for "
                        "both current samples and at least one exemplar; pick 1 <= batch-memory < batch-size "
                        "(official: 16 of 64)")
    return args


# ----------------------------------------------------------------------------------------------- method modules
def split_factor(task: int, n_current: int, n_memory: int, max_split: int) -> int:
    """r* = the largest common divisor of the current and exemplar counts that is <= max_split (official
    calculate_feasible_r; max_split = batch_ratio * t). 1 at task 0 or when either part is empty."""
    if task == 0 or n_current == 0 or n_memory == 0:
        return 1
    g = math.gcd(n_current, n_memory)
    return max(d for d in range(1, min(g, max(max_split, 1)) + 1) if g % d == 0)


class TaskBalancedBatchNorm2d(nn.BatchNorm2d):
    """Drop-in nn.BatchNorm2d (official src/networks/tbbn.py, post-c3a5dee). Depends on torch alone.

    Training at task t > 0 with the batch [B_c current | B_p exemplars]: with r = split_factor(...), the
    current part is reshaped to (B_c/r, C*r, H, W) (group j holds current samples j, j+r, ...), the exemplar
    part is repeated r times along channels, per-channel statistics are taken over the concatenation, the
    result is normalised and scaled by gamma/beta tiled r times; the current rows are reshaped back and each
    exemplar's output is the mean of its r copies. Running statistics: an EMA per channel group (momentum,
    variance unbiased with n = rows*H*W of the balanced batch), then averaged over the r groups. Task 0,
    r = 1 and eval mode are exactly nn.BatchNorm2d. A partial batch (fewer current rows) lowers r to a common
    divisor of its actual part sizes (as the third-party Avalanche port does) instead of failing.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__(num_features, eps, momentum)
        self.task, self.batch_memory, self.max_split = 0, 0, 1

    def set_task(self, task: int, batch_current: int, batch_memory: int) -> int:
        """Official set_number_of_task: r = batch_ratio * t with batch_ratio = B_c / B_p (3 for 48 + 16).
        Returns r* for a full batch (48 + 16: t=1 -> 2, 2 -> 4, 3..5 -> 8, >=6 -> 16)."""
        self.task, self.batch_memory = task, batch_memory
        self.max_split = task * batch_current // batch_memory
        return split_factor(task, batch_current, batch_memory, self.max_split)

    def forward(self, x):
        n_mem = min(self.batch_memory, x.shape[0])
        n_cur = x.shape[0] - n_mem
        r = split_factor(self.task, n_cur, n_mem, self.max_split) if self.training else 1
        if r == 1:  # task 0, eval, or a batch that cannot be split: vanilla BN (official T == 0 branch)
            return super().forward(x)
        c, h, w = x.shape[1:]
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        current = x[:n_cur].reshape(n_cur // r, r * c, h, w)            # reshape: balances the statistics
        memory = x[n_cur:].repeat(1, r, 1, 1)                            # repeat: every group sees all exemplars
        running_mean, running_var = self.running_mean.repeat(r), self.running_var.repeat(r)
        # F.batch_norm updates the per-group running copies in place: EMA with the n/(n-1) unbiased variance,
        # n = (B_c/r + B_p) * H * W, exactly the official post-fix update; then the r groups are averaged.
        z = F.batch_norm(torch.cat([current, memory]), running_mean, running_var, self.weight.repeat(r),
                         self.bias.repeat(r), True, momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(r, c).mean(0))
            self.running_var.copy_(running_var.view(r, c).mean(0))
        out_current = z[:n_cur // r].reshape(n_cur, c, h, w)
        out_memory = z[n_cur // r:].reshape(n_mem, r, c, h, w).mean(1)  # mean of the r normalised copies
        return torch.cat([out_current, out_memory])


class ContinualNorm2d(nn.BatchNorm2d):
    """Continual Normalization (Pham et al., ICLR 2022; official norm_layers.ContinualNorm): group norm with G
    groups and no affine, then BN with its affine parameters and running statistics."""

    def __init__(self, num_features, groups=8, eps=1e-5, momentum=0.1):
        super().__init__(num_features, eps, momentum)
        self.groups = groups

    def forward(self, x):
        return super().forward(F.group_norm(x, self.groups, eps=self.eps))


def swap_norm(module: nn.Module, norm: str, cn_groups: int = 8) -> int:
    """Replace every nn.BatchNorm2d in `module` by the chosen layer (official --norm-layer); returns the count."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if norm == "cn" and child.num_features % cn_groups:
                raise UserError(f"--cn-groups {cn_groups} does not divide a layer's {child.num_features} channels")
            new = {"bn": lambda: child, "tbbn": lambda: TaskBalancedBatchNorm2d(child.num_features, child.eps,
                                                                                child.momentum),
                   "cn": lambda: ContinualNorm2d(child.num_features, cn_groups, child.eps, child.momentum)}[norm]()
            setattr(module, name, new)
            count += 1
        else:
            count += swap_norm(child, norm, cn_groups)
    return count


def set_task(model: nn.Module, task: int, batch_current: int, batch_memory: int) -> int:
    """Tell every TBBN layer the task index and batch split (official set_number_of_task); returns r*."""
    r = 1
    for m in model.modules():
        if isinstance(m, TaskBalancedBatchNorm2d):
            r = m.set_task(task, batch_current, batch_memory)
    return r


class Net(nn.Module):
    """Backbone + one linear head over all classes, sliced to the seen ones (FACIL's concatenated task heads)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def reset_classes(self, first: int, total: int):
        """Fresh init of the new task's rows, as FACIL's new nn.Linear head: U(-1/sqrt(in), 1/sqrt(in))."""
        bound = 1.0 / self.head.in_features ** 0.5
        with torch.no_grad():
            self.head.weight[first:total].uniform_(-bound, bound)
            self.head.bias[first:total].uniform_(-bound, bound)

    def forward(self, x):
        features = self.backbone(x).float()
        return self.head(features), features


# ----------------------------------------------------------------------------------------------- losses
def ssil_loss(logits, old_logits, y, n_current, splits, phase, kd="last", temperature=2.0):
    """SS-IL (Ahn et al., ICCV 2021) as in official src/approach/ssil.py: separated softmax (current samples over
    the current task's classes, exemplars over the old classes; summed CE / batch size) plus task-wise KD at T=2
    (KL, batchmean, * T^2) on the whole batch against the old model, over each old task's classes."""
    first, total = splits[phase]
    ce = (F.cross_entropy(logits[:n_current, first:total], y[:n_current] - first, reduction="sum")
          + F.cross_entropy(logits[n_current:, :first], y[n_current:], reduction="sum")) / len(y)
    kd_tasks = splits[phase - 1:phase] if kd == "last" else splits[:phase]
    distill = sum(F.kl_div(F.log_softmax(logits[:, a:b] / temperature, 1), F.softmax(old_logits[:, a:b] /
                  temperature, 1), reduction="batchmean") * temperature ** 2 for a, b in kd_tasks)
    return ce + distill


# ----------------------------------------------------------------------------------------------- training
def make_step(model, old_model, optimizer, splits, phase, n_current, args, device):
    """One training step in plain PyTorch: forward on [current | exemplars], host loss, backward, SGD. No host
    syncs, so common.graph.CapturedStep can capture it; returns (loss, correct) as one device tensor."""
    amp = not args.no_amp
    total = splits[phase][1]

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            features = model.backbone(x).float()
        logits = model.head(features)[:, :total]
        if args.host == "ssil" and phase > 0:
            with torch.no_grad(), autocast(device, amp):
                old_logits = old_model(x)[0].float()
            loss = ssil_loss(logits, old_logits, y, n_current, splits, phase, args.ssil_kd)
        else:  # ER (official finetuning.py with exemplars) and task 0 of every host: CE over the seen classes
            loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        return torch.stack([loss.detach(), (logits.argmax(1) == y).float().sum()])
    return step


def batch_stream(data, indices, batch_size, device, args, stream):
    """Batches of exactly `batch_size` from `indices`, pass after pass with a fresh shuffle each time; `stream`
    names it, so the current and exemplar streams never share a DataLoader."""
    while True:
        yield from train_batches(data, indices, batch_size, device, args.workers, args.augmentation, stream)


def validation_split(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """FACIL memory_dataset.get_data: round(fraction * n) random training images of every class are held out
    (np.round, as FACIL). Returns the held-out mask. Own generator: the same split on --resume."""
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        held_out[idx[torch.randperm(len(idx), generator=g)[:int(np.round(len(idx) * fraction))]]] = True
    return held_out


@torch.no_grad()
def validation_loss(model, data, val_idx, total, device, workers) -> float:
    """FACIL's validation loss: CE over the seen classes on the task's held-out images, eval mode, no augmentation."""
    model.eval()
    loss = torch.zeros((), device=device)
    for x, y in eval_batches(data, val_idx, device, "train", workers=workers):
        loss += F.cross_entropy(model(x)[0][:, :total].float(), y, reduction="sum")
    return loss.item() / len(val_idx)


def train_phase(model, old_model, data, splits, phase, memory, held_out, args, device):
    """One task: SGD with step decay. Task 0: batches of `batch_size` current samples (official plain loader).
    Later tasks: `batch_size - batch_memory` current samples followed by `batch_memory` exemplars, two
    streams zipped (official incremental_learning.train_epoch with --fix-batch). With a validation split, the
    model of the epoch with the lowest validation loss is restored at the end (FACIL train_loop).
    Returns {training images/s, last epoch's mean loss, best validation loss and its epoch}."""
    first, total = splits[phase]
    all_current = indices_of(data.train_y, first, total)
    current_idx, val_idx = all_current[~held_out[all_current]], all_current[held_out[all_current]]
    memory_idx = memory_indices(memory)
    n_current = args.batch_size - args.batch_memory if phase > 0 else args.batch_size
    steps = -(-len(current_idx) // n_current)
    if phase > 0:  # official: zip(loader, cycle(other)): the epoch lasts as long as the longer stream
        steps = max(steps, -(-len(memory_idx) // args.batch_memory))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)
    stage = Stage(args, f"phase {phase}", model, optimizer, scheduler, args.epochs)  # in-phase checkpoints, SIGTERM
    step = make_step(model, old_model, optimizer, splits, phase, per_rank(n_current), args, device)  # torchrun
    captured = CapturedStep(step, device, enabled=not args.no_graph, optimizer=optimizer)
    best = stage.state.setdefault("best", {"val_loss": math.inf, "best_epoch": None})  # kept in the checkpoint
    for epoch in stage.epochs():
        model.train()
        stats = stage.running(torch.zeros(2, device=device))
        current = batch_stream(data, current_idx, n_current, device, args, "current")
        if phase == 0:
            batches = islice(current, steps)
        else:  # exemplars are cat'ed after the current samples: TBBN relies on this order
            exemplars = batch_stream(data, memory_idx, args.batch_memory, device, args, "memory")
            batches = ((torch.cat([xc, xm]), torch.cat([yc, ym])) for (xc, yc), (xm, ym) in
                       islice(zip(current, exemplars), steps))
        for x, y in stage.batches(batches):
            stats += captured(x, y)
        scheduler.step()
        loss_sum, correct = stats.tolist()  # one host sync per epoch
        check_finite(loss_sum, f"phase {phase} epoch {epoch + 1}")
        accuracy = 100 * correct / (steps * per_rank(args.batch_size))
        val = ""
        if len(val_idx):
            val_loss = validation_loss(model, data, val_idx, total, device, args.workers)
            if val_loss < best["val_loss"]:  # FACIL: keep a copy of the best model so far
                best = stage.state["best"] = {"val_loss": val_loss, "best_epoch": epoch + 1, "state": {
                    k: v.detach().clone() for k, v in model.state_dict().items()}}
            val = f" val-loss {val_loss:.3f}"
        stage.report(epoch, f"loss {loss_sum / steps:.3f} train-acc {accuracy:.1f}{val}")
        stage.state["train_loss"] = loss_sum / steps
    if "state" in best:  # FACIL: the task ends with the lowest-validation-loss model
        model.load_state_dict(best.pop("state"))
    return {"train_img_per_s": stage.images_per_s(), "train_loss": stage.state["train_loss"],
            "val_loss": best["val_loss"] if len(val_idx) else None, "best_epoch": best["best_epoch"]}


def build_model(args, num_classes):
    small = args.dataset in SMALL_IMAGE_DATASETS and args.backbone != "resnet32"
    backbone = create_backbone(args.backbone, small_input=small)  # FACIL ResNet-32 keeps its last ReLU
    if swap_norm(backbone, args.norm, args.cn_groups) == 0:
        raise UserError(f"--backbone {args.backbone} has no nn.BatchNorm2d to replace with --norm {args.norm}")
    return Net(backbone, num_classes)


def bench_step(args, device):
    """The step of task 1 (TBBN split on, SS-IL's old model when --host ssil) on generated inputs of the real
    shapes, for `python -m common.bench`. Returns (step, optimizer, example inputs)."""
    num_classes, size = SHAPES[args.dataset]
    splits = phase_splits(num_classes, args.base_classes, args.increment)
    first, total = splits[1]
    n_current = args.batch_size - args.batch_memory
    model = to_channels_last(build_model(args, num_classes), device)
    old_model = copy.deepcopy(model).eval().requires_grad_(False)
    set_task(model, 1, n_current, args.batch_memory)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.cat([torch.randint(first, total, (n_current,)), torch.randint(0, first, (args.batch_memory,))])
    model.train()
    return make_step(model, old_model, optimizer, splits, 1, n_current, args, device), optimizer, (x, y.to(device))


# ----------------------------------------------------------------------------------------------- main
def run(args, device, t0=None):
    """One host + norm run over all phases (= tasks); returns the results dict (also in results.json), or None
    after --stop-after."""
    t0 = t0 or time.time()
    data, splits, order = load_protocol(args, device)
    check_budget(data.num_classes, args.memory_per_class, args.memory_total)
    held_out = validation_split(data.train_y, args.validation, args.seed)  # FACIL: the same split for all tasks
    seed_everything(args.seed)
    model = to_channels_last(build_model(args, data.num_classes), device)  # checks --cn-groups before any output
    ckpt = open_run(args, f"TBBN: host {args.host}, norm {args.norm}, {args.dataset}, {len(splits)} tasks, batch "
                    f"{args.batch_size - args.batch_memory}+{args.batch_memory}")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    memory = ckpt["memory"] if ckpt is not None else {}
    rows, start_phase = resume_point(ckpt)  # restores the RNG state
    print(f"backbone {args.backbone}: {count_parameters(model.backbone):,} parameters, norm layers: {args.norm}")
    print(f"{'phase':>5} {'classes':>7} {'r':>3} {'CNN':>6} {'NME':>6} {'time':>7} {'img/s':>7}")

    for phase in range(start_phase, len(splits)):
        phase_start = time.time()
        first, total = splits[phase]
        model.reset_classes(first, total)
        # SS-IL distils from the model after the previous task (official: model_old = deepcopy after training)
        old_model = copy.deepcopy(model).eval().requires_grad_(False) if args.host == "ssil" and phase else None
        r = set_task(model, phase, per_rank(args.batch_size - args.batch_memory), per_rank(args.batch_memory)) \
            if args.norm == "tbbn" else 1  # torchrun: each rank's share of the two parts
        trained = train_phase(model, old_model, data, splits, phase, memory, held_out, args, device)

        # Herding on the new classes with the current model; the fixed total shrinks the old classes (FACIL).
        model.eval()
        m = exemplars_per_class(total, args.memory_per_class, args.memory_total, rounding="ceil")  # FACIL: ceil
        memory = reduce_memory(memory, m)
        memory.update(select_exemplars(model.backbone, data, range(first, total), m, device, args.workers,
                                       candidates=~held_out))  # FACIL: exemplars from the training part
        means = class_means(model.backbone, data, memory, total, device, args.workers)
        result = evaluate(model, data, splits, phase, device, means, args.workers)
        row = {"phase": phase, "known_classes": first, "total_classes": total, **result,
               "memory_size": sum(len(v) for v in memory.values()), "exemplars_per_class": m, "tbbn_split": r,
               **trained, "phase_s": time.time() - phase_start}
        rows.append(row)
        print(f"{phase:>5} {total:>7} {r:>3} {row['cnn_acc']:>6.2f} {row['nme_acc']:>6.2f} {row['phase_s']:>6.0f}s "
              f"{trained['train_img_per_s']:>7.0f}")
        if end_phase(args, phase, rows, {"model": model.state_dict(), "memory": memory}, len(splits)):
            return None

    return finish_run(args, "tbbn", data, order, device, __file__, t0, results_from_rows(rows), host=args.host,
                      norm=args.norm, batch={"current": args.batch_size - args.batch_memory,
                                             "memory": args.batch_memory},
                      tbbn_split_per_phase=[r["tbbn_split"] for r in rows],
                      graph=graph_used(not args.no_graph, device))


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    device = setup_device(args)
    if args.paired is None:
        args.out_dir = args.out_dir or default_out_dir(f"tbbn-{args.host}-{args.norm}", args)
        run(args, device, t0)
        return
    # Paired claim (papers.md 2.3): the same host, seed, data, order and batch geometry with each norm in turn.
    norms = args.paired or ["bn", "tbbn"]
    root = args.out_dir or default_out_dir(f"tbbn-{args.host}-paired", args)
    arms = run_arms(args, run, [(norm, {"norm": norm}) for norm in norms], root, device=device)
    # arms None (stopped by --stop-after, continue with --resume): nothing is written
    write_paired(root, arms, "bn" if "bn" in norms else norms[0], host=args.host, dataset=args.dataset,
                 seed=args.seed)


if __name__ == "__main__":
    run_main(main)
