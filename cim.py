"""CIM: Class-Incremental Exemplar Compression for Class-Incremental Learning, on a FOSTER host.

Paper: Zilin Luo, Yaoyao Liu, Bernt Schiele, Qianru Sun, CVPR 2023 (equations and tables from the authors' poster,
  materials/poster.pdf in the official repository; papers.md 4).
Official code: xfflzl/CIM-CIL @ ae113e9 (models/foster.py, models/base.py::_gen_bbx / _construct_exemplar /
  _reduce_exemplar, convs/resnet.py, utils/transform.py, cim-*.json); built on FOSTER (Wang et al., ECCV 2022), PyCIL.
Protocol (defaults, cim-food101.json): Food-101 from scratch, 11 classes then 9 phases of 10, seed-1993 order, fixed
memory 2020 (floor(2020 / seen) full images a class), ResNet-18 at 224 px, RandomResizedCrop + flip + ColorJitter +
AutoAugment; epochs: base 200, FOSTER boosting 170, compression 130; SGD lr 0.1 cosine, momentum 0.9, weight decay
5e-4, batch 256; beta1 0.95, beta2 0.97, T = 2; CIM: eta 4, tau 0.6, CAMs every 40 epochs, bilevel mask model.

Average incremental accuracy (top-1 %, CNN, base phase included); paper: poster tables, FOSTER / FOSTER w/ CIM; ours:
`python cim.py --paired <flags>` (both arms: same seed, data, class order; the kept model; one arm: [--no-cim];
`--smoke`: generated data, CPU). C1a, learning from scratch (LFS: N equal tasks, papers.md 4.2):
| setting            | paper FOSTER / CIM | ours FOSTER / CIM | wall | GPU | date | flags (after --paired) |
|--------------------|--------------------|-------------------|------|-----|------|------------------------|
| Food-101 N=5       | 75.03 / 76.44      | not run yet | | | | --base-classes 21 --increment 20 |
| Food-101 N=10      | 72.72 / 74.85      | not run yet | | | | (none)                         |
| Food-101 N=20      | 66.73 / 70.20      | not run yet | | | | --base-classes 6 --increment 5 |
| ImageNet-100 N=5   | 79.93 / 80.58      | not run yet | | | | --dataset imagenet100 --base-classes 20 --increment 20 |
| ImageNet-100 N=10  | 76.55 / 77.94      | not run yet | | | | --dataset imagenet100          |
| ImageNet-100 N=20  | 74.49 / 75.23      | not run yet | | | | --dataset imagenet100 --base-classes 5 --increment 5 |
| Tiny-ImageNet N=10 | (not in paper)     | not run yet | | | | --dataset tinyimagenet         |
C1b, learning from half (LFH: B50 then N phases; the exact Food-101 base split is unverified, papers.md 4.2):
| Food-101 N=5       | 79.08 / 79.76      | not run yet | | | | --base-classes 51 --increment 10 |
| Food-101 N=10      | 75.07 / 76.86      | not run yet | | | | --base-classes 51 --increment 5 |
| Food-101 N=25      | 68.08 / 70.50      | not run yet | | | | --base-classes 51 --increment 2 |
| ImageNet-100 N=5   | 80.07 / 80.93      | not run yet | | | | --dataset imagenet100 --base-classes 50 --increment 10 |
| ImageNet-100 N=10  | 77.54 / 78.66      | not run yet | | | | --dataset imagenet100 --base-classes 50 --increment 5 |
| ImageNet-100 N=25  | 72.40 / 75.74      | not run yet | | | | --dataset imagenet100 --base-classes 50 --increment 2 |
C2, ImageNet-1000 from scratch, average / last (flags after --paired --dataset imagenet):
| M=20k N=5  | 69.21/64.88 / 69.93/66.05 | not run yet | | | | --base-classes 200 --increment 200 |
| M=20k N=10 | 68.34/60.14 / 69.53/62.07 | not run yet | | | | (none)                         |
| M=5k N=5   | 57.19/49.42 / 61.37/54.46 | not run yet | | | | --base-classes 200 --increment 200 --memory-total 5000 |
| M=5k N=10  | 54.72/44.96 / 59.48/50.83 | not run yet | | | | --memory-total 5000            |
Exemplars per class (poster, object-size table): 34.8 to 39.4 with CIM against 20; ours: metrics.jsonl `exemplars_*`.

Deviations:
- Scored model (verified): the teacher, as officially (trainer.py scores model.eval_task() on self._network,
  models/base.py, which models/foster.py incremental_train replaces by the student _snet only at the next task; the
  student is only logged: "darknet eval", _feature_compression). We log it too (`student_*`: accuracies, CNN, NME).
- Classifier: CIM-CIL convs/linears.py SimpleLinear, no bias (PyCIL's: zero-init); update_fc / copy_fc copy weights.
- AutoAugment is torchvision's ImageNet policy (the official repo has its own utils/autoaugment.py ImageNetPolicy).
- Effective-number class weights count a new class's true images (PyCIL `getlen` sums their positions, papers.md
  4.5; negligible for beta >= 0.95); old classes count floor(M / known) as in the code.
- Large images as officially (utils/data_manager.py, models/base.py _gen_bbx): box from the CAM of the whole image's
  Resize((S, S)) view, upsampled to the stored original, which is compressed (BbxBlur; PIL nearest = "nearest-exact";
  cost on its pixels) before the training crop and herding's / NME's eval view; new-class images drawn once an epoch
  (official: each load). Small images (no official path): the same at 32 / 64 px, then only padded crop + flip.
- The rational activation (P degree 5, safe Q = 1 + sum_j |b_j| |x|^j of degree 4, `rational-activations`
  version A) is written here; its ReLU-initial coefficients are our least-squares fit on [-3, 3] (error <= 0.03).
- Meta batches cycle through the phase data (the official iterator stops); an epoch's last partial batch wraps
  (static shapes). `--paired` shares no base phase: CIM differs (rationals train, random compression from epoch 40).
"""
import copy
import itertools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from common.batches import eval_batches, train_batches
from common import dist
from common.data import SHAPES, SMALL_IMAGE_DATASETS, add_data_flags, indices_of, load_protocol, phase_splits
from common.evaluation import evaluate, results_from_rows
from common.graph import CapturedStep
from common.memory import check_budget, exemplars_per_class, herding
from common.models import count_parameters, create_backbone, to_channels_last
from common.checkpoints import default_out_dir, end_phase, open_run, resume_point
from common.device import autocast, seed_everything, setup_device
from common.errors import UserError
from common.flags import add_system_flags, new_parser, resolve_defaults
from common.results import finish_run, run_arms, write_paired
from common.stage import Stage, check_finite
from common.stop import run_main

