"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing.

Paper: Saihui Hou, Xinyu Pan, Chen Change Loy, Zilei Wang, Dahua Lin, CVPR 2019 (camera-ready and supplement in
  the official repository, gh-pages branch, res/1165.pdf).
Official code: hshustc/CVPR19_Incremental_Learning @ e5a90ae (cifar100-class-incremental/
  class_incremental_cosine_cifar100.py, modified_linear.py, utils_incremental/incremental_train_and_eval_MR_LF.py,
  compute_accuracy.py; imagenet-class-incremental/cbf_class_incremental_cosine_imagenet.py).

Protocol reproduced by the defaults: CIFAR-100, 50 base classes then 5 phases of 10, seed-1993 class order,
20 exemplars per class chosen by herding (growing memory), ResNet-32 with the last ReLU removed and a cosine
classifier, 160 epochs, SGD lr 0.1 (/10 at 80 and 120), momentum 0.9, weight decay 5e-4, batch 128,
lambda_base 5, K=2, m=0.5, weight imprinting on, no class-balanced finetuning. NME class means as the official
CIFAR code computes them: the mean of the normalised features of each exemplar and of its colour-reversed copy
(the code's "flipped" view is `[:,:,:,::-1]` on HWC arrays, i.e. RGB -> BGR; `--nme-view`; the ImageNet code uses
no second view). A fixed total memory (`--memory-total`) gives ceil(total / seen) exemplars a class, as the
official `--fix_budget`.

Average incremental accuracy (top-1 %, base phase included; paper Figs. 5, 6):
| setting                        | paper CNN / NME | ours CNN / NME | wall | GPU | date | flags                     |
|--------------------------------|-----------------|----------------|------|-----|------|---------------------------|
| CIFAR-100 B50, 5 phases        | 63.42 / 63.12   | not run yet    |      |     |      | (none)                    |
| CIFAR-100 B50, 10 phases       | 60.18 / 60.12   | not run yet    |      |     |      | --increment 5             |
| ImageNet-Subset B50, 5 phases  | 70.47 / 68.43   | not run yet    |      |     |      | --dataset imagenet100     |
| ImageNet-Subset B50, 10 phases | 68.09 / 66.16   | not run yet    |      |     |      | ... --increment 5         |
| ImageNet-Full B500, 5 phases   | 64.34 / 61.56   | not run yet    |      |     |      | --dataset imagenet        |
| ImageNet-Full B500, 10 phases  | 61.28 / 59.92   | not run yet    |      |     |      | ... --increment 50        |
| Tiny-ImageNet B100, 10 phases  | (not in paper)  | not run yet    |      |     |      | --dataset tinyimagenet    |

Usage:
    python lucir.py --data-dir data                       # CIFAR-100, B50, 5 phases (the paper's default)
    python lucir.py --dataset imagenet100 --data-dir /path/to/imagenet --increment 5
    python lucir.py --smoke                               # tiny end-to-end run on generated data, CPU

Deviations:
- Eq. 7 direction: lambda = lambda_base * sqrt(|C_old| / |C_new|), the official code's direction; the paper
  prints sqrt(|C_new| / |C_old|). `--lambda-rule paper` gives the printed one.
- Class-balanced finetuning (Sec. 3.5) is on by default only for ImageNet-Full, as in the official run scripts,
  although the paper's "Ours" includes it everywhere (it adds ~0.05 points on CIFAR, Fig. 7).
- Weight imprinting of new classes is code-only (official `--imprint_weights`, on in every run script).
- The last partial batch of an epoch is filled by wrapping around the shuffled order (static shapes for CUDA
  graphs): ceil(n/128) steps an epoch as in the official DataLoader, a few samples seen twice.
- Eq. 8: the paper sums over the K hard negatives; the code (and we) average over (#old samples x K) pairs
  (nn.MarginRankingLoss). We use a mask over old-class samples instead of selecting them (same value, no
  data-dependent shapes); it is 0 when a batch holds no old-class sample, as in the official code.
- CBF: the backbone is frozen (requires_grad off), so no backbone gradient is computed; the official ft_flag=2
  computes them and leaves them unused (same result).
- tinyimagenet, food101, cub200 are not in the paper: ResNet-18 (small-input stem for 64 px) with the CIFAR
  schedule for tinyimagenet and the ImageNet schedule for the others; base phase = about half the classes.
  NME second view: the intended mirror (hflip) on tinyimagenet and on CIFAR-100 subsets (--classes,
  --train-per-class, --image-size), where no paper number depends on the CIFAR code's channel slip (it cost 1.65
  NME points on the laptop run: 12.42 vs 14.07); food101 and cub200 follow the ImageNet code (none).
