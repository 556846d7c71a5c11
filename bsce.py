"""BSCE: Balanced Softmax Cross-Entropy for Incremental Learning (with and without memory).

Paper: Quentin Jodelet, Xin Liu, Tsuyoshi Murata, ICANN 2021 (LNCS 12892, DOI 10.1007/978-3-030-86340-1_31),
  arXiv 2103.12532; journal extension "... with and without memory" (arXiv v3-v5, Computer Vision and Image
  Understanding) adds the memory-free setting. The loss is the Balanced Softmax of Ren et al. (NeurIPS 2020).
Official code: none known. The paper's body and tables were not available to us (papers.md 3): the loss is
  implemented exactly (papers.md 3.2), everything else is our design from the principle, listed below.

Protocol of the defaults (papers.md 3.4, following LUCIR's CIFAR-100 protocol): CIFAR-100, 50 base classes then
5 phases of 10, seed-1993 class order, 20 exemplars per class by herding (growing memory), ResNet-32, 160 epochs,
SGD lr 0.1 (/10 at 80 and 120), momentum 0.9, weight decay 5e-4, batch 128; iCaRL/LwF-style host (linear head,
CE + KD on old-class logits, T=2), no rebalancing stage. --dataset imagenet100: ResNet-18, 90 epochs.

Paired claims (papers.md 3.1, 3.5). No paper numbers are available to us, so each row is a pair of our runs (same
host, seed, data, class order, one shared base phase): our CNN average incremental accuracy (base phase
included), A / B and B - A in points; `paired.json` also holds last accuracy, forgetting, NME and the training time.
| claim (CIFAR B50, 5 ph.) | arm A vs arm B        | A / B (B-A) | wall A / B | GPU | date | bsce.py flags           |
|--------------------------|-----------------------|-------------|------------|-----|------|-------------------------|
| BSCE helps the host      | iCaRL: CE vs BSCE     | not run yet |            |     |      | --paired loss           |
| same, 10 phases          | iCaRL: CE vs BSCE     | not run yet |            |     |      | + --increment 5         |
| same, LUCIR-style host   | LUCIR: CE vs BSCE     | not run yet |            |     |      | + --host lucir          |
| same, ImageNet-Subset    | iCaRL: CE vs BSCE     | not run yet |            |     |      | + --dataset imagenet100 |
| lower training cost      | CE+rebalance vs BSCE  | not run yet |            |     |      | --paired rebalance      |
| works without memory     | iCaRL R=0: CE vs BSCE | not run yet |            |     |      | --paired memory-free    |
| same, LUCIR-style host   | LUCIR R=0: CE vs BSCE | not run yet |            |     |      | + --host lucir          |

Usage:
    python bsce.py --data-dir data                        # one run: CIFAR-100 B50, 5 phases, iCaRL host, BSCE
    python bsce.py --paired loss --host lucir             # CE vs BSCE on the LUCIR-style host, into one folder
    python bsce.py --dataset imagenet100 --data-dir /path/to/imagenet --loss ce --rebalance
    python bsce.py --smoke [--memory-per-class 0]         # tiny end-to-end run on generated data, CPU

Deviations and our design choices (the paper's details beyond the loss are unknown to us, papers.md 3.3):
- Loss (papers.md 3.2): CE(z + log n, y) during training, n_j = this phase's training samples of class j (all
  images of a new class, the exemplars of an old class), counted from the actual phase data; plain z at test.
- Distillation stays as the host has it and sees the unadjusted logits (papers.md 3.3, most likely reading).
  iCaRL host: softmax CE + KD on old-class logits, weight 0.25 x T^2 x KL with T=2 (LUCIR official code's iCaRL
  baseline, --T 2 --beta 0.25), linear head, ResNet-32 with its last ReLU. LUCIR host: cosine head, Eq. 6
  less-forget loss with adaptive lambda (code's sqrt(old/new)), Eq. 8 margin ranking, imprinting, old embeddings
  frozen (as lucir.py, re-implemented here so this script stands alone).
- Memory-free variant (--memory-per-class 0), our design: n_j = 0 for old classes, so log n_j = -inf takes them
  out of the training softmax, i.e. BSCE over the current classes only (we add -1e4, whose exp is exactly 0 in
  float32: no NaN); the host's distillation keeps the old classes; plain argmax over all classes at test. Its
  baseline is the same host with plain CE over all seen classes (LwF-like). No NME without exemplars (nme_* are
  null). Run it on both hosts: papers.md 3.3 files the journal version under "KD on image embeddings", i.e. the
  LUCIR host's Eq. 6; and on the linear head nothing in the loss ties the level of the new logits to the old
  ones (CE over the new classes and KD over the old ones are both shift-invariant), the cosine head bounds both.
- --rebalance, our design after LUCIR's CBF (papers.md 1.1): after herding, the classifier weights (and biases;
  not the cosine scale) are finetuned on the class-balanced exemplar set of all seen classes (backbone and BN
  frozen, 20 epochs, lr 0.01 /10 at 10) with the phase's loss; equal counts make BSCE equal CE there.
- The base phase is trained with plain CE in every run and arm, on every dataset: the claims concern the
  incremental phases, and on balanced data (CIFAR) BSCE equals CE exactly; with unequal class counts (ImageNet
  732-1300 images a class, CUB, Food) a BSCE base phase would mix a long-tail effect into B - A. So both arms
  of a pair share one base phase (--paired trains it once and reuses it), as style.md 3.3.9 recommends.
  Incremental phases with equal counts run the plain CE too (identical value, cheaper).
- Fixed total memory (--memory-total): ceil(total / seen) exemplars a class, as LUCIR's and FACIL's code.
- The last partial batch of an epoch wraps around the shuffled order (static shapes for CUDA graphs).
"""
import copy
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.batches import train_batches
from common.data import SHAPES, SMALL_IMAGE_DATASETS, add_data_flags, indices_of, load_protocol, phase_splits
from common.dist import per_rank
from common.evaluation import evaluate, results_from_rows
from common.graph import CapturedStep, graph_used
from common.memory import (check_budget, class_means, exemplars_per_class, extract_features, memory_indices,
                           reduce_memory, select_exemplars)