R18 = dict(backbone="resnet18")  # official convnet_type
DATASET_DEFAULTS = {  # cim-*.json (tinyimagenet, synthetic: ours); a flag given on the command line wins
    "food101": dict(R18, data_dir="data", base_classes=11, increment=10, memory_total=2020, beta1=0.95),
    "imagenet100": dict(R18, data_dir="data/imagenet", base_classes=10, increment=10, memory_total=2000, beta1=0.97),
    "imagenet": dict(R18, data_dir="data/imagenet", base_classes=100, increment=100, memory_total=20000, beta1=0.97),
    "tinyimagenet": dict(R18, data_dir="data", base_classes=20, increment=20, memory_total=4000, beta1=0.97),
    "synthetic": dict(data_dir="", backbone="resnet32", base_classes=10, increment=5, memory_total=100, beta1=0.95),
}
SMOKE = dict(dataset="synthetic", image_size=16, train_per_class=12, batch_size=8, lr=0.02, epochs=2, boost_epochs=2,
             compress_epochs=2, cam_interval=1, meta_batch_size=4, meta_iters_per_class=0.2)
RELU_NUMERATOR = (0.02997, 0.61699, 2.37296, 3.05863, 1.51874, 0.25143)  # a_0..a_5 and b_1..b_4 of a ReLU-like
RELU_DENOMINATOR = (1.19073, 4.39714, 0.9076, 0.34694)  # rational (ours: least squares on [-3, 3], max |error| 0.030)