- Ablation ladder (--paired ablation, paper Fig. 7(a), Table L3 of papers.md): arms as the official run.sh
  builds them. CN = cosine head + imprinting + the code's "mimic score" distillation (--mimic_score:
  MSE between the old-class cosines of the current and the old model, times the old class count; the paper
  names Eq. 5, the KD of iCaRL), old embeddings trained (frozen only with --less_forget); CN + LC = Eq. 6 with
  Eq. 7's lambda, old embeddings frozen; CN + LC + IS = LUCIR (+ Eq. 8). The arms share the base phase.
"""
import argparse
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
from common.memory import (NME_VIEWS, check_budget, class_means, exemplars_per_class, extract_features,
                           memory_indices, reduce_memory, select_exemplars)
from common.models import count_parameters, create_backbone, to_channels_last
from common.checkpoints import default_out_dir, end_phase, open_run, resume_point
from common.device import autocast, seed_everything, setup_device
from common.flags import add_system_flags, new_parser, resolve_defaults
from common.results import finish_run, run_arms, write_paired
from common.stage import Stage, check_finite
from common.stop import run_main

# Per-dataset defaults; a flag given on the command line wins. Sources: paper Sec. 4.1, official run.sh.
DATASET_DEFAULTS = {
    "cifar100": dict(data_dir="data", backbone="resnet32", base_classes=50, increment=10, epochs=160,
                     milestones=[80, 120], weight_decay=5e-4, lambda_base=5.0, cbf=False, nme_view="channels"),
    "imagenet100": dict(data_dir="data/imagenet", backbone="resnet18", base_classes=50, increment=10, epochs=90,
                        milestones=[30, 60], weight_decay=1e-4, lambda_base=10.0, cbf=False, nme_view="none"),
    "imagenet": dict(data_dir="data/imagenet", backbone="resnet18", base_classes=500, increment=100, epochs=90,
                     milestones=[30, 60], weight_decay=1e-4, lambda_base=10.0, cbf=True, nme_view="none"),
    "tinyimagenet": dict(data_dir="data", backbone="resnet18", base_classes=100, increment=10, epochs=160,
                         milestones=[80, 120], weight_decay=5e-4, lambda_base=5.0, cbf=False, nme_view="hflip"),
    "food101": dict(data_dir="data", backbone="resnet18", base_classes=51, increment=10, epochs=90,
                    milestones=[30, 60], weight_decay=1e-4, lambda_base=10.0, cbf=False, nme_view="none"),
    "cub200": dict(data_dir="data", backbone="resnet18", base_classes=100, increment=10, epochs=90,
                   milestones=[30, 60], weight_decay=1e-4, lambda_base=10.0, cbf=False, nme_view="none"),
    "synthetic": dict(data_dir="", backbone="resnet32", base_classes=10, increment=5, epochs=6, milestones=[5],
                      weight_decay=5e-4, lambda_base=5.0, cbf=True, nme_view="hflip"),  # colour-coded classes
}
# Average incremental accuracy, CNN / NME (paper Figs. 5, 6), keyed by (dataset, base classes, increment).
PAPER_RESULTS = {("cifar100", 50, 10): (63.42, 63.12), ("cifar100", 50, 5): (60.18, 60.12),
                 ("imagenet100", 50, 10): (70.47, 68.43), ("imagenet100", 50, 5): (68.09, 66.16),
                 ("imagenet", 500, 100): (64.34, 61.56), ("imagenet", 500, 50): (61.28, 59.92)}
DATASET_DEFAULTS["cifar100-synthetic"] = {**DATASET_DEFAULTS["cifar100"], "data_dir": ""}  # speed runs (common/data.py)
SMOKE = dict(dataset="synthetic", image_size=16, batch_size=32, cbf_epochs=1, cbf_milestones=[1])


def parse_args(argv=None):
    p, g = new_parser(__doc__)
    g.add_argument("--dataset", default="cifar100", help="cifar100 | imagenet100 | imagenet | tinyimagenet | "
                   "food101 | cub200 | synthetic | "
                   "cifar100-synthetic (generated, CIFAR-100's shapes, for timing; "
                   "Sec. 4.1: CIFAR-100, ImageNet-Subset, ImageNet)")
    add_data_flags(g)  # --data-dir, --classes, --train-per-class, --image-size (laptop protocol, README)
    g.add_argument("--backbone", default=None, help="resnet32 (CIFAR, Sec. 4.1) or a timm name (resnet18 for "
                   "ImageNet, Sec. 4.1)")
    g.add_argument("--base-classes", type=int, default=None, help="classes of phase 0 (Sec. 4.1: half: 50, 500)")
    g.add_argument("--increment", type=int, default=None, help="new classes a phase (Sec. 4.1: 10 = 5 phases, "
                   "5 = 10 phases on CIFAR; 100/50 on ImageNet-Full)")
    g.add_argument("--memory-per-class", type=int, default=20, help="exemplars per class, growing memory "
                   "(Sec. 4.1: 20)")
    g.add_argument("--memory-total", type=int, default=None, help="fixed total memory instead (supplement "
                   "Fig. 5: 2000)")
    g.add_argument("--class-order-seed", type=int, default=1993, help="class order seed (official code: 1993)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs a phase (Sec. 4.1: 160 CIFAR, 90 ImageNet)")
    g.add_argument("--batch-size", type=int, default=128, help="batch size (Sec. 4.1: 128)")
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate (Sec. 4.1: 0.1)")
    g.add_argument("--milestones", type=int, nargs="+", default=None, help="lr /10 at these epochs (Sec. 4.1: "
                   "80 120 CIFAR, 30 60 ImageNet)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Sec. 4.1: 0.9)")
    g.add_argument("--weight-decay", type=float, default=None, help="(Sec. 4.1: 5e-4 CIFAR, 1e-4 ImageNet)")
    g = p.add_argument_group("method")
    g.add_argument("--lambda-base", type=float, default=None, help="less-forget weight (Sec. 4.1: 5 CIFAR, 10 "
                   "ImageNet)")
    g.add_argument("--lambda-rule", choices=["code", "paper"], default="code", help="Eq. 7 direction: code "
                   "sqrt(old/new) (official code) or paper sqrt(new/old)")
    g.add_argument("--no-adaptive-lambda", action="store_true", help="use lambda_base unscaled (Fig. 8 ablation)")
    g.add_argument("--margin", type=float, default=0.5, help="margin m of Eq. 8 (Sec. 4.1: 0.5)")
    g.add_argument("--k-hard", type=int, default=2, help="K hardest new classes in Eq. 8 (Sec. 4.1: 2)")
    g.add_argument("--mr-weight", type=float, default=1.0, help="weight of Eq. 8 (official code --lw_mr 1)")
    g.add_argument("--no-less-forget", action="store_true", help="ablation CN (Fig. 7(a)): no Eq. 6; distil the "
                   "old-class cosines by MSE instead and train the old embeddings (official run.sh --mimic_score)")
    g.add_argument("--ms-weight", type=float, default=1.0, help="weight of that MSE, times the old class count "
                   "(official --lw_ms 1; used only with --no-less-forget)")
    g.add_argument("--no-margin-ranking", action="store_true", help="ablation: no Eq. 8 (inter-class separation, "
                   "IS, Fig. 7(a))")
    g.add_argument("--paired", choices=["ablation"], default=None, help="ablation: the ladder of Fig. 7(a), CN, "
                   "CN + LC, CN + LC + IS (= LUCIR), sharing the base phase, into --out-dir/<arm>/;\n"
                   "writes --out-dir/paired.json with each rung minus the one below")
    g.add_argument("--no-imprint", action="store_true", help="skip weight imprinting (official code: on)")
    g.add_argument("--nme-view", choices=NME_VIEWS, default=None, help="second view averaged into the NME class "
                   "means: channels = colour channels reversed (official CIFAR code's \"flipped\" copy), none "
                   "(official ImageNet code: D2 = D), hflip = mirrored image")
    g.add_argument("--cbf", action=argparse.BooleanOptionalAction, default=None, help="class-balanced "
                   "finetuning, Sec. 3.5 (official code: ImageNet-Full only)")
    g.add_argument("--cbf-epochs", type=int, default=20, help="CBF epochs (official code: 20)")
    g.add_argument("--cbf-lr", type=float, default=0.01, help="CBF learning rate (official code: 0.01)")
    g.add_argument("--cbf-milestones", type=int, nargs="+", default=[10], help="CBF lr /10 at (official: 10)")
    add_system_flags(p)
    args = p.parse_args(argv)
    subset_view = args.nme_view is None and any((args.classes, args.train_per_class, args.image_size))
    args = resolve_defaults(args, DATASET_DEFAULTS, SMOKE)
    if subset_view and args.nme_view == "channels":  # no paper number on a subset: the intended mirror view
        args.nme_view = "hflip"
    return args


# ----------------------------------------------------------------------------------------------- method modules
class CosineClassifier(nn.Module):
    """Eq. 4: logits = eta * <normalised weight, normalised feature>, one learnable eta (official `sigma`, init 1).

    The weights are one chunk per phase (official `SplitCosineLinear`: fc1 = old classes, fc2 = new), so the old
    chunks can be frozen while the newest one trains.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.heads = nn.ParameterList()
        self.sigma = nn.Parameter(torch.ones(1))  # official modified_linear.CosineLinear: sigma = 1

    @property
    def num_classes(self) -> int:
        return sum(h.shape[0] for h in self.heads)

    def add_classes(self, n: int):
        w = torch.empty(n, self.in_features, device=self.sigma.device)
        bound = 1.0 / self.in_features ** 0.5  # official reset_parameters: uniform(-1/sqrt(in), 1/sqrt(in))
        self.heads.append(nn.Parameter(w.uniform_(-bound, bound)))

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        weight = torch.cat(list(self.heads)) if len(self.heads) > 1 else self.heads[0]
        return F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(features)