from common.models import count_parameters, create_backbone, to_channels_last
from common.checkpoints import default_out_dir, end_phase, open_run, resume_point
from common.device import autocast, seed_everything, setup_device
from common.errors import UserError
from common.flags import add_system_flags, new_parser, resolve_defaults
from common.results import finish_run, run_arms, write_paired
from common.stage import Stage, check_finite
from common.stop import run_main

# Per-dataset defaults; a flag given on the command line wins. CIFAR and ImageNet rows: LUCIR's protocol
# (papers.md 1.2, 3.4); the others are not in the paper (ResNet-18, CIFAR or ImageNet schedule).
DATASET_DEFAULTS = {
    "cifar100": dict(data_dir="data", backbone="resnet32", base_classes=50, increment=10, epochs=160,
                     milestones=[80, 120], weight_decay=5e-4, lambda_base=5.0),
    "imagenet100": dict(data_dir="data/imagenet", backbone="resnet18", base_classes=50, increment=10, epochs=90,
                        milestones=[30, 60], weight_decay=1e-4, lambda_base=10.0),
    "imagenet": dict(data_dir="data/imagenet", backbone="resnet18", base_classes=500, increment=100, epochs=90,
                     milestones=[30, 60], weight_decay=1e-4, lambda_base=10.0),
    "tinyimagenet": dict(data_dir="data", backbone="resnet18", base_classes=100, increment=10, epochs=160,
                         milestones=[80, 120], weight_decay=5e-4, lambda_base=5.0),
    "food101": dict(data_dir="data", backbone="resnet18", base_classes=51, increment=10, epochs=90,
                    milestones=[30, 60], weight_decay=1e-4, lambda_base=10.0),
    "cub200": dict(data_dir="data", backbone="resnet18", base_classes=100, increment=10, epochs=90,
                   milestones=[30, 60], weight_decay=1e-4, lambda_base=10.0),
    "synthetic": dict(data_dir="", backbone="resnet32", base_classes=10, increment=5, epochs=6, milestones=[5],
                      weight_decay=5e-4, lambda_base=5.0),
}
DATASET_DEFAULTS["cifar100-synthetic"] = {**DATASET_DEFAULTS["cifar100"], "data_dir": ""}  # speed runs (common/data.py)
SMOKE = dict(dataset="synthetic", image_size=16, batch_size=32, rebalance_epochs=1, rebalance_milestones=[1])
# Settings an arm of a pair may change without changing the base phase (which the arms then share).
ARM_KEYS = ("loss", "rebalance", "rebalance_epochs", "rebalance_lr", "rebalance_milestones", "paired")