def parse_args(argv=None):
    p, g = new_parser(__doc__)
    g.add_argument("--dataset", default="food101", help="food101 | imagenet100 | imagenet | tinyimagenet | "
                   "synthetic (official configs: Food-101, ImageNet-100, ImageNet-1000)")
    add_data_flags(g)  # --data-dir, --classes, --train-per-class, --image-size (laptop protocol, README)
    g.add_argument("--backbone", default=None, help="timm name (official: resnet18; small-input stem for 64 px)")
    g.add_argument("--base-classes", type=int, default=None, help="phase-0 classes (official init_cls 11, 10, 100)")
    g.add_argument("--increment", type=int, default=None, help="new classes a phase (official: 10, 10, 100)")
    g.add_argument("--memory-total", type=int, default=None, help="fixed total memory in full images, budget "
                   "floor(M / seen) a class (official memory_size: 2020, 2000, 20000; the paper also 5000)")
    g.add_argument("--memory-per-class", type=int, default=20, help="unused (fixed memory; official: 20)")
    g.add_argument("--class-order-seed", type=int, default=1993, help="class order seed (official: 1993)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=200, help="base-phase epochs (official init_epochs 200)")
    g.add_argument("--boost-epochs", type=int, default=170, help="FOSTER boosting epochs (official incre_epochs)")
    g.add_argument("--compress-epochs", type=int, default=130, help="FOSTER compression epochs (official: 130)")
    g.add_argument("--batch-size", type=int, default=256, help="batch size (official: 256)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, cosine (official theta_lr 0.1)")
    g.add_argument("--milestones", type=int, nargs="+", default=None, help="lr /10 at these epochs (official: cosine)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (official: 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="(official: 5e-4; compression uses none)")
    g.add_argument("--no-autoaugment", action="store_true", help="drop ColorJitter + AutoAugment (official: on)")
    g = p.add_argument_group("FOSTER host")
    g.add_argument("--beta1", type=float, default=None, help="beta, boosting (official 0.95 Food-101, 0.97 ImageNet)")
    g.add_argument("--beta2", type=float, default=0.97, help="effective-number beta, compression (official 0.97)")
    g.add_argument("--kd-temperature", type=float, default=2.0, help="KD temperature T (official: 2)")
    g = p.add_argument_group("CIM")
    g.add_argument("--no-cim", action="store_true", help="FOSTER alone (the paired baseline)")
    g.add_argument("--eta", type=float, default=4.0, help="1/eta the pixels outside the box (official: 4)")
    g.add_argument("--tau", type=float, default=0.6, help="CAM threshold of the box (official mask_threshold)")
    g.add_argument("--cam-interval", type=int, default=40, help="new CAMs and boxes every N epochs (official: 40)")
    g.add_argument("--random-compress-step", type=float, default=0.1, help="new images compressed with prob. "
                   "step * floor(epoch / interval) (official randombbxblur_prob_incre)")
    g.add_argument("--meta-batch-size", type=int, default=16, help="mask-level batch (official meta_batch_size)")
    g.add_argument("--meta-iters-per-class", type=float, default=0.5, help="meta steps/epoch per new class (official)")
    g.add_argument("--meta-lr", type=float, default=0.01, help="Adam lr of the rationals, cosine (official: 0.01)")
    g.add_argument("--lr-ratio", type=float, default=0.1, help="virtual step = current lr x ratio (official: 0.1)")
    g.add_argument("--reg-coef", type=float, default=0.1, help="weight of the mean squared CAM (official)")
    g.add_argument("--div-coef", type=float, default=0.2, help="weight of the rational branch's CE (official)")
    g.add_argument("--max-meta-grad-norm", type=float, default=1.0, help="clip of the rational gradient, x sqrt(2) "
                   "after the base phase (official max_phi_grad_norm)")
    g.add_argument("--paired", action="store_true", help="both arms: --out-dir/{foster,foster_cim}/ and paired.json")
    add_system_flags(p)
    args = resolve_defaults(p.parse_args(argv), DATASET_DEFAULTS, SMOKE)
    stages = {"--epochs": args.epochs, "--boost-epochs": args.boost_epochs, "--compress-epochs": args.compress_epochs}
    short = [f"{flag} {n}" for flag, n in stages.items() if args.milestones and max(args.milestones) > n]
    if short:  # every stage (base, boosting, compression) decays at --milestones
        raise UserError(f"--milestones {' '.join(map(str, args.milestones))} must lie within the epochs of every stage "
                        f"that uses it; too short: {', '.join(short)}")
    return args


# ----------------------------------------------------------------------------------------------- compression
FULL = (0, 0, 1 << 30, 1 << 30, 1 << 30, 1 << 30)  # box table row (y0, x0, y1, x1, H, W): no box, cost 1


def compress_images(x: torch.Tensor, boxes: torch.Tensor, eta: float, mode="nearest-exact") -> torch.Tensor:
    """Poster Fig. 2 / official utils/transform.py BbxBlur: nearest down to int(side / sqrt(eta)) and back up (PIL's
    NEAREST = "nearest-exact"; the meta step's torch code uses "nearest"), the box (y0, x0, y1, x1; rows y0..y1-1)
    kept at full resolution. x: (N, C, H, W), any dtype; boxes: (N, 4+); a full box = identity."""
    h, w = x.shape[2:]
    small = (int(h / math.sqrt(eta)), int(w / math.sqrt(eta)))
    coarse = F.interpolate(F.interpolate(x.float(), size=small, mode=mode), size=(h, w), mode=mode)
    rows, cols = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
    b = boxes.to(x.device)[:, :4, None, None]
    inside = (rows >= b[:, 0]) & (rows < b[:, 2]) & (cols >= b[:, 1]) & (cols < b[:, 3])
    return torch.where(inside[:, None], x, coarse.to(x.dtype))


def compression_cost(boxes: torch.Tensor, eta: float) -> torch.Tensor:
    """Cost in full images (official BbxBlur compress_rate): box area / (H x W) + the rest / eta; boxes: (N, 6)."""
    b = boxes.double()
    frac = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (b[:, 4] * b[:, 5])
    return (frac + (1 - frac) / eta).float()


def cam_boxes(cams: torch.Tensor, size: tuple, tau: float) -> torch.Tensor:
    """Official _gen_bbx: min-max normalise each CAM (N, h, w), bilinear up to `size` (the original image's), threshold
    (> tau), tight box (y0, x0, y1, x1). An empty mask gives the full image (no compression)."""
    cams = cams - cams.amin((1, 2), keepdim=True)
    cams = cams / cams.amax((1, 2), keepdim=True).clamp(min=1e-12)
    mask = F.interpolate(cams[:, None].float(), size=size, mode="bilinear")[:, 0] > tau

    def span(m, n):  # first and one-past-last True along dim 1 of (N, n); none: (0, n)
        empty = ~m.any(1)
        return torch.where(empty, 0, m.float().argmax(1)), torch.where(empty, n, n - m.flip(1).float().argmax(1))
    (y0, y1), (x0, x1) = span(mask.any(2), size[0]), span(mask.any(1), size[1])
    return torch.stack([y0, x0, y1, x1], 1).long()


def budget_prefix(costs: torch.Tensor, budget: float) -> int:
    """Length of the longest prefix whose cumulative cost fits the budget (official: stop when it exceeds)."""
    return int((costs.cumsum(0) <= budget + 1e-6).sum())


# ----------------------------------------------------------------------------------------------- mask model
class RationalReLU(nn.Module):
    """A ReLU of the backbone; in rational mode (the mask model, official convs/resnet.py) the learnable P(x) / Q(x)
    of the header, initialised near ReLU. Its parameters (names contain `ratl`) are the mask model's phi."""
    def __init__(self):
        super().__init__()
        self.ratl_numerator = nn.Parameter(torch.tensor(RELU_NUMERATOR))
        self.ratl_denominator = nn.Parameter(torch.tensor(RELU_DENOMINATOR))
        self.rational = False

    def forward(self, x):
        if not self.rational:
            return F.relu(x)
        xf = x.float().clamp(-1e4, 1e4)  # so x^5 stays finite in float32 (else inf / inf = NaN)
        p = self.ratl_numerator[-1].expand_as(xf)
        for a in self.ratl_numerator.flip(0)[1:]:
            p = p * xf + a
        ax, power, q = xf.abs(), 1.0, 1.0
        for b in self.ratl_denominator:  # products, not pow: pow's second derivative is NaN at 0 (0 * 0^-1)
            power = power * ax
            q = q + b.abs() * power
        return (p / q).to(x.dtype)


def set_rational(model: nn.Module, on: bool):
    for m in (m for m in model.modules() if isinstance(m, RationalReLU)):
        m.rational = on


def linear(in_features: int, out_features: int) -> nn.Linear:
    """official code: CIM-CIL convs/linears.py SimpleLinear: no bias, kaiming uniform with linear gain."""
    fc = nn.Linear(in_features, out_features, bias=False)
    nn.init.kaiming_uniform_(fc.weight, nonlinearity="linear")
    return fc


# ----------------------------------------------------------------------------------------------- FOSTER host
class FosterNet(nn.Module):
    """One backbone (base model, student) or two (boosting teacher: frozen old + new, FOSTER). `fc` reads the
    concatenated features; the teacher also has `fe_fc` (new backbone's own head) and the frozen `old_fc`."""
    def __init__(self, backbones, num_classes, old_fc=None):
        super().__init__()
        self.backbones, dim = nn.ModuleList(backbones), backbones[0].num_features
        self.fc = linear(dim * len(backbones), num_classes)
        self.fe_fc = linear(dim, num_classes) if len(backbones) > 1 else None
        self.old_fc = old_fc

    def outputs(self, x):  # (logits, features, final feature maps concatenated over the backbones)
        maps = torch.cat([b.forward_features(x) for b in self.backbones], 1).float()
        features = maps.mean((2, 3))
        return self.fc(features), features, maps

    def forward(self, x):
        return self.outputs(x)[:2]  # (logits, features)


def grow(student: FosterNet, total: int) -> FosterNet:
    """FOSTER boosting model (PyCIL FOSTERNet.update_fc): the kept model's backbone frozen beside a copy of it,
    fc widened with the old rows in the old feature columns, the old fc kept frozen for KD."""
    old_fc = copy.deepcopy(student.fc).requires_grad_(False)
    teacher = FosterNet([student.backbones[0], copy.deepcopy(student.backbones[0])], total, old_fc)
    known, dim = student.fc.out_features, student.fc.in_features
    with torch.no_grad():
        teacher.fc.weight[:known, :dim] = student.fc.weight  # official update_fc: weights only (no bias)
    for n, p in teacher.backbones[0].named_parameters():  # official: old backbone frozen, its rationals not
        p.requires_grad_("ratl" in n)
    return teacher


def new_student(teacher: FosterNet, total: int) -> FosterNet:
    """FOSTER compression: a single backbone initialised from the old one, old fc rows copied (copy_fc)."""
    student = FosterNet([copy.deepcopy(teacher.backbones[0]).requires_grad_(True)], total)
    with torch.no_grad():
        student.fc.weight[:teacher.old_fc.out_features] = teacher.old_fc.weight  # official copy_fc: weights only
    return student


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. 2019 as in FOSTER: w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to the class count."""
    w = (1 - beta) / (1 - beta ** counts.double())
    return (w / w.sum() * len(counts)).float()


def kd_loss(logits, teacher_logits, T):
    """FOSTER _KD_loss: - sum softmax(t/T) * log_softmax(s/T), averaged over the batch (no T^2)."""
    return -(F.softmax(teacher_logits / T, 1) * F.log_softmax(logits / T, 1)).sum(1).mean()


def balanced_kd_loss(logits, teacher_logits, weights, T):
    """FOSTER BKD: the teacher's softened distribution reweighted by the class weights, renormalised."""
    soft = F.softmax(teacher_logits / T, 1) * weights
    soft = soft / soft.sum(1, keepdim=True)
    return -(soft * F.log_softmax(logits / T, 1)).sum(1).mean()


def host_loss(model, x, y, weights, num_old, T):
    """Base phase: CE. Boosting (FOSTER): CE(logits / w) + CE of the new backbone's head + KD on old logits."""
    logits, features, _ = model.outputs(x)
    if model.fe_fc is None:
        return F.cross_entropy(logits, y), logits
    dim = model.fe_fc.in_features
    loss = F.cross_entropy(logits / weights, y) + F.cross_entropy(model.fe_fc(features[:, -dim:]), y)
    return loss + kd_loss(logits[:, :num_old], model.old_fc(features[:, :-dim].detach()), T), logits  # frozen old fc


def make_step(model, optimizer, weights, num_old, args, device, teacher=None):
    """Host-loss step (base, boosting) or, with `teacher`, compression (balanced KD); no sync -> [loss, correct]."""
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, not args.no_amp):
            if teacher is None:
                loss, logits = host_loss(model, x, y, weights, num_old, args.kd_temperature)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(x)[0]
                logits = model(x)[0]
                loss = balanced_kd_loss(logits.float(), teacher_logits.float(), weights, args.kd_temperature)
        loss.backward()
        optimizer.step()
        return torch.stack([loss.detach().float(), (logits.argmax(1) == y).float().sum()])
    return step


def meta_step(model, phi_optimizer, batch, next_batch, weights, num_old, inner_lr, args, max_norm):
    """Mask level of the bilevel optimisation (papers.md 4.1; official foster.py): the rational branch's CAMs of the
    true class; a virtual SGD step of the backbone (not fc, phi) on CAM * x + (1 - CAM) * downup(x); Adam on phi for
    CE(fresh batch; theta+) + reg * mean CAM^2 + div * CE of the rational branch. Only phi changes (eval mode: BN)."""
    (x, y), (x2, y2) = batch, next_batch
    phi = [p for n, p in model.named_parameters() if "ratl" in n and p.requires_grad]
    set_rational(model, True)
    logits_r, _, maps = model.outputs(x)
    set_rational(model, False)
    div_loss = F.cross_entropy(logits_r, y)
    cams = torch.einsum("nc,nchw->nhw", model.fc.weight[y].detach(), maps)
    cams = cams - cams.amin((1, 2), keepdim=True)
    cams = (cams / cams.amax((1, 2), keepdim=True).clamp(min=1e-12))[:, None]
    reg_loss = (cams ** 2).mean()
    cams = F.interpolate(cams, size=x.shape[2:], mode="bilinear")
    coarse = compress_images(x, torch.zeros(len(x), 4, dtype=torch.long), args.eta, "nearest")  # official: torch's
    inner_loss, _ = host_loss(model, cams * x + (1 - cams) * coarse, y, weights, num_old, args.kd_temperature)
    fast = {n: p for n, p in model.named_parameters() if p.requires_grad and "ratl" not in n and "fc" not in n}
    grads = torch.autograd.grad(inner_loss, list(fast.values()), create_graph=True)
    fast = {n: p - inner_lr * g for (n, p), g in zip(fast.items(), grads)}
    outer_loss = F.cross_entropy(torch.func.functional_call(model, fast, (x2,))[0], y2) + \
        args.div_coef * div_loss + args.reg_coef * reg_loss
    outer_loss.backward(inputs=phi)
    dist.average_gradients(phi)  # torchrun: the ranks' mean, before clipping (a step that is not a CapturedStep)
    nn.utils.clip_grad_norm_(phi, max_norm)
    phi_optimizer.step()
    phi_optimizer.zero_grad(set_to_none=True)
    return outer_loss.detach()


# ----------------------------------------------------------------------------------------------- memory
class FileViews(torch.utils.data.Dataset):
    """Large images as official utils/data_manager.py DummyDataset serves them: the original, compressed where its
    box (y0, x0, y1, x1, original coordinates) leaves part out (BbxBlur), then `tf`. Items: (image, original (H, W))."""
    def __init__(self, files, tf, boxes, eta):
        self.files, self.tf, self.boxes, self.eta = files, tf, boxes, eta

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
        y0, x0, y1, x1 = self.boxes[i, :4].tolist()
        if y0 > 0 or x0 > 0 or y1 < im.height or x1 < im.width:
            im = TF.to_pil_image(compress_images(TF.pil_to_tensor(im)[None], self.boxes[i:i + 1], self.eta)[0])
        return self.tf(im), torch.tensor([im.height, im.width])


def view_batches(data, idx, device, workers=0, boxes=None, eta=1.0, batch_size=1000, view="test"):
    """(x, y, original (H, W)) batches of training images `idx` in order, each compressed with its box (`boxes`
    aligned with idx; None: none), in the `view`: "test" (official _construct_exemplar), "cam" (official cam_trsf:
    Resize((S, S))) or PIL transforms. Large images: a DataLoader per call (official: per epoch) sees today's boxes."""
    boxes = torch.tensor([FULL]).expand(len(idx), 6) if boxes is None else boxes.cpu()
    if data.on_device:
        for s, (x, y) in enumerate(eval_batches(data, idx, device, "train", batch_size, workers)):
            yield compress_images(x, boxes[s * batch_size:(s + 1) * batch_size], eta), y, \
                torch.tensor([[data.image_size] * 2]).expand(len(y), 2)
        return
    s = data.image_size
    tf = view if isinstance(view, list) else {"test": [T.Resize(int(s * 256 / 224)), T.CenterCrop(s)],
                                              "cam": [T.Resize((s, s))]}[view]
    loader = torch.utils.data.DataLoader(
        FileViews([data.train_files[i] for i in idx.tolist()], T.Compose(tf + [T.ToTensor(), T.Normalize(
            data.mean, data.std)]), boxes, eta), batch_size, num_workers=workers, pin_memory=device.type == "cuda",
        worker_init_fn=dist.seed_worker if dist.active() else None)
    for (x, hw), sl in zip(loader, idx.split(batch_size)):
        yield x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last), \
            data.train_y[sl].to(device), hw