class LUCIRNet(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.classifier = CosineClassifier(backbone.num_features)

    def forward(self, x):
        features = self.backbone(x).float()
        return self.classifier(features), features


# ----------------------------------------------------------------------------------------------- losses
def less_forget_loss(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """Eq. 6: 1 - cos(f*(x), f(x)) on the classifier inputs, averaged over the batch (official:
    nn.CosineEmbeddingLoss against the reference model's features)."""
    return (1 - F.cosine_similarity(features, old_features.detach(), dim=1)).mean()


def margin_ranking_loss(cosine: torch.Tensor, targets: torch.Tensor, num_old: int, margin: float,
                        k: int) -> torch.Tensor:
    """Eq. 8 on old-class samples: sum over the K highest new-class cosines of max(m - <gt> + <new_k>, 0),
    averaged over (#old samples x K) pairs (official: nn.MarginRankingLoss on pre-eta cosines)."""
    gt = cosine.gather(1, targets[:, None])
    hardest_new = cosine[:, num_old:].topk(k, dim=1).values
    is_old = (targets < num_old).float()[:, None]
    return (F.relu(margin - gt + hardest_new) * is_old).sum() / (is_old.sum() * k).clamp(min=1)


def mimic_score_loss(cosine: torch.Tensor, old_cosine: torch.Tensor, num_old: int) -> torch.Tensor:
    """CN's distillation in the official code (--mimic_score, incremental_train_and_eval_MS.py): MSE between the
    current and the old model's pre-eta cosines of the old classes, times the old class count."""
    return F.mse_loss(cosine[:, :num_old], old_cosine.detach()) * num_old


def adaptive_lambda(lambda_base: float, num_old: int, num_new: int, rule: str = "code") -> float:
    """Eq. 7. Official code: lambda_base * sqrt(old/new); the paper prints sqrt(new/old)."""
    return lambda_base * ((num_old / num_new) if rule == "code" else (num_new / num_old)) ** 0.5


@torch.no_grad()
def imprint_weights(model: LUCIRNet, data, first: int, total: int, device, workers=0):
    """Official code (--imprint_weights): each new class's embedding = normalised mean of its normalised features
    (old model, no augmentation), scaled to the mean norm of the old embeddings."""
    old_norm = torch.cat(list(model.classifier.heads)[:-1]).norm(dim=1).mean()
    model.eval()
    idx = indices_of(data.train_y, first, total)
    feats = F.normalize(extract_features(model.backbone, data, idx, device, workers=workers), dim=1)
    labels = data.train_y[idx].to(device) - first
    sums = torch.zeros(total - first, feats.shape[1], device=device).index_add_(0, labels, feats)
    model.classifier.heads[-1].copy_(F.normalize(sums, dim=1) * old_norm)


# ----------------------------------------------------------------------------------------------- training
def make_step(model, old_model, optimizer, num_old, lam, args, device):
    """The training step of Eq. 9 in plain PyTorch: CE (+ Eq. 6 and Eq. 8 after the base phase), backward, SGD.
    No host syncs, so common.graph.CapturedStep can capture it; returns (loss, correct) as a device tensor."""
    amp = not args.no_amp
    k_hard = min(args.k_hard, model.classifier.num_classes - num_old)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            features = model.backbone(x).float()
        cosine = model.classifier.cosine(features)
        logits = model.classifier.sigma * cosine
        loss = F.cross_entropy(logits, y)                                     # Eq. 9, first term
        if old_model is not None:
            with torch.no_grad(), autocast(device, amp):
                old_features = old_model.backbone(x).float()
            if args.no_less_forget:  # ablation CN: the official code's score mimicking
                old_cosine = old_model.classifier.cosine(old_features)
                loss = loss + args.ms_weight * mimic_score_loss(cosine, old_cosine, num_old)
            else:
                loss = loss + lam * less_forget_loss(features, old_features)  # Eq. 6 weighted by Eq. 7
            if not args.no_margin_ranking:
                loss = loss + args.mr_weight * margin_ranking_loss(cosine, y, num_old, args.margin, k_hard)  # Eq. 8
        loss.backward()
        optimizer.step()
        return torch.stack([loss.detach(), (logits.argmax(1) == y).float().sum()])
    return step


def train_phase(model, old_model, data, train_idx, num_old, lam, args, device, *, epochs, lr, milestones, params,
                freeze_bn=False, label=""):
    """One phase (or the CBF stage): SGD with step decay on the loss of Eq. 9; returns (training images/s, the
    last epoch's mean loss)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    stage = Stage(args, label, model, optimizer, scheduler, epochs)  # in-phase checkpoints, resume, SIGTERM
    step = make_step(model, old_model, optimizer, num_old, lam, args, device)
    captured = CapturedStep(step, device, enabled=not args.no_graph, optimizer=optimizer)
    for epoch in stage.epochs():
        model.train()
        if freeze_bn:  # CBF: BN statistics frozen (official cbf_..._imagenet.py)
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
    return stage.images_per_s(), stage.state["train_loss"]


def class_balanced_finetuning(model, old_model, data, memory, num_old, lam, args, device, phase):
    """CBF, Sec. 3.5 (official cbf_*.py, ft_flag=2): after herding, on the exemplars of all seen classes, the
    old and new embeddings train with the phase's loss; backbone (no gradients at all), sigma and BN stay fixed."""
    for head in model.classifier.heads:
        head.requires_grad_(True)
    model.backbone.requires_grad_(False)
    try:
        train_phase(model, old_model, data, memory_indices(memory), num_old, lam, args, device,
                    epochs=args.cbf_epochs, lr=args.cbf_lr, milestones=args.cbf_milestones,
                    params=list(model.classifier.heads.parameters()), freeze_bn=True, label=f"phase {phase} CBF")
    finally:
        model.backbone.requires_grad_(True)


def bench_step(args, device):
    """The step of the first incremental phase (old model, LF and MR on) on generated inputs of the real shapes,
    for `python -m common.bench`. Returns (step, optimizer, example inputs)."""
    num_classes, size = SHAPES[args.dataset]
    first, total = phase_splits(num_classes, args.base_classes, args.increment)[1]
    small = args.dataset in SMALL_IMAGE_DATASETS and args.backbone != "resnet32"
    model = to_channels_last(LUCIRNet(create_backbone(args.backbone, last_relu=False, small_input=small)), device)
    model.classifier.add_classes(first)
    old_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.classifier.add_classes(total - first)
    model.classifier.heads[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, total, (args.batch_size,), device=device)
    model.train()
    return make_step(model, old_model, optimizer, first, adaptive_lambda(args.lambda_base, first, total - first),
                     args, device), optimizer, (x, y)


# ----------------------------------------------------------------------------------------------- main
def run(args, shared_base=None):
    """One run (or one arm of the ablation ladder): all phases; returns the results dict (also in results.json), or
    None after --stop-after. `shared_base`: the ladder's base-phase file, loaded when it matches this arm's
    settings, written after phase 0 otherwise."""
    t0 = time.time()
    device = setup_device(args)
    args.out_dir = args.out_dir or default_out_dir("lucir", args)
    data, splits, order = load_protocol(args, device)
    check_budget(data.num_classes, args.memory_per_class, args.memory_total)
    seed_everything(args.seed)
    small = args.dataset in SMALL_IMAGE_DATASETS and args.backbone != "resnet32"
    model = LUCIRNet(create_backbone(args.backbone, last_relu=False, small_input=small))  # Sec. 4.1: no last ReLU
    model = to_channels_last(model, device)
    # only now, the run folder: bad input has had its one-line error
    ckpt = open_run(args, f"LUCIR{ARM_NAMES.get(arm_of(args), '')}: {args.dataset}, {len(splits) - 1} phases after "
                    f"B{args.base_classes}", shared_base, ARM_KEYS)
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
        old_model = None
        if phase > 0:  # f*: the frozen model after the last phase (Eq. 6)
            old_model = copy.deepcopy(model).eval().requires_grad_(False)
        model.classifier.add_classes(total - first)
        if phase > 0:
            if not args.no_imprint:
                imprint_weights(model, data, first, total, device, args.workers)
            for head in list(model.classifier.heads)[:-1]:  # official: old embeddings (fc1) get lr 0, but only
                head.requires_grad_(args.no_less_forget)    # with --less_forget (CN trains them)
        lam = 0.0
        if phase > 0 and not args.no_less_forget:
            lam = args.lambda_base if args.no_adaptive_lambda else \
                adaptive_lambda(args.lambda_base, first, total - first, args.lambda_rule)
        train_idx = torch.cat([indices_of(data.train_y, first, total), memory_indices(memory)])
        params = [p for p in model.parameters() if p.requires_grad]
        ips, train_loss = train_phase(model, old_model, data, train_idx, first, lam, args, device,
                                      epochs=args.epochs, lr=args.lr, milestones=args.milestones, params=params,
                                      label=f"phase {phase}")

        # Herding on the new classes with the current model; fixed memory shrinks the old classes (Sec. 4.1).
        model.eval()
        m = exemplars_per_class(total, args.memory_per_class, args.memory_total, rounding="ceil")  # official
        memory = reduce_memory(memory, m)
        memory.update(select_exemplars(model.backbone, data, range(first, total), m, device, args.workers))
        means = class_means(model.backbone, data, memory, total, device, args.workers, view=args.nme_view)
        if args.cbf and phase > 0:
            class_balanced_finetuning(model, old_model, data, memory, first, lam, args, device, phase)
        model.eval()
        result = evaluate(model, data, splits, phase, device, means, args.workers)
        row = {"phase": phase, "known_classes": first, "total_classes": total, **result,
               "memory_size": sum(len(v) for v in memory.values()), "exemplars_per_class": m,
               "lambda": lam, "sigma": model.classifier.sigma.item(), "train_loss": train_loss,
               "phase_s": time.time() - phase_start,
               "train_img_per_s": ips}
        rows.append(row)
        print(f"{phase:>5} {total:>7} {row['cnn_acc']:>6.2f} {row['nme_acc']:>6.2f} {row['phase_s']:>6.0f}s "
              f"{ips:>7.0f}")
        if end_phase(args, phase, rows, {"model": model.state_dict(), "memory": memory}, len(splits), shared_base,
                     ARM_KEYS):
            return None

    return finish_run(args, "lucir", data, order, device, __file__, t0, results_from_rows(rows), arm=arm_of(args),
                      graph=graph_used(not args.no_graph, device))


# The ablation ladder of Fig. 7(a) as the official run.sh builds it (header): arm name -> flag overrides.
LADDER = (("cn", dict(no_less_forget=True, no_margin_ranking=True)),
          ("cn_lc", dict(no_less_forget=False, no_margin_ranking=True)),
          ("cn_lc_is", dict(no_less_forget=False, no_margin_ranking=False)))
ARM_KEYS = ("no_less_forget", "no_margin_ranking", "ms_weight", "paired")  # what the arms may differ in
ARM_NAMES = {"cn": " (ablation CN)", "cn_lc": " (ablation CN + LC)"}


def arm_of(args) -> str:
    return "cn" + ("" if args.no_less_forget else "_lc") + ("" if args.no_margin_ranking else "_is")


def run_paired(args):
    """The ladder's arms in turn (same seed, data, class order and base phase); paired.json holds each rung minus
    the one below it (LC: cn_lc - cn, IS: cn_lc_is - cn_lc)."""
    out = args.out_dir or default_out_dir("lucir-paired-ablation", args)
    arms = run_arms(args, run, LADDER, out, shared_base=os.path.join(out, "base_phase.pt"))
    names = [name for name, _ in LADDER]
    return write_paired(out, arms, names[0], compare=dict(zip(names[1:], names)), paired=args.paired,
                        dataset=args.dataset, seed=args.seed)


def main(argv=None):
    args = parse_args(argv)
    return run_paired(args) if args.paired else run(args)


if __name__ == "__main__":
    run_main(main)