def parse_args(argv=None):
    p, g = new_parser(__doc__)
    g.add_argument("--dataset", default="cifar100", help="cifar100 | imagenet100 | imagenet | tinyimagenet | "
                   "food101 | cub200 | synthetic | "
                   "cifar100-synthetic (generated, CIFAR-100's shapes, for timing; "
                   "abstract: CIFAR100, ImageNet-Subset, ImageNet)")
    add_data_flags(g)  # --data-dir, --classes, --train-per-class, --image-size (laptop protocol, README)
    g.add_argument("--backbone", default=None, help="resnet32 (CIFAR) or a timm name (resnet18 for ImageNet); "
                   "papers.md 3.4")
    g.add_argument("--base-classes", type=int, default=None, help="classes of phase 0 (papers.md 3.4: 50 B50)")
    g.add_argument("--increment", type=int, default=None, help="new classes a phase (10 = 5 phases, 5 = 10 "
                   "phases on CIFAR)")
    g.add_argument("--memory-per-class", type=int, default=20, help="exemplars per class, growing memory "
                   "(papers.md 3.4: 20); 0 = the memory-free variant (journal extension)")
    g.add_argument("--memory-total", type=int, default=None, help="fixed total memory instead (e.g. 2000)")
    g.add_argument("--class-order-seed", type=int, default=1993, help="class order seed (papers.md 0.1: 1993)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs a phase (LUCIR protocol: 160 CIFAR, 90 "
                   "ImageNet)")
    g.add_argument("--batch-size", type=int, default=128, help="batch size (LUCIR protocol: 128)")
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate (LUCIR protocol: 0.1)")
    g.add_argument("--milestones", type=int, nargs="+", default=None, help="lr /10 at these epochs (LUCIR "
                   "protocol: 80 120 CIFAR, 30 60 ImageNet)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (LUCIR protocol: 0.9)")
    g.add_argument("--weight-decay", type=float, default=None, help="(LUCIR protocol: 5e-4 CIFAR, 1e-4 ImageNet)")
    g = p.add_argument_group("method")
    g.add_argument("--loss", choices=["ce", "bsce"], default="bsce", help="classification term: plain CE or the "
                   "balanced softmax (papers.md 3.2); nothing else changes")
    g.add_argument("--host", choices=["icarl", "lucir"], default="icarl", help="icarl: linear head, CE + KD on "
                   "old logits; lucir: cosine head, embedding distillation + margin ranking (papers.md 3.6; our "
                   "design)")
    g.add_argument("--kd-weight", type=float, default=0.25, help="icarl host: KD weight beta, loss beta*T^2*KL "
                   "(LUCIR official iCaRL baseline: 0.25)")
    g.add_argument("--kd-temperature", type=float, default=2.0, help="icarl host: KD temperature T (LUCIR "
                   "official iCaRL baseline and LwF: 2)")
    g.add_argument("--lambda-base", type=float, default=None, help="lucir host: less-forget weight (LUCIR "
                   "Sec. 4.1: 5 CIFAR, 10 ImageNet), times sqrt(old/new)")
    g.add_argument("--margin", type=float, default=0.5, help="lucir host: margin of LUCIR Eq. 8 (0.5)")
    g.add_argument("--k-hard", type=int, default=2, help="lucir host: K hardest new classes, LUCIR Eq. 8 (2)")
    g.add_argument("--mr-weight", type=float, default=1.0, help="lucir host: weight of LUCIR Eq. 8 (1)")
    g.add_argument("--no-imprint", action="store_true", help="lucir host: skip weight imprinting (LUCIR code: on)")
    g.add_argument("--rebalance", action="store_true", help="add class-balanced finetuning after each "
                   "incremental phase (our design after LUCIR's CBF), for the cost claim")
    g.add_argument("--rebalance-epochs", type=int, default=20, help="rebalancing epochs (LUCIR CBF: 20)")
    g.add_argument("--rebalance-lr", type=float, default=0.01, help="rebalancing learning rate (LUCIR CBF: 0.01)")
    g.add_argument("--rebalance-milestones", type=int, nargs="+", default=[10], help="rebalancing lr /10 at "
                   "(LUCIR CBF: 10)")
    g.add_argument("--paired", choices=list(PAIRS), default=None, help="run both arms of a claim back to back "
                   "(papers.md 3.5) into --out-dir/<arm>/, write --out-dir/paired.json; sets --loss, --rebalance\n"
                   "(and --memory-per-class 0 for memory-free) per arm")
    add_system_flags(p)
    return resolve_defaults(p.parse_args(argv), DATASET_DEFAULTS, SMOKE)