@torch.no_grad()
def set_boxes(model, data, idx, box_table, tau, device, workers=0):
    """box_table[idx] = (box, original size) of images `idx`, from the rational branch's true-class CAM (official
    _gen_bbx; header: the CAM view of the whole image, the box in the original's coordinates)."""
    model.eval()
    set_rational(model, True)
    rows = []
    for x, y, hw in view_batches(data, idx, device, workers, view="cam"):
        cams = torch.einsum("nc,nchw->nhw", model.fc.weight[y], model.outputs(x)[2])
        boxes = cam_boxes(cams, tuple(hw[0].tolist()), tau) if (hw == hw[0]).all() else \
            torch.cat([cam_boxes(c[None], tuple(size), tau) for c, size in zip(cams, hw.tolist())])
        rows.append(torch.cat([boxes.cpu(), hw], 1))
    set_rational(model, False)
    if rows:
        box_table[idx.to(box_table.device)] = torch.cat(rows).to(box_table.device)


@torch.no_grad()
def compressed_features(model, data, idx, boxes, eta, device, workers=0) -> torch.Tensor:
    """Eval-view features of images `idx` compressed with `boxes` ((len(idx), 6)); torchrun: dist.shard / gather."""
    model.eval()
    mine = dist.shard(torch.arange(len(idx)), 1000)
    out = [model(x)[1].float() for x, _, _ in view_batches(data, idx[mine], device, workers, boxes[mine], eta)]
    return dist.gather(out, len(idx), 1000) if len(idx) else torch.empty(0, device=device)


def select_compressed(model, data, classes, boxes, budget, eta, device, workers=0) -> dict:
    """Herding on the compressed images (official _construct_exemplar) while the cumulative cost fits the class
    budget. Returns {class: (n, 7) rows (training index, y0, x0, y1, x1, H, W)}, herding order. boxes: (N_train, 6)."""
    memory = {}
    for c in classes:
        idx = indices_of(data.train_y, c, c + 1)
        feats = compressed_features(model, data, idx, boxes[idx], eta, device, workers)
        order = idx[herding(feats, min(len(idx), int(budget * eta) + 1)).cpu()]  # at most eta * budget fit
        memory[c] = torch.cat([order[:, None], boxes[order]], 1)
    return reduce_compressed(memory, budget, eta)


def reduce_compressed(memory: dict, budget: float, eta: float) -> dict:
    """Official _reduce_exemplar: keep the herding-order prefix whose cumulative cost fits the new budget."""
    return {c: rows[:budget_prefix(compression_cost(rows[:, 1:], eta), budget)] for c, rows in memory.items()}


def memory_rows(memory: dict) -> torch.Tensor:
    return torch.cat([memory[c] for c in sorted(memory)]) if memory else torch.empty(0, 7, dtype=torch.long)


def nme_means(model, data, memory, total, eta, device, workers=0):
    """NME class means from the features of the compressed exemplars (official: class mean of exemplar vectors)."""
    rows = memory_rows(memory)
    feats = F.normalize(compressed_features(model, data, rows[:, 0], rows[:, 1:], eta, device, workers), dim=1)
    sums = torch.zeros(total, feats.shape[1], device=device).index_add_(0, data.train_y[rows[:, 0]].to(device), feats)
    return F.normalize(sums, dim=1)