# ----------------------------------------------------------------------------------------------- method modules
class Classifier(nn.Module):
    """One weight chunk a phase. Linear (icarl host) or cosine, LUCIR Eq. 4: eta * <w/|w|, f/|f|> (lucir host)."""

    def __init__(self, in_features: int, cosine: bool):
        super().__init__()
        self.in_features, self.is_cosine = in_features, cosine
        self.heads, self.biases = nn.ParameterList(), nn.ParameterList()
        self.sigma = nn.Parameter(torch.ones(1), requires_grad=cosine)  # LUCIR official sigma = 1 (cosine only)

    @property
    def num_classes(self) -> int:
        return sum(h.shape[0] for h in self.heads)

    def add_classes(self, n: int):
        bound = 1.0 / self.in_features ** 0.5  # nn.Linear's and LUCIR CosineLinear's uniform(-1/sqrt(in), ..)
        self.heads.append(nn.Parameter(torch.empty(n, self.in_features, device=self.sigma.device).uniform_(
            -bound, bound)))
        if not self.is_cosine:
            self.biases.append(nn.Parameter(torch.empty(n, device=self.sigma.device).uniform_(-bound, bound)))

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        weight = torch.cat(list(self.heads)) if len(self.heads) > 1 else self.heads[0]
        return F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.is_cosine:
            return self.sigma * self.cosine(features)
        return F.linear(features, torch.cat(list(self.heads)), torch.cat(list(self.biases)))


class Net(nn.Module):
    def __init__(self, backbone: nn.Module, cosine: bool):
        super().__init__()
        self.backbone = backbone
        self.classifier = Classifier(backbone.num_features, cosine)

    def forward(self, x):
        features = self.backbone(x).float()
        return self.classifier(features), features


# ----------------------------------------------------------------------------------------------- losses
def balanced_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts: torch.Tensor) -> torch.Tensor:
    """Balanced Softmax (Ren et al. 2020; papers.md 3.2): -log(n_y e^{z_y} / sum_j n_j e^{z_j}) = CE(z + log n, y),
    averaged over the batch. Depends on torch alone. A class with n_j = 0 gets -1e4 instead of log 0 = -inf: its
    exp is exactly 0 in float32, so it leaves the softmax without NaN (memory-free variant, our design)."""
    counts = class_counts.to(logits.device, torch.float32)
    log_prior = torch.where(counts > 0, counts.clamp(min=1).log(), torch.full_like(counts, -1e4))
    return F.cross_entropy(logits.float() + log_prior, targets)


def phase_class_counts(labels: torch.Tensor, train_idx: torch.Tensor, total: int) -> torch.Tensor:
    """n_j over the seen classes 0..total-1, from the phase's actual training indices (new data + memory)."""
    return torch.bincount(labels[train_idx], minlength=total)[:total]


def kd_loss(logits_old_classes: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z*/T) || softmax(z/T)) on the old classes, summed over classes, mean over the batch (LUCIR
    official iCaRL baseline: KLDivLoss * T * T * beta * num_old, the mean over all elements times num_old)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits_old_classes / t, dim=1), F.softmax(old_logits / t, dim=1),
                    reduction="batchmean") * t * t


def less_forget_loss(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """LUCIR Eq. 6: 1 - cos(f*(x), f(x)) on the classifier inputs, averaged over the batch."""
    return (1 - F.cosine_similarity(features, old_features.detach(), dim=1)).mean()


def margin_ranking_loss(cosine: torch.Tensor, targets: torch.Tensor, num_old: int, margin: float,
                        k: int) -> torch.Tensor:
    """LUCIR Eq. 8 on old-class samples (a mask, so no data-dependent shapes): max(m - <gt> + <new_k>, 0) over
    the K highest new-class cosines, averaged over (#old samples x K); 0 without old samples."""
    gt = cosine.gather(1, targets[:, None])
    hardest_new = cosine[:, num_old:].topk(k, dim=1).values
    is_old = (targets < num_old).float()[:, None]
    return (F.relu(margin - gt + hardest_new) * is_old).sum() / (is_old.sum() * k).clamp(min=1)


def adaptive_lambda(lambda_base: float, num_old: int, num_new: int) -> float:
    """LUCIR Eq. 7 in the official code's direction: lambda_base * sqrt(old/new) (papers.md 1.4)."""
    return lambda_base * (num_old / num_new) ** 0.5


@torch.no_grad()
def imprint_weights(model: Net, data, first: int, total: int, device, workers=0):
    """LUCIR official --imprint_weights: new embedding = normalised mean of normalised features, scaled to the
    mean norm of the old embeddings."""
    old_norm = torch.cat(list(model.classifier.heads)[:-1]).norm(dim=1).mean()
    model.eval()
    idx = indices_of(data.train_y, first, total)
    feats = F.normalize(extract_features(model.backbone, data, idx, device, workers=workers), dim=1)
    labels = data.train_y[idx].to(device) - first
    sums = torch.zeros(total - first, feats.shape[1], device=device).index_add_(0, labels, feats)
    model.classifier.heads[-1].copy_(F.normalize(sums, dim=1) * old_norm)


# ----------------------------------------------------------------------------------------------- training
def make_step(model, old_model, optimizer, counts, num_old, lam, args, device, loss_name=None):
    """One training step in plain PyTorch: classification term (`loss_name`, default --loss: CE or BSCE with the
    phase's fixed `counts`) plus the host's distillation on the unadjusted outputs, backward, SGD. No host syncs
    (CapturedStep-safe); returns (loss, correct) as one device tensor."""
    amp = not args.no_amp
    cosine_head = model.classifier.is_cosine
    k_hard = min(args.k_hard, len(counts) - num_old)
    balanced = (loss_name or args.loss) == "bsce" and bool((counts != counts[0]).any())  # equal counts: BSCE == CE

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            features = model.backbone(x).float()
        cosine = model.classifier.cosine(features) if cosine_head else None
        logits = model.classifier.sigma * cosine if cosine_head else model.classifier(features)
        loss = balanced_softmax_loss(logits, y, counts) if balanced else F.cross_entropy(logits, y)  # papers.md 3.2
        if old_model is not None:
            with torch.no_grad(), autocast(device, amp):
                old_features = old_model.backbone(x).float()
            if cosine_head:  # LUCIR Eq. 9 minus its CE: Eq. 6 weighted by Eq. 7, plus Eq. 8
                loss = loss + lam * less_forget_loss(features, old_features)
                loss = loss + args.mr_weight * margin_ranking_loss(cosine, y, num_old, args.margin, k_hard)
            else:  # KD on the unadjusted old-class logits (papers.md 3.3)
                with torch.no_grad():
                    old_logits = old_model.classifier(old_features)
                loss = loss + args.kd_weight * kd_loss(logits[:, :num_old], old_logits, args.kd_temperature)
        loss.backward()
        optimizer.step()
        return torch.stack([loss.detach(), (logits.argmax(1) == y).float().sum()])
    return step


def train_phase(model, old_model, data, train_idx, counts, num_old, lam, args, device, *, epochs, lr, milestones,
                params, freeze_bn=False, label="", loss_name=None):
    """One phase (or the rebalancing stage): SGD with step decay; returns (training images/s, seconds, the last
    epoch's mean loss)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    stage = Stage(args, label, model, optimizer, scheduler, epochs)  # in-phase checkpoints, resume, SIGTERM
    step = make_step(model, old_model, optimizer, counts.to(device), num_old, lam, args, device, loss_name)
    captured = CapturedStep(step, device, enabled=not args.no_graph, optimizer=optimizer)
    for epoch in stage.epochs():
        model.train()
        if freeze_bn:  # rebalancing: BN statistics frozen (LUCIR CBF)
            model.backbone.eval()
        stats = stage.running(torch.zeros(2, device=device))
        for x, y in stage.batches(train_batches(data, train_idx, args.batch_size, device, args.workers)):
            stats += captured(x, y)
        scheduler.step()
        loss_sum, correct = stats.tolist()  # one host sync per epoch
        steps = -(-len(train_idx) // args.batch_size)
        check_finite(loss_sum, f"{label} epoch {epoch + 1}")
        stage.report(epoch, f"loss {loss_sum / steps:.3f} train-acc "
                     f"{100 * correct / (steps * per_rank(args.batch_size)):.1f}")  # torchrun: one rank's count
        stage.state["train_loss"] = loss_sum / steps  # kept in the in-phase checkpoint
    return stage.images_per_s(), stage.train_s, stage.state["train_loss"]


def build_model(args, device) -> Net:
    small = args.dataset in SMALL_IMAGE_DATASETS and args.backbone != "resnet32"
    # lucir host: no last ReLU (LUCIR Sec. 4.1); icarl host: the plain ResNet
    backbone = create_backbone(args.backbone, last_relu=args.host != "lucir", small_input=small)
    return to_channels_last(Net(backbone, cosine=args.host == "lucir"), device)


def bench_step(args, device):
    """The step of the first incremental phase (old model and distillation on, BSCE with old classes at
    --memory-per-class and new ones at 500) on generated inputs of the real shapes, for `python -m common.bench`."""
    num_classes, size = SHAPES[args.dataset]
    first, total = phase_splits(num_classes, args.base_classes, args.increment)[1]
    model = build_model(args, device)
    model.classifier.add_classes(first)
    old_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.classifier.add_classes(total - first)
    if args.host == "lucir":
        model.classifier.heads[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    counts = torch.tensor([args.memory_per_class] * first + [500] * (total - first), device=device)
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, total, (args.batch_size,), device=device)
    model.train()
    lam = adaptive_lambda(args.lambda_base, first, total - first)
    return make_step(model, old_model, optimizer, counts, first, lam, args, device), optimizer, (x, y)


# ----------------------------------------------------------------------------------------------- main
def run(args, shared_base=None):
    """One arm: all phases; returns the results dict (also in results.json), or None after --stop-after.
    `shared_base`: a file holding the base phase of a pair (papers.md 3.5): loaded when it matches this arm's
    settings, written after phase 0 otherwise."""
    t0 = time.time()
    device = setup_device(args)
    memory_free = args.memory_per_class == 0 and args.memory_total is None
    if args.memory_per_class < 0 or (args.memory_total is not None and args.memory_total < 1):
        raise UserError("--memory-per-class must be >= 0 (0: memory-free variant) and --memory-total >= 1")
    if args.rebalance and memory_free:
        raise UserError("--rebalance finetunes on the exemplars; it needs --memory-per-class > 0")
    arm = f"{args.host}_{args.loss}" + ("_rebalance" if args.rebalance else "") + ("_nomem" if memory_free else "")
    args.out_dir = args.out_dir or default_out_dir(f"bsce-{arm}", args)
    data, splits, order = load_protocol(args, device)
    check_budget(data.num_classes, args.memory_per_class, args.memory_total, allow_zero=True)
    seed_everything(args.seed)
    model = build_model(args, device)
    # only now, the run folder: bad input has had its one-line error. Every arm trains its base phase with plain
    # CE: a pair shares one base phase (papers.md 3.5)
    ckpt = open_run(args, f"BSCE ({arm}): {args.dataset}, {len(splits) - 1} phases after B{args.base_classes}",
                    shared_base, ARM_KEYS)
    if ckpt is not None:
        for a, b in splits[:ckpt["phase"] + 1]:
            model.classifier.add_classes(b - a)
        model.load_state_dict(ckpt["model"])
    memory = ckpt["memory"] if ckpt is not None else {}
    rows, start_phase = resume_point(ckpt)  # after the model's layers: restores the RNG state
    print(f"backbone {args.backbone}: {count_parameters(model.backbone):,} parameters")
    print(f"{'phase':>5} {'classes':>7} {'CNN':>6} {'NME':>6} {'time':>7} {'img/s':>7}")

    for phase in range(start_phase, len(splits)):
        phase_start = time.time()
        first, total = splits[phase]
        old_model = copy.deepcopy(model).eval().requires_grad_(False) if phase > 0 else None  # last phase's
        model.classifier.add_classes(total - first)
        if phase > 0:
            if args.host == "lucir":
                if not args.no_imprint:
                    imprint_weights(model, data, first, total, device, args.workers)
                for head in list(model.classifier.heads)[:-1]:  # LUCIR official: old embeddings get lr 0
                    head.requires_grad_(False)
        lam = adaptive_lambda(args.lambda_base, first, total - first) if phase > 0 else 0.0
        train_idx = torch.cat([indices_of(data.train_y, first, total), memory_indices(memory)])
        counts = phase_class_counts(data.train_y, train_idx, total)  # n_j of papers.md 3.2, from the phase's data
        params = [p for p in model.parameters() if p.requires_grad]
        ips, train_s, train_loss = train_phase(
            model, old_model, data, train_idx, counts, first, lam, args, device, epochs=args.epochs, lr=args.lr,
            milestones=args.milestones, params=params, label=f"phase {phase}",
            loss_name=args.loss if phase > 0 else "ce")  # base phase: plain CE in every arm (shared by a pair)

        # Herding on the new classes with the current model; a fixed memory shrinks the old classes.
        model.eval()
        m = exemplars_per_class(total, args.memory_per_class, args.memory_total, rounding="ceil")  # as LUCIR
        means = None
        if not memory_free:
            memory = reduce_memory(memory, m)
            memory.update(select_exemplars(model.backbone, data, range(first, total), m, device, args.workers))
            means = class_means(model.backbone, data, memory, total, device, args.workers)

        rebalance_s = 0.0
        if args.rebalance and phase > 0:  # our design after LUCIR CBF (ft_flag=2): head weights and biases only
            for head in model.classifier.heads:  # (no sigma), on the class-balanced exemplar set, BN frozen
                head.requires_grad_(True)
            model.backbone.requires_grad_(False)
            balanced_idx = memory_indices(memory)
            _, rebalance_s, _ = train_phase(
                model, old_model, data, balanced_idx, phase_class_counts(data.train_y, balanced_idx, total), first,
                lam, args, device, epochs=args.rebalance_epochs, lr=args.rebalance_lr,
                milestones=args.rebalance_milestones, freeze_bn=True, label=f"phase {phase} rebalance",
                params=list(model.classifier.heads.parameters()) + list(model.classifier.biases.parameters()))
            model.backbone.requires_grad_(True)
        model.eval()
        result = evaluate(model, data, splits, phase, device, means, args.workers)
        row = {"phase": phase, "known_classes": first, "total_classes": total, **result,
               "memory_size": sum(len(v) for v in memory.values()), "exemplars_per_class": m,
               "class_counts": counts.tolist(), "count_old_mean": counts[:first].float().mean().item() if first
               else None, "count_new_mean": counts[first:].float().mean().item(), "lambda": lam,
               "train_loss": train_loss, "train_s": train_s, "rebalance_s": rebalance_s,
               "phase_s": time.time() - phase_start,
               "train_img_per_s": ips}
        rows.append(row)
        nme = f"{row['nme_acc']:>6.2f}" if means is not None else f"{'-':>6}"
        print(f"{phase:>5} {total:>7} {row['cnn_acc']:>6.2f} {nme} {row['phase_s']:>6.0f}s {ips:>7.0f}")
        if end_phase(args, phase, rows, {"model": model.state_dict(), "memory": memory}, len(splits), shared_base,
                     ARM_KEYS):
            return None

    return finish_run(args, "bsce", data, order, device, __file__, t0, results_from_rows(rows), arm=arm,
                      host=args.host, loss=args.loss, rebalance=args.rebalance,
                      incremental_train_s=sum(r["train_s"] + r["rebalance_s"] for r in rows[1:]),
                      graph=graph_used(not args.no_graph, device))


# papers.md 3.5: (arm A, arm B) of each claim, as flag overrides; B - A is reported.
PAIRS = {
    "loss": (("ce", dict(loss="ce")), ("bsce", dict(loss="bsce"))),
    "rebalance": (("ce_rebalance", dict(loss="ce", rebalance=True)), ("bsce", dict(loss="bsce", rebalance=False))),
    "memory-free": (("ce_nomem", dict(loss="ce", rebalance=False, memory_per_class=0, memory_total=None)),
                    ("bsce_nomem", dict(loss="bsce", rebalance=False, memory_per_class=0, memory_total=None))),
}


def run_paired(args):
    """Both arms of one claim, same seed, data and class order, sharing the base phase; writes paired.json."""
    # `out` is made by the first arm's prepare_out_dir, after its write probe (an unwritable folder: one line)
    out = args.out_dir or default_out_dir(f"bsce-paired-{args.paired}-{args.host}", args)
    arms = run_arms(args, run, PAIRS[args.paired], out, shared_base=os.path.join(out, "base_phase.pt"))
    return write_paired(out, arms, PAIRS[args.paired][0][0], extra_metrics=("incremental_train_s",),
                        paired=args.paired, host=args.host, dataset=args.dataset, seed=args.seed)


def main(argv=None):
    args = parse_args(argv)
    return run_paired(args) if args.paired else run(args)


if __name__ == "__main__":
    run_main(main)