# ----------------------------------------------------------------------------------------------- training
def autoaugment(size):  # official utils/data.py: train transform of Food-101 and ImageNet
    return [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(brightness=63 / 255),
            T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)]


def epoch_batches(data, train_idx, batch_size, device, ctx, prob, args):
    """An epoch's batches in the official order: exemplars compressed with their boxes (FOSTER: full), new-class
    images with probability `prob` (official randombbxblur; drawn once an epoch), augmented: train_batches (crop +
    flip after compression), or large images in its order (last wraps; torchrun: a rank's slice) via view_batches."""
    pick = ~ctx["new_mask"]  # prob 0 draws nothing: the base phase's batches are then train_batches' own
    pick = pick | (torch.rand(len(pick), device=pick.device) < prob) if prob > 0 else pick
    boxes = torch.where(pick[:, None], ctx["box_table"], torch.tensor(FULL, device=pick.device))
    if data.on_device:  # without a box to apply (base phase, FOSTER arm): train_batches as it is
        fn = lambda x, i: compress_images(x.permute(0, 3, 1, 2), boxes[i], args.eta).permute(0, 2, 3, 1).contiguous()
        return train_batches(data, train_idx, batch_size, device, args.workers,
                             batch_fn=fn if (boxes[:, 2] < FULL[2]).any() else None)
    n, world, steps = len(train_idx), dist.world_size(), -(-len(train_idx) // batch_size)
    perm = dist.broadcast_(torch.randperm(n))
    order = train_idx[perm.repeat(-(-steps * batch_size // n))[:steps * batch_size]]
    order = order.view(steps, world, -1)[:, dist.rank()].reshape(-1)
    augment = [T.RandomResizedCrop(data.image_size), T.RandomHorizontalFlip()] if args.no_autoaugment else \
        autoaugment(data.image_size)
    return ((x, y) for x, y, _ in view_batches(data, order, device, args.workers, boxes[order.to(boxes.device)],
                                              args.eta, batch_size // world, augment))


def run_stage(model, step_model, data, train_idx, ctx, args, device, *, epochs, params, weight_decay, label,
              weights=None, num_old=0, teacher=None, meta=None):
    """One training stage (base, boosting or compression): SGD + cosine (or step decay), the captured step each
    batch; with `meta`, CAM refresh every --cam-interval epochs and the mask-level steps after each epoch."""
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, 0.1) if args.milestones else \
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    extra = [] if meta is None else [meta["optimizer"]], [] if meta is None else [meta["scheduler"]]
    stage = Stage(args, label, step_model, [optimizer] + extra[0], [scheduler] + extra[1], epochs)  # faults
    if "box_table" in stage.state:  # resumed: the boxes and probability as they were at the checkpoint
        ctx["box_table"].copy_(stage.state["box_table"])
        ctx["prob"] = stage.state["prob"]
    stage.state.update(box_table=ctx["box_table"], prob=ctx["prob"])
    captured = CapturedStep(make_step(step_model, optimizer, weights, num_old, args, device, teacher), device,
                            enabled=not args.no_graph, optimizer=optimizer)
    for epoch in stage.epochs():
        if meta is not None and epoch and epoch % args.cam_interval == 0 and stage.step == 0:  # official: refresh
            set_boxes(model, data, ctx["new_idx"], ctx["box_table"], args.tau, device, args.workers)  # CAMs, prob
            ctx["prob"] = stage.state["prob"] = args.random_compress_step * (epoch // args.cam_interval)
        step_model.train()
        if teacher is None and model.fe_fc is not None:
            model.backbones[0].eval()  # official FOSTER.train(): the old backbone's BN stays fixed
        stats = stage.running(torch.zeros(2, device=device))
        for x, y in stage.batches(epoch_batches(data, train_idx, args.batch_size, device, ctx, ctx["prob"], args)):
            stats += captured(x, y)
        if meta is not None:
            model.eval()
            inner_lr = optimizer.param_groups[0]["lr"] * args.lr_ratio
            batches = itertools.chain.from_iterable(  # cycles through the phase data (official: would stop); new
                epoch_batches(data, train_idx, args.meta_batch_size, device, ctx, 0.0, args)  # images uncompressed
                for _ in itertools.count())
            losses = [meta_step(model, meta["optimizer"], next(batches), next(batches), weights, num_old, inner_lr,
                                args, meta["max_norm"]) for _ in range(meta["iters"])]
            meta["scheduler"].step()
            meta_loss = torch.stack(losses).mean().item() if losses else float("nan")
        scheduler.step()
        loss_sum, correct = stats.tolist()  # one host sync per epoch
        steps = -(-len(train_idx) // args.batch_size)
        check_finite(loss_sum + (meta_loss if meta is not None and meta["iters"] else 0.0),
                     f"{label} epoch {epoch + 1}", "a lower --lr or --meta-lr, or --no-amp")
        acc = 100 * correct / (steps * dist.per_rank(args.batch_size))  # torchrun: counts of one rank's share
        stage.report(epoch, f"loss {loss_sum / steps:.3f} train-acc {acc:.1f}"
                     f"{f' meta {meta_loss:.3f}' if meta else ''}")
    return stage.images_per_s()


def bench_step(args, device):
    """common.bench: phase 1's boosting step on generated inputs of the real shapes -> (step, optimizer, inputs)."""
    num_classes, size = SHAPES[args.dataset]
    first, total = phase_splits(num_classes, args.base_classes, args.increment)[1]
    model = to_channels_last(grow(build_model(args, first), total), device).train()
    params = [p for n, p in model.named_parameters() if p.requires_grad and "ratl" not in n]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    weights = effective_number_weights(torch.tensor([args.memory_total // first] * first + [500] * (total - first)),
                                       args.beta1).to(device)
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, total, (args.batch_size,), device=device)
    return make_step(model, optimizer, weights, first, args, device), optimizer, (x, y)


class DownsampleA(nn.Module):
    """Option-A shortcut (He et al. 2016, Sec. 4.2). official code: PyCIL / CIM-CIL convs/cifar_resnet.py DownsampleA"""
    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return torch.cat([x, torch.zeros_like(x)], 1)


def build_model(args, num_classes) -> FosterNet:
    small = args.dataset in SMALL_IMAGE_DATASETS and not args.backbone.startswith("resnet32")
    backbone = create_backbone(args.backbone.replace("resnet32a", "resnet32"), small_input=small)
    if args.backbone == "resnet32a":  # the official host's ResNet-32 (convs/cifar_resnet.py): option-A shortcuts
        for block in (m for m in backbone.modules() if getattr(m, "downsample", None) is not None):
            block.downsample = DownsampleA()
    for parent in list(backbone.modules()):  # every nn.ReLU, at any depth, becomes a RationalReLU (convs/resnet.py)
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, RationalReLU())
    if not hasattr(backbone, "forward_features"):
        raise UserError(f"--backbone {args.backbone}: no forward_features (CIM needs the final feature maps)")
    return FosterNet([backbone], num_classes)


# ----------------------------------------------------------------------------------------------- main
def run(args):
    """One arm: all phases; returns the results dict (also in results.json), or None after --stop-after."""
    t0, device = time.time(), setup_device(args)
    arm = "foster" if args.no_cim else "foster_cim"
    if args.eta < 1 or not 0 <= args.tau < 1:
        raise UserError("--eta must be >= 1 and --tau in [0, 1)")
    args.out_dir = args.out_dir or default_out_dir(f"cim-{arm}", args)
    data, splits, order = load_protocol(args, device)
    check_budget(data.num_classes, 0, args.memory_total)  # fixed total memory: >= 1 image a class at the end
    seed_everything(args.seed)
    model = to_channels_last(build_model(args, splits[0][1]), device)  # run folder only after bad input had its error
    ckpt = open_run(args, f"CIM ({arm}): {args.dataset}, {len(splits) - 1} phases after B{args.base_classes}")
    if ckpt is not None:
        model = to_channels_last(build_model(args, splits[ckpt["phase"]][1]), device)
        model.load_state_dict(ckpt["model"])
    memory = ckpt["memory"] if ckpt is not None else {}
    rows, start_phase = resume_point(ckpt)  # after the model's layers: restores the RNG state
    print(f"backbone {args.backbone}: {count_parameters(model.backbones[0]):,} parameters")
    print(f"{'phase':>5} {'classes':>7} {'CNN':>6} {'NME':>6} {'student':>7} {'ex/cls':>6} {'time':>7}")

    for phase in range(start_phase, len(splits)):
        phase_start, (first, total) = time.time(), splits[phase]
        new_idx = indices_of(data.train_y, first, total)
        rows_mem = memory_rows(memory)
        train_idx = torch.cat([new_idx, rows_mem[:, 0]])
        ctx = {"prob": 0.0, "new_idx": new_idx, "new_mask": data.train_y.to(device) >= first,  # later: never drawn
               "box_table": torch.tensor(FULL, device=device).repeat(len(data.train_y), 1)}
        ctx["box_table"][rows_mem[:, 0].to(device)] = rows_mem[:, 1:].to(device)  # the exemplars' boxes
        if phase == 0:
            teacher, weights = model, None
        else:  # FOSTER class weights: old classes count floor(M / known) (official samples_old_class)
            counts = torch.tensor([args.memory_total // first] * first +
                                  torch.bincount(data.train_y[new_idx] - first, minlength=total - first).tolist())
            weights = effective_number_weights(counts, args.beta1).to(device)
            teacher = to_channels_last(grow(model, total), device)
        epochs, meta = args.epochs if phase == 0 else args.boost_epochs, None
        if not args.no_cim:  # the mask model: Adam + cosine on the rationals phi
            meta_opt = torch.optim.Adam([p for n, p in teacher.named_parameters() if "ratl" in n and p.requires_grad],
                                        lr=args.meta_lr, weight_decay=args.weight_decay)
            meta = {"optimizer": meta_opt, "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(meta_opt, epochs),
                    "iters": int((total - first) * args.meta_iters_per_class),
                    "max_norm": args.max_meta_grad_norm * (1 if phase == 0 else math.sqrt(2))}
        ips = run_stage(teacher, teacher, data, train_idx, ctx, args, device, label=f"phase {phase}", epochs=epochs,
                        params=[p for n, p in teacher.named_parameters() if p.requires_grad and "ratl" not in n],
                        weight_decay=args.weight_decay, weights=weights, num_old=first, meta=meta)
        if phase > 0:  # FOSTER compression: the kept single-backbone model, balanced KD from the teacher
            model = to_channels_last(new_student(teacher.eval(), total), device)
            run_stage(teacher, model, data, train_idx, ctx, args, device, epochs=args.compress_epochs,
                      params=[p for n, p in model.named_parameters() if "ratl" not in n], weight_decay=0.0,
                      weights=effective_number_weights(counts, args.beta2).to(device), teacher=teacher,
                      label=f"phase {phase} compression")
        budget = exemplars_per_class(total, None, args.memory_total, rounding="floor")  # PyCIL: floor(M / seen)
        if not args.no_cim:  # boxes of the new classes from the teacher's rational branch
            set_boxes(teacher, data, new_idx, ctx["box_table"], args.tau, device, args.workers)
        memory = reduce_compressed(memory, budget, args.eta)  # then herding under the class budget
        memory.update(select_compressed(teacher, data, range(first, total), ctx["box_table"].cpu(), budget,
                                        args.eta, device, args.workers))
        # scored: the teacher, NME on its class means (official trainer.py; header); the student is logged only
        result = evaluate(teacher.eval(), data, splits, phase, device,
                          nme_means(teacher, data, memory, total, args.eta, device, args.workers), args.workers)
        student = result if phase == 0 else evaluate(
            model.eval(), data, splits, phase, device, nme_means(model, data, memory, total, args.eta, device,
                                                                 args.workers), args.workers)
        per_class = [len(memory[c]) for c in range(total)]
        cost = compression_cost(memory_rows(memory)[:, 1:], args.eta)
        row = {"phase": phase, "known_classes": first, "total_classes": total, **result,
               **{f"student_{k}": v for k, v in student.items()},
               "class_budget": budget, "memory_size": len(cost), "memory_cost": cost.sum().item(),
               "exemplars_mean": sum(per_class) / total, "exemplars_min": min(per_class),
               "exemplars_max": max(per_class), "phase_s": time.time() - phase_start, "train_img_per_s": ips}
        rows.append(row)
        print(f"{phase:>5} {total:>7} {row['cnn_acc']:>6.2f} {row['nme_acc']:>6.2f} {student['cnn_acc']:>7.2f} "
              f"{row['exemplars_mean']:>6.1f} {row['phase_s']:>6.0f}s")
        if end_phase(args, phase, rows, {"model": model.state_dict(), "memory": memory}, len(splits)):
            return None

    student = results_from_rows([{k[8:]: v for k, v in r.items() if k.startswith("student_")} | {"phase_s": 0}
                                 for r in rows])
    return finish_run(args, "cim", data, order, device, __file__, t0, results_from_rows(rows), arm=arm,
                      cim=not args.no_cim, **{f"student_{k}": v for k, v in student.items() if k != "wall_s"},
                      exemplars_mean_per_phase=[r["exemplars_mean"] for r in rows], scored_model="teacher")


def run_paired(args):
    """FOSTER then FOSTER w/ CIM, same seed, data and class order, into sub-folders; writes paired.json."""
    out = args.out_dir or default_out_dir("cim-paired", args)
    os.makedirs(out, exist_ok=True)
    arms = run_arms(args, run, [("foster", {"no_cim": True}), ("foster_cim", {"no_cim": False})], out)
    if arms is not None:  # None after --stop-after (continue later with --resume): nothing is written
        arms = {n: {**r, "exemplars_mean_last": r["exemplars_mean_per_phase"][-1]} for n, r in arms.items()}
    return write_paired(out, arms, "foster", extra_metrics=("exemplars_mean_last",), dataset=args.dataset,
                        seed=args.seed)


def main(argv=None):
    args = parse_args(argv)
    return run_paired(args) if args.paired else run(args)


if __name__ == "__main__":
    run_main(main)
