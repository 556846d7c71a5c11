"""Genifer: generative feature-driven image replay for exemplar-free class-incremental learning.

Paper: K. Thandiackal et al., "Generative feature-driven image replay for continual learning", Image and Vision
  Computing 150 (2024) 105187; arXiv 2106.05350 (v1: "Match What Matters: Generative Implicit Feature Replay"). Only
  the abstract was available to us: the method follows the official code (papers.md 5.2).
Official code: kevthan/feature-driven-image-replay @ 79f6622 (genifer/trainers/genifer_trainer.py, learner.py,
  model/conditional_eql_style_generator.py, conditional_eql_discriminator.py, layers.py, continual_model.py,
  backbones.py, config/examples/*.json), with stylegan2-ada-pytorch (ADA) and an external radam.py.
Protocol (defaults, official config/examples): CIFAR-100, B50 then 5 tasks of 10, seed-1993 order, seed 1212, no
exemplars. Classifier: ResNet-18 (3x3 stem, no max-pool), 100 epochs, batch 32, SGD Nesterov lr 0.1 on task 0,
RAdam lr 1e-4 later, x0.2 at 30/60/80, weight decay 5e-4. After each task a conditional StyleGAN-like G is trained
against a D on the frozen classifier's stage-4 (layer3) features (642 GAN epochs after task 0, 1026 later, batch
64, ADA, lazy R1); its EMA copy replays the old classes: 0.02 CE (real new) + 0.98 KD + 1.0 feature L2 (replayed).

Claims (abstract): feature-driven generative replay beats exemplar-free baselines and image replay, helped by
image-space augmentation. `--paired [PAIR ...]` (bare: all) pairs arm A with Genifer (papers.md 5.4: same
classifier, optimiser, schedule, seed, data and order); Genifer - A in <out>/pair_<pair>/paired.json:
- finetune: CE over all seen classes on the new data (FACIL finetuning.py, --all-outputs). The lower bound.
- lwf: FACIL lwf.py without exemplars: CE on the new classes' logits + 1 x KD at T = 2 on the old ones (old model in
  eval mode, eps 1e-5); the old head rows get no gradient (FACIL's optimiser leaves them out; their decay remains).
- image-replay (feature-driven vs image replay): D on pixels (official feat_matching_layer "stage0").
- ada (--no-ada) / gan-aug (--no-gan-aug): the discriminator / classifier half of the augmentation claim (official
  dis_augmentation_p 0 / gan_augmentation false: replays not crop/flipped).
finetune, lwf and gan-aug load Genifer's task 0 (classifier and GAN); image-replay and ada load its task-0
classifier and train their own GAN on it, so that every pair starts from the same classifier.
After each GAN: samples_task{t}.png and `replay_acc` in metrics.jsonl (save_samples). Shortened GAN runs: EMA
half-life (500 kimg), its ramp and ADA's speed x s = min(1, D steps / the official run's 250,380 after task 0, 80,028
later): the EMA's weight centre stays at 0.955 of the run (unscaled, at 2k steps 80 % of it lay on the first tenth).
Below s = 0.002 one ADA adjustment (4 / (4000 s)) exceeds p's range: p toggles between 0 and --ada-max by sign D(real).

Results (CNN top-1 %, average incremental accuracy with task 0, official avg_inc_accuracy_0): none yet. Laptop
protocol (run_all.sh --laptop; README "Genifer on the laptop": flags, reasons, CPU timings): Tiny-ImageNet, 50
classes x 100 images at 32 px, B25 + 5 x 5, ResNet-32, half-width G, 312 / 98 GAN steps (8 / 14 epochs, s = 0.0012):
about an hour a GAN arm on an AVX2 core, 20-22 min on an AVX512 Xeon core (official length: ~240 CPU hours).
Usage: `python genifer.py --data-dir data --paired [PAIR ...]`; `--smoke [--paired]`: seconds on a CPU.

Deviations:
- ADA in torch (no stylegan2-ada code): ADA's ops, strengths, order and rule, but one bilinear grid_sample with
  reflection instead of the wavelet-filtered 2x upsampled warp; p adapts from the mean sign of D(real) over the last
  --ada-interval D steps (official: a sliding window).
- RAdam: torch's (decoupled_weight_decay=True; as radam.py @ 688cb1e, degenerated_to_sgd=True), new each task
  (learner.py), vs the official README's radam.py (LiyuanLucasLiu/RAdam master @ d9fd30a, degenerated_to_sgd=False):
  from a task's 6th step (rho_t > 5) the same rectified step (same eps placement) and decay p -= lr x wd x p; in
  steps 1-5 radam.py changes nothing (moments accumulate), torch takes SGD-momentum steps lr x m_hat and decays.
- Classifier epochs: the last partial batch wraps around the shuffled order (static shapes for CUDA graphs); as
  officially, a replay step uses the first 16 real images of a 32 batch, real images are crop-padded with the edge
  pixel (torchvision_loader.py), replays' crop and flip are drawn once a batch (torchvision on a 4-D tensor), GAN
  epochs drop the last partial batch. cub200: the loader's crops for GAN and classifier, replays the same 4 px
  crop/flip (official: Resize + crop).
- tinyimagenet (64 px: layer3 256x16x16) and cub200 (224 px: 256x14x14) are ours: one more G stage and D block at
  64 px; at 224 px a 7x7 constant and five 2x stages (512 512 256 128 64 32): the official large G and D are not
  released. G and D stay fp32 (R1 needs second derivatives); the classifier runs in bf16 autocast where it is on.
  CIFAR normalisation: the official (0.507, 0.487, 0.441) / (0.267, 0.256, 0.276). ResNet-18: timm's.
- An arm sharing task 0 loads Genifer's (classifier, GAN and RNG state), so alone it differs from its paired twin;
  fine-tuning and LwF use Genifer's optimiser and schedule (FACIL's own: SGD lr 0.05, patience). No GAN after the
  last task (nothing replays it). R1 and ADA step counters restart each task (official: one global counter).
Kept here as only Genifer uses them (common/ stays method-free): ADA, R1, minibatch std, equalised layers, EMA rule.
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.batches import augment, train_batches
from common.checkpoints import base_key, default_out_dir, end_phase, open_run, resume_point
from common.data import SHAPES, add_data_flags, indices_of, load_protocol, phase_splits
from common.device import autocast, seed_everything, setup_device
from common.dist import is_main, per_rank
from common.errors import UserError
from common.evaluation import evaluate, results_from_rows
from common.flags import add_system_flags, new_parser, resolve_defaults
from common.graph import CapturedStep
from common.models import count_parameters, create_backbone, stage_features, to_channels_last
from common.results import finish_run, run_arms, write_paired
from common.stage import Stage, check_finite
from common.stop import run_main

# Per-dataset defaults (a flag given wins): CIFAR-100 official config/examples (papers.md 5.3); the rest ours.
_CIFAR = dict(data_dir="data", backbone="resnet18", base_classes=50, increment=10, epochs=100,
              milestones=[30, 60, 80], gan_epochs_first=642, gan_epochs=1026)
DATASET_DEFAULTS = {
    "cifar100": _CIFAR, "cifar100-synthetic": {**_CIFAR, "data_dir": ""},  # generated, CIFAR shapes (timing)
    "tinyimagenet": {**_CIFAR, "base_classes": 100},
    "cub200": {**_CIFAR, "base_classes": 100, "g_channels": [512, 512, 256, 128, 64, 32]},
    "synthetic": dict(data_dir="", backbone="resnet32", base_classes=10, increment=5, epochs=5, milestones=[4],
                      gan_epochs_first=1, gan_epochs=1, g_channels=[32, 16, 16, 8]),
}
SMOKE = dict(dataset="synthetic", gan_batch_size=16, latent_dim=32, label_dim=16, d_width=32, inc_lr=1e-3)
# what an arm of a pair may change without changing task 0 (then shared: the GAN after task 0 is the same or unused)
ARM_KEYS = ("arm", "no_gan_aug", "lwf_temperature", "lwf_weight", "paired")
# official CIFAR-100 GAN runs, D steps of batch 64: 642 epochs x 390 after task 0, 1026 x 78 after a later task
OFFICIAL_GAN_STEPS = (642 * (25000 // 64), 1026 * (5000 // 64))
STAGES = {"stage3": "layer2", "stage4": "layer3", "stage5": "layer4"}  # official backbones.py stage names
GAN_PARTS = ("g", "g_ema", "d", "ada")  # what a checkpoint holds of the GAN


def parse_args(argv=None):
    p, g = new_parser(__doc__)
    g.add_argument("--dataset", default="cifar100", help="cifar100 (official) | tinyimagenet | cub200 | synthetic | "
                   "cifar100-synthetic (generated, CIFAR-100's shapes, for timing)")
    add_data_flags(g)  # --data-dir, --classes, --train-per-class, --image-size (laptop protocol, README)
    g.add_argument("--backbone", default=None, help="timm ResNet (official: ResNet-18, 3x3 stem, no max-pool)")
    g.add_argument("--base-classes", type=int, default=None, help="classes of task 0 (official config: 50)")
    g.add_argument("--increment", type=int, default=None, help="new classes a task (official config: 10)")
    g.add_argument("--memory-per-class", type=int, default=0, help="Genifer keeps no exemplars: must be 0")
    g.add_argument("--memory-total", type=int, default=None, help="Genifer keeps no exemplars: must be unset")
    g.add_argument("--class-order-seed", type=int, default=1993, help="(official config: the seed-1993 order)")
    g = p.add_argument_group("classifier optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs a task (official config: 100)")
    g.add_argument("--batch-size", type=int, default=32, help="classifier batch (official config: 32)")
    g.add_argument("--lr", type=float, default=0.1, help="task 0, SGD Nesterov (official pretrain config: 0.1)")
    g.add_argument("--inc-lr", type=float, default=1e-4, help="tasks >= 1, RAdam (official config: 1e-4)")
    g.add_argument("--milestones", type=int, nargs="+", default=None, help="lr x --lr-gamma at (official: 30 60 80)")
    g.add_argument("--lr-gamma", type=float, default=0.2, help="(official config: scheduler_factor 0.2)")
    g.add_argument("--momentum", type=float, default=0.9, help="task 0 SGD momentum (official learner.py: 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="(official learner.py default: 5e-4)")
    g = p.add_argument_group("method")
    g.add_argument("--ce-weight", type=float, default=0.02, help="CE, real new samples (official: ce_coefficient)")
    g.add_argument("--kd-weight", type=float, default=0.98, help="KD, generated samples (official: coefficient)")
    g.add_argument("--feat-weight", type=float, default=1.0, help="feature L2 (official: feat_coefficient 1.0)")
    g.add_argument("--kd-temperature", type=float, default=1.0, help="(official: temperature 1)")
    g.add_argument("--replay-fraction", type=float, default=0.5, help="generated share (official: prev_curr_ratio)")
    g.add_argument("--feat-layer", default="stage4", choices=sorted(STAGES), help="D and KD features (official stage4)")
    g.add_argument("--arm", default="genifer", choices=("genifer", "image-replay", "finetune", "lwf"),
                   help="image-replay: D on pixels (official stage0); finetune, lwf: the baselines (header)")
    g.add_argument("--lwf-temperature", type=float, default=2.0, help="LwF's T (FACIL lwf.py: 2)")
    g.add_argument("--lwf-weight", type=float, default=1.0, help="LwF's lambda (FACIL lwf.py: 1)")
    g.add_argument("--no-gan-aug", action="store_true", help="replays not crop/flipped (official gan_augmentation "
                   "false): the classifier half of the augmentation claim")
    g.add_argument("--paired", nargs="*", choices=list(PAIRS), default=None, help="pairs with Genifer (header), "
                   "each in <out>/pair_<pair>/paired.json, one Genifer arm for all; bare --paired: all five")
    g = p.add_argument_group("GAN (generator, feature discriminator, ADA)")
    g.add_argument("--gan-epochs-first", type=int, default=None, help="after task 0 (official pretrain_gan: 642)")
    g.add_argument("--gan-epochs", type=int, default=None, help="after later tasks (official: n_iter 1026)")
    g.add_argument("--gan-lr", type=float, default=0.0025, help="G and D Adam lr (official: gen_lr, disc_lr)")
    g.add_argument("--gan-batch-size", type=int, default=64, help="(official: batch_size 64)")
    g.add_argument("--r1-gamma", type=float, default=0.5, help="(official: r1_gamma 0.5)")
    g.add_argument("--r1-interval", type=int, default=16, help="lazy R1 every N D steps (official: 16)")
    g.add_argument("--no-ada", action="store_true", help="D's inputs not augmented (official dis_augmentation_p "
                   "0): the discriminator half of the augmentation claim")
    g.add_argument("--ada-target", type=float, default=0.5, help="E[sign D(real)] (official: dis_augmentation_p)")
    g.add_argument("--ada-max", type=float, default=0.5, help="(official: max_dis_augmentation_p 0.5)")
    g.add_argument("--ada-interval", type=int, default=4, help="adjust p every N steps (official: 4)")
    g.add_argument("--ada-ksteps", type=float, default=4, help="k steps for p to move by 1 (official: 4), x s")
    g.add_argument("--ema-half-life-kimg", type=float, default=500, help="EMA G (official: 500, ramped up over half "
                   "the run), x s = min(1, the run's D steps / the official run's: 250,380 after task 0, 80,028 later)")
    g.add_argument("--gen-distill-weight", type=float, default=10, help="L1 to the previous G x n_old/n_new "
                   "(official: gen_coefficient 10, gen_dist_ada)")
    g.add_argument("--latent-dim", type=int, default=512, help="z and w size (official: latent_dim 512)")
    g.add_argument("--label-dim", type=int, default=256, help="label embedding (official generator: 256)")
    g.add_argument("--g-channels", type=int, nargs="+", default=None, help="G widths (official 32 px: 512 256 128 64)")
    g.add_argument("--d-width", type=int, default=512, help="discriminator max channels (official: 512)")
    add_system_flags(p)
    p.set_defaults(seed=1212)  # official config: seed 1212
    args = resolve_defaults(p.parse_args(argv), DATASET_DEFAULTS, SMOKE)
    size = args.image_size or SHAPES[args.dataset][1]  # official 32 px: 512 256 128 64; 2x size: a halving more (ours)
    args.g_channels = args.g_channels or [512 >> i for i in range(max(size // 4, 1).bit_length())]
    return args


# ----------------------------------------------------------------------------------------------- classifier
class GeniferNet(nn.Module):
    """Backbone + one linear head over all seen classes (official: prev + curr readouts; the old rows copied)."""
    def __init__(self, backbone: nn.Module, layer: str):
        super().__init__()
        self.backbone, self.layer, self.head = backbone, layer, None

    def add_classes(self, n: int):
        old, device = self.head, next(self.backbone.parameters()).device
        self.head = nn.Linear(self.backbone.num_features, n + (old.out_features if old else 0)).to(device)
        if old is not None:
            with torch.no_grad():
                self.head.weight[:old.out_features], self.head.bias[:old.out_features] = old.weight, old.bias

    def forward(self, x):
        fmap, features = stage_features(self.backbone, x, self.layer)
        return self.head(features.float()), features, fmap


# ----------------------------------------------------------------------------------------------- GAN modules
class EqualLinear(nn.Module):
    """Equalised learning rate (official layers.EQLinear): unit-scale parameters for Adam, scaled in forward."""
    def __init__(self, fan_in, fan_out, bias=True, bias_init=0.0, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((fan_out,), float(bias_init))) if bias else None
        self.weight_scale, self.lr_mul = lr_mul / fan_in ** 0.5, lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.weight_scale, None if self.bias is None else self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """Equalised 3x3 convolution (official layers.EQConv2d): weight ~ N(0, 1) used as w * sqrt(2 / fan_in)."""
    def __init__(self, c_in, c_out):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(c_out, c_in, 3, 3)), nn.Parameter(torch.zeros(c_out))
        self.scale = (2 / (c_in * 9)) ** 0.5

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=1)


class StyleConv(nn.Module):
    """Official StyleEQConv2dWithBias: x * scale(w) + shift(w) per input channel (scale bias 1, shift bias 0; AdaIN
    without the normalisation), equalised 3x3 conv, + a learned per-channel strength (init 0) times N(0, 1) noise."""
    def __init__(self, c_in, c_out, w_dim, noise=True):
        super().__init__()
        self.scale, self.shift = EqualLinear(w_dim, c_in, bias_init=1.0), EqualLinear(w_dim, c_in)
        self.conv = EqualConv2d(c_in, c_out)
        self.noise_strength = nn.Parameter(torch.zeros(1, c_out, 1, 1)) if noise else None

    def forward(self, x, w, noise=None):
        x = self.conv(x * self.scale(w)[:, :, None, None] + self.shift(w)[:, :, None, None])
        if self.noise_strength is not None:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device) if noise is None else noise
            x = x + self.noise_strength * noise
        return x


class Generator(nn.Module):
    """Conditional StyleGAN-like generator (official conditional_eql_style_generator.py): w = two mapping layers (lr
    x0.01, LeakyReLU 0.2) on [z, embedded label]; from a learned constant, two style convs with noise a resolution,
    bilinear x2 between, one more at the top, a noise-free linear style conv to RGB (normalised image space)."""
    def __init__(self, num_classes, image_size, channels=(512, 256, 128, 64), latent_dim=512, label_dim=256):
        super().__init__()
        n_up, base = len(channels) - 1, image_size >> (len(channels) - 1)
        if base < 1 or base << n_up != image_size:
            raise UserError(f"--g-channels: {len(channels)} resolutions cannot reach {image_size} px by doubling; "
                            "give one channel count per resolution")
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.embed = EqualLinear(num_classes, label_dim)
        self.mapping = nn.ModuleList([EqualLinear(latent_dim + label_dim, latent_dim, lr_mul=0.01),
                                      EqualLinear(latent_dim, latent_dim, lr_mul=0.01)])
        self.const = nn.Parameter(torch.ones(1, channels[0], base, base))
        pairs = [(channels[0], channels[0])] + [p for a, b in zip(channels, channels[1:]) for p in ((a, b), (b, b))]
        self.convs = nn.ModuleList([StyleConv(a, b, latent_dim) for a, b in pairs])  # 7 at 32 px, as official
        self.resolutions = [base << (i // 2) for i in range(len(pairs))]
        self.to_rgb = StyleConv(channels[-1], 3, latent_dim, noise=False)

    def sample_noise(self, n, device, generator=None):
        return [torch.randn(n, 1, r, r, generator=generator, device=device) for r in self.resolutions]

    def forward(self, z, labels, noise=None):
        w = torch.cat([z, self.embed(F.one_hot(labels, self.num_classes).float())], 1)
        for layer in self.mapping:
            w = F.leaky_relu(layer(w), 0.2)
        x = self.const.expand(len(z), -1, -1, -1)
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x, w, None if noise is None else noise[i]), 0.2)
            if i % 2 == 1:  # official: bilinear x2 after every second conv (UpsamplingBilinear2d)
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.to_rgb(x, w)


def minibatch_std(x, group_size=32):
    """Appends the std over strided groups of min(group_size, N) samples, mean over C, H, W (official MinibatchStd)."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    y = x.reshape(g, -1, 1, c, h, w)
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean((2, 3, 4)).reshape(-1, 1, 1, 1)
    return torch.cat([x, y.repeat(g, 1, h, w)], 1)


class FeatureDiscriminator(nn.Module):
    """D on the classifier's stage features (official conditional_eql_discriminator.py, stage 4): blocks of two
    equalised convs + 2x average pool down to 2x2 (256x8x8: 256, 256, pool, 512, 512, pool), minibatch std, a conv,
    a dense layer to `width`, a 128-d output projected on the embedded label / sqrt(128). `pixels`: D on the images
    (official stage 0, 32 px: 128 128 | 256 256 | 512 512 | 512, the last block one conv; 64 px: one more, ours)."""
    def __init__(self, num_classes, in_channels, in_size, width=512, cmap_dim=128, pixels=False):
        super().__init__()
        layers, c, res, b = [], in_channels, in_size, 0
        while res // 2 >= 2:  # block b: min(base * 2^b, width) channels, base 128 on pixels
            out = min((128 if pixels else in_channels) << b, width)
            layers += [EqualConv2d(c, out)] + [EqualConv2d(out, out)] * (not pixels or res > 4) + [nn.AvgPool2d(2)]
            c, res, b = out, res // 2, b + 1
        self.blocks = nn.ModuleList(layers)
        self.conv = EqualConv2d(c + 1, c)
        self.dense, self.out = EqualLinear(c * res * res, c), EqualLinear(c, cmap_dim)
        self.project = EqualLinear(num_classes, cmap_dim, bias=False)
        self.num_classes, self.cmap_dim = num_classes, cmap_dim

    def forward(self, x, labels):
        for layer in self.blocks:
            x = layer(x) if isinstance(layer, nn.AvgPool2d) else F.leaky_relu(layer(x), 0.2)
        x = F.leaky_relu(self.conv(minibatch_std(x)), 0.2)
        x = self.out(F.leaky_relu(self.dense(x.flatten(1)), 0.2))
        return (x * self.project(F.one_hot(labels, self.num_classes).float())).sum(1) / self.cmap_dim ** 0.5


def r1_penalty(d_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean over samples of ||grad_x D(x)||^2 at real inputs, differentiable."""
    grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------- ADA
# ADA (Karras et al. 2020, "Training generative adversarial networks with limited data"; NVlabs/stylegan2-ada-pytorch
# training/augment.py) in torch, no stylegan2-ada code: every 'bgc' op with ADA's strengths and order, each applied
# per sample with probability p (a device buffer: no host sync, one static graph), differentiable in the images.
ADA_OPS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
           "brightness", "contrast", "lumaflip", "hue", "saturation")


def _gate(value, identity, p):
    """Per sample: `value` with probability p, else the identity value."""
    keep = torch.rand(value.shape[0], device=value.device) < p
    return torch.where(keep.view(-1, *[1] * (value.dim() - 1)), value, identity)


def _affine(n, device, sx=1.0, sy=1.0, tx=0.0, ty=0.0, angle=0.0):
    """Batched 3x3 matrices: rotation by `angle` after scaling by (sx, sy), then translation (tx, ty)."""
    sx, sy, tx, ty, angle = (v if torch.is_tensor(v) else torch.zeros(n, device=device) + v
                             for v in (sx, sy, tx, ty, angle))  # scalars by kernels: capturable
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return torch.stack([sx * cos, -sy * sin, tx, sx * sin, sy * cos, ty, zero, zero, zero + 1], 1).view(n, 3, 3)


def geometric_matrix(n, p, ops, size, device):
    """ADA's inverse geometric transform (output -> input coordinates in [-1, 1]) in ADA's order and strengths: flip,
    k*90 deg, integer shift <= 0.125 W, scale 2^N(0, 0.2), rotation U(-pi, pi) with p_rot = 1 - sqrt(1 - p) twice
    around anisotropy 2^N(0, 0.2), fractional shift N(0, 0.125 W)."""
    def rand(*shape): return torch.rand(n, *shape, device=device)
    def shift(t): return _affine(n, device, tx=-2 * t[:, 0], ty=-2 * t[:, 1])  # shifts in widths -> [-1, 1]
    def stretch(s, aniso): return _affine(n, device, sx=1 / s, sy=s if aniso else 1 / s)
    mat, p_rot = torch.eye(3, device=device).repeat(n, 1, 1), 1 - (1 - torch.as_tensor(p, device=device)).sqrt()
    make = {"xflip": lambda: _affine(n, device, sx=1 - 2 * _gate((rand() < 0.5).float(), 0.0, p)),
            "rotate90": lambda: _affine(n, device, angle=-math.pi / 2 * _gate((rand() * 4).floor(), 0.0, p)),
            "xint": lambda: shift(torch.round(_gate((rand(2) * 2 - 1) * 0.125, 0.0, p) * size) / size),
            "scale": lambda: stretch(_gate(2 ** (torch.randn(n, device=device) * 0.2), 1.0, p), False),
            "rotate": lambda: _affine(n, device, angle=-_gate((rand() * 2 - 1) * math.pi, 0.0, p_rot)),
            "aniso": lambda: stretch(_gate(2 ** (torch.randn(n, device=device) * 0.2), 1.0, p), True),
            "xfrac": lambda: shift(_gate(torch.randn(n, 2, device=device) * 0.125, 0.0, p))}
    for op in ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "rotate", "xfrac"):  # ADA's order
        mat = mat @ make[op]() if op in ops else mat
    return mat


def warp(x, mat):
    """Sample x at mat @ (output coordinates): bilinear, reflection at the border (ours; ADA pads by reflection)."""
    grid = F.affine_grid(mat[:, :2, :].to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour_matrix(n, p, ops, device):
    """ADA's colour transform (4x4, homogeneous RGB) in ADA's order: brightness + N(0, 0.2), contrast x 2^N(0, 0.5),
    luma flip, hue rotation U(-pi, pi) about the luma axis v, saturation 2^N(0, 1) off the axis."""
    eye, a = torch.eye(4, device=device), 3 ** -0.5
    v = torch.full((4,), a, device=device)
    v[3] = 0  # fills, not a tensor of host values: no host-to-device copy inside a captured graph
    vv, mat = torch.outer(v, v), eye.repeat(n, 1, 1)
    if "brightness" in ops:  # the first op: a translation of the identity
        mat[:, :3, 3] = _gate(torch.randn(n, device=device) * 0.2, 0.0, p)[:, None]
    if "contrast" in ops:
        c = _gate(2 ** (torch.randn(n, device=device) * 0.5), 1.0, p)
        mat = torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], 1)) @ mat
    if "lumaflip" in ops:
        mat = (eye - 2 * vv * _gate(torch.randint(0, 2, (n,), device=device).float(), 0.0, p)[:, None, None]) @ mat
    if "hue" in ops:  # Rodrigues: cos t I + sin t [v]x + (1 - cos t) v v^T on the RGB block
        t = _gate((torch.rand(n, device=device) * 2 - 1) * math.pi, 0.0, p)[:, None, None]
        cross = torch.zeros(4, 4, device=device)
        cross[0, 2] = cross[1, 0] = cross[2, 1] = a
        cross[0, 1] = cross[1, 2] = cross[2, 0] = -a
        rot = t.cos() * eye + t.sin() * cross + (1 - t.cos()) * vv
        rot[:, 3, 3] = 1
        mat = rot @ mat
    if "saturation" in ops:
        mat = (vv + (eye - vv) * _gate(2 ** torch.randn(n, device=device), 1.0, p)[:, None, None]) @ mat
    return mat


class AdaptiveAugment(nn.Module):
    """ADA on D's inputs: `ops` applied per sample with probability p; p follows E[sign D(real)] to the target."""
    def __init__(self, ops=ADA_OPS):
        super().__init__()
        self.ops = tuple(ops)
        self.register_buffer("p", torch.zeros(()))

    def forward(self, x):
        if any(op in self.ops for op in ADA_OPS[:7]):
            x = warp(x, geometric_matrix(len(x), self.p, self.ops, x.shape[-1], x.device))
        if any(op in self.ops for op in ADA_OPS[7:]):
            c = colour_matrix(len(x), self.p, self.ops, x.device).to(x.dtype)
            x = torch.einsum("nij,njhw->nihw", c[:, :3, :3], x) + c[:, :3, 3, None, None]
        return x

    @torch.no_grad()
    def adjust(self, mean_sign, target, interval, ksteps, p_max):
        """Official update_ada: p += sign(r_t - target) * interval / (ksteps * 1000), clipped to [0, p_max]."""
        self.p.copy_((self.p + torch.sign(mean_sign - target) * interval / (ksteps * 1000)).clamp(0, p_max))


# ----------------------------------------------------------------------------------------------- losses
def classifier_losses(logits, old_logits, fmap, old_fmap, y_new, n_gen, num_old, temperature=1.0):
    """Official get_modified_loss (KD_sep, single_L2) on a batch [n_gen replayed | real new]: CE over all seen
    classes on the real new samples; KD = mean of -sum softmax(z_old / T) * log_softmax(z / T) over the old classes,
    on the replayed samples; mean L2 norm of the stage-feature difference on the replayed ones. -> (ce, kd, feat)"""
    ce = F.cross_entropy(logits[n_gen:], y_new)
    target = F.softmax(old_logits[:n_gen, :num_old] / temperature, 1)
    kd = -(target * F.log_softmax(logits[:n_gen] / temperature, 1)[:, :num_old]).sum(1).mean()
    feat = (fmap[:n_gen] - old_fmap[:n_gen]).flatten(1).norm(dim=1).mean()
    return ce, kd, feat


def lwf_losses(logits, old_logits, y, num_old, temperature=2.0, eps=1e-5):
    """FACIL src/approach/lwf.py criterion without exemplars, on real new samples: CE over the new classes' logits;
    KD = mean of -sum softmax(z_old / T) * log q over the old classes, q the new model's softmax(z / T) + eps /
    num_old renormalised (FACIL's cross_entropy with exp = 1/T). -> (ce, kd)"""
    ce = F.cross_entropy(logits[:, num_old:], y - num_old)
    q = F.softmax(logits[:, :num_old] / temperature, 1) + eps / num_old
    kd = -(F.softmax(old_logits[:, :num_old] / temperature, 1) * (q / q.sum(1, keepdim=True)).log()).sum(1).mean()
    return ce, kd


def crop_flip_batch(x, padding=4):
    """RandomCrop(padding, edge) + RandomHorizontalFlip on a 4-D NCHW tensor as torchvision applies them: one
    offset and one flip for the whole batch (official genifer_trainer aug_transform_gan)."""
    n, c, h, w = x.shape
    return augment(x.permute(2, 3, 0, 1).reshape(1, h, w, n * c), padding, "replicate").view(h, w, n, c).permute(
        2, 3, 0, 1)


# ----------------------------------------------------------------------------------------------- training
def make_classifier_step(model, old_model, prev_g, optimizer, num_old, bounds, args, device):
    """One classifier step -> [loss, ce, kd, feat, correct] (no sync). Task 0: CE; later, finetune / lwf: their
    losses on the real batch; Genifer (official learner.py): [replayed | real new] (prev_curr_ratio), weighted CE + KD
    + L2; replays: the previous EMA G's clamped images of uniform old labels, crop+flipped unless --no-gan-aug."""
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        zero = torch.zeros((), device=device)
        if old_model is None or prev_g is None:
            with autocast(device, not args.no_amp):
                logits = model(x)[0].float()
                old_logits = old_model(x)[0].float() if old_model is not None and args.arm == "lwf" else None
            ce, kd = (F.cross_entropy(logits, y), zero) if old_logits is None else \
                lwf_losses(logits, old_logits, y, num_old, args.lwf_temperature)
            loss, feat, correct = ce + args.lwf_weight * kd, zero, (logits.argmax(1) == y).float().sum()
        else:
            n_gen = int(args.replay_fraction * len(x))
            x_new, y_new = x[:len(x) - n_gen], y[:len(x) - n_gen]  # official: the first B - n_gen real images
            with torch.no_grad():
                fake = prev_g(torch.randn(n_gen, prev_g.latent_dim, device=device),
                              torch.randint(0, num_old, (n_gen,), device=device))
                replay = torch.maximum(torch.minimum(fake, bounds[1]), bounds[0])
                replay = replay if args.no_gan_aug else crop_flip_batch(replay)  # official: crop, edge pad, flip
                x_in = torch.cat([replay.to(x.dtype), x_new]).contiguous(memory_format=torch.channels_last)
                with autocast(device, not args.no_amp):
                    old_logits, _, old_fmap = old_model(x_in)  # official freeze_bn=false: train mode
            with autocast(device, not args.no_amp):
                logits, _, fmap = model(x_in)
            ce, kd, feat = classifier_losses(logits.float(), old_logits.float(), fmap.float(), old_fmap.float(),
                                             y_new, n_gen, num_old, args.kd_temperature)
            loss = args.ce_weight * ce + args.kd_weight * kd + args.feat_weight * feat
            correct = (logits[n_gen:].argmax(1) == y_new).float().sum() * len(x) / len(y_new)
        loss.backward()
        if old_model is not None and args.arm == "lwf":  # FACIL: old heads out of the optimiser without exemplars
            model.head.weight.grad[:num_old], model.head.bias.grad[:num_old] = 0, 0
        optimizer.step()
        return torch.stack([loss.detach(), ce.detach(), kd.detach(), feat.detach(), correct])
    return step


def train_classifier(model, old_model, prev_g, data, train_idx, num_old, bounds, args, device, label):
    """One task of classifier training; returns images/s. Task 0 SGD Nesterov, later RAdam (official learner.py)."""
    if old_model is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                                    weight_decay=args.weight_decay)
    else:  # decoupled decay as radam.py (deviations); capturable for CUDA graphs
        optimizer = torch.optim.RAdam(model.parameters(), lr=args.inc_lr, weight_decay=args.weight_decay,
                                      decoupled_weight_decay=True, capturable=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=args.lr_gamma)
    both = nn.ModuleDict({"model": model, "old": nn.Identity() if old_model is None else old_model})  # old BN moves too
    stage = Stage(args, label, both, optimizer, scheduler, args.epochs)  # in-task checkpoints, SIGTERM
    step = CapturedStep(make_classifier_step(model, old_model, prev_g, optimizer, num_old, bounds, args, device),
                        device, enabled=not args.no_graph, optimizer=optimizer)
    crop = {"augmentation": "none", "batch_fn": lambda x, _: augment(x, 4, "replicate")} if data.on_device else {}
    for epoch in stage.epochs():
        both.train()  # official freeze_bn=false: Genifer's old model runs in train mode (FACIL's LwF: eval mode)
        both["old"].train(args.arm != "lwf")
        stats = stage.running(torch.zeros(5, device=device))  # small images: crop with edge padding (official)
        for x, y in stage.batches(train_batches(data, train_idx, args.batch_size, device, args.workers, **crop)):
            stats += step(x, y)
        scheduler.step()
        loss, ce, kd, feat, correct = (stats / -(-len(train_idx) // args.batch_size)).tolist()  # one host sync
        check_finite(loss, f"{label} epoch {epoch + 1}")
        stage.report(epoch, f"loss {loss:.3f} (ce {ce:.3f} kd {kd:.3f} feat {feat:.3f}) train-acc "
                     f"{100 * correct / per_rank(args.batch_size):.1f}")
    return stage.images_per_s()


def make_gan_steps(gan, model, prev_g, num_old, total, args, device):
    """Official genifer_trainer.prepare_next_training -> (d_step, d_r1_step, g_step): non-saturating D (lazy R1 or
    not) and G (generator distillation) steps on a frozen eval copy's stage features; new Adam optimisers in `gan`
    (official: per task). After task 0 D's real batch opens with old-class images of the old EMA G (sample_d_inputs)."""
    g, d, ada = gan["g"], gan["d"], gan["ada"]
    n_prev = args.gan_batch_size // 2 if prev_g is not None else 0
    lazy = args.r1_interval / (args.r1_interval + 1)  # official lazy_c: also scales D's lr and betas
    dist_factor = num_old / max(total - num_old, 1)  # official gen_dist_ada: n_prev_cls / n_new_cls
    cap, frozen = device.type == "cuda", copy.deepcopy(model).eval().requires_grad_(False)
    gan["opt_g"] = torch.optim.Adam(g.parameters(), lr=args.gan_lr, betas=(0.0, 0.99), capturable=cap)
    gan["opt_d"] = torch.optim.Adam(d.parameters(), lr=args.gan_lr * lazy, betas=(0.0, 0.99 ** lazy), capturable=cap)

    def features(x):  # D's input: the frozen classifier run up to D's stage only (image-replay: the images)
        if args.arm == "image-replay":
            return x
        with autocast(device, not args.no_amp):
            return stage_features(frozen.backbone, x.contiguous(memory_format=torch.channels_last), frozen.layer, 1)[0]

    def d_step(x_real, y_real, z, y_fake, r1=False):
        gan["opt_d"].zero_grad(set_to_none=True)
        with torch.no_grad():
            if n_prev:
                x_real = torch.cat([prev_g(z[:n_prev], y_fake[:n_prev]), x_real[:len(x_real) - n_prev]])
                y_real = torch.cat([y_fake[:n_prev], y_real[:len(y_real) - n_prev]])
            fake = g(z, y_fake)
            f_real, f_fake = (features(ada(x.float())).float() for x in (x_real, fake))
        f_real.requires_grad_(r1)
        d_real, d_fake = d(f_real, y_real), d(f_fake, y_fake)
        loss = (F.softplus(d_fake) + F.softplus(-d_real)).mean()
        if r1:
            loss = loss + r1_penalty(d_real, f_real) * args.r1_gamma / 2 * lazy
        loss.backward()
        gan["opt_d"].step()
        return torch.stack([loss.detach(), d_real.detach().sign().mean()])

    def g_step(z, y_fake):
        gan["opt_g"].zero_grad(set_to_none=True)
        d.requires_grad_(False)
        noise = g.sample_noise(len(z), device)
        fake = g(z, y_fake, noise)
        gan_loss = F.softplus(-d(features(ada(fake)).float(), y_fake)).mean()
        dist = torch.zeros((), device=device)
        if n_prev and args.gen_distill_weight:
            with torch.no_grad():
                target = prev_g(z[:n_prev], y_fake[:n_prev], [n[:n_prev] for n in noise])
            dist = (fake[:n_prev] - target).abs().mean()  # official: L1 on the non-augmented images
        loss = gan_loss + args.gen_distill_weight * dist_factor * dist
        loss.backward()
        gan["opt_g"].step()
        d.requires_grad_(True)
        return torch.stack([loss.detach(), gan_loss.detach(), dist.detach()])
    return d_step, (lambda *a: d_step(*a, r1=True)), g_step


def gan_schedule(args, epochs, n, later):
    """(EMA half-life in images, its ramp rate, ADA's k steps, s) of `epochs` over n images (header). The ramp (official
    ema_rampup: epochs / 4 x the classifier's batches of 32, half the GAN steps at 64) reaches the half-life halfway."""
    s = min(1.0, epochs * (n // args.gan_batch_size) / OFFICIAL_GAN_STEPS[later])
    horizon = args.ema_half_life_kimg * 1000 * s
    ramp = horizon / max(args.gan_batch_size * epochs / 4 * -(-n // args.batch_size), 1)
    return horizon, ramp, args.ada_ksteps * s, s


def ema_beta(done, batch, horizon, ramp):
    """Official EMA decay after `done` G steps: half-life min(horizon, batch x done x ramp) images."""
    return 0.5 ** (batch / max(min(horizon, batch * done * ramp), 1e-8))


def train_gan(gan, model, prev_g, data, train_idx, first, total, epochs, args, device, label):
    """GAN training after a task against the frozen eval-mode classifier (official); G restarts from the EMA G, ADA's
    p from 0. Returns images/s (real images a step)."""
    g, g_ema, ada = gan["g"], gan["g_ema"], gan["ada"]
    g.load_state_dict(g_ema.state_dict())
    ada.p.zero_()
    step_fns = make_gan_steps(gan, model, prev_g, first, total, args, device)  # new optimisers, then the Stage
    stage = Stage(args, f"{label} GAN", nn.ModuleDict({k: gan[k] for k in GAN_PARTS}), [gan["opt_d"], gan["opt_g"]],
                  None, epochs)
    steps = [CapturedStep(s, device, enabled=not args.no_graph, optimizer=gan[o]) for s, o in
             zip(step_fns, ("opt_d", "opt_d", "opt_g"))]
    batch, per_epoch = args.gan_batch_size, len(train_idx) // args.gan_batch_size
    n_prev = batch // 2 if prev_g is not None else 0
    horizon, ramp, ksteps, scale = gan_schedule(args, epochs, len(train_idx), prev_g is not None)
    print(f"{label} GAN: {epochs * per_epoch} steps, s {scale:.4g}: EMA half-life {horizon / batch:.0f} steps, ADA p "
          f"0 -> 1 in {ksteps * 1000:.0f}")
    g_params, ema_params = list(g.parameters()), list(g_ema.parameters())
    sign_sum = stage.state["sign_sum"] = stage.state.get("sign_sum", torch.zeros(())).to(device)  # ADA's window
    for epoch in stage.epochs():
        stats = stage.running(torch.zeros(5, device=device))
        # official gan_dataloader: shuffled, un-augmented (large images: the file loader's crops, deviations), the
        # last partial batch dropped; torchrun: the whole batch on every rank (the GAN steps run replicated)
        real = train_batches(data, train_idx, batch, device, args.workers, "none", shard=False, drop_last=True)
        for x, y in stage.batches(real):
            done = epoch * per_epoch + stage.step  # D steps so far this task
            z = torch.randn(batch, g.latent_dim, device=device)
            y_fake = torch.cat([torch.randint(0, max(first, 1), (n_prev,), device=device),
                                torch.randint(first, total, (batch - n_prev,), device=device)])
            d_out = steps[1 if done % args.r1_interval == 0 else 0](x, y, z, y_fake)
            sign_sum += d_out[1]
            g_out = steps[2](z, y_fake)
            stats += torch.cat([d_out, g_out])
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, g_params, 1 - ema_beta(done, batch, horizon, ramp))
            if not args.no_ada and (done + 1) % args.ada_interval == 0:
                ada.adjust(sign_sum / args.ada_interval, args.ada_target, args.ada_interval, ksteps, args.ada_max)
                sign_sum.zero_()
        d_loss, sign, g_loss, g_gan, g_dist = (stats / max(per_epoch, 1)).tolist()
        check_finite(d_loss + g_loss, f"{label} GAN epoch {epoch + 1}", "a lower --gan-lr")
        stage.report(epoch, f"D {d_loss:.3f} G {g_gan:.3f} dist {g_dist:.4f} sign(D real) {sign:+.2f} "
                     f"p {ada.p.item():.3f}")
    return stage.images_per_s()


def build_gan(args, data, model, device):
    """G, its EMA copy, D on the stage features (shapes probed on one image) or on the images, ADA."""
    fmap = torch.zeros(2, 3, data.image_size, data.image_size, device=device)
    fmap = fmap if args.arm == "image-replay" else stage_features(model.backbone.eval(), fmap, model.layer, True)[0]
    g = Generator(data.num_classes, data.image_size, args.g_channels, args.latent_dim, args.label_dim).to(device)
    d = FeatureDiscriminator(data.num_classes, fmap.shape[1], fmap.shape[2], args.d_width,
                             pixels=args.arm == "image-replay").to(device)
    return {"g": g, "g_ema": copy.deepcopy(g).eval().requires_grad_(False), "d": d,
            "ada": AdaptiveAugment(() if args.no_ada else ADA_OPS).to(device)}


def build_model(args, data, device):
    small = data.image_size <= 64 and args.backbone != "resnet32"  # official: 3x3 stem, no max-pool at 32 px
    backbone = create_backbone(args.backbone, small_input=small)
    if not hasattr(backbone, STAGES[args.feat_layer]):
        raise UserError(f"--backbone {args.backbone} has no {STAGES[args.feat_layer]} (--feat-layer "
                        f"{args.feat_layer}); use a ResNet")
    return to_channels_last(GeniferNet(backbone, STAGES[args.feat_layer]), device)


def bench_steps(args, device):
    """common.bench: task 1's steps (classifier with replay, D, D+R1, G) on generated inputs of the real shapes."""
    data = argparse.Namespace(num_classes=args.classes or SHAPES[args.dataset][0],
                              image_size=args.image_size or SHAPES[args.dataset][1])
    first, total = phase_splits(data.num_classes, args.base_classes, args.increment)[1]
    model = build_model(args, data, device)
    model.add_classes(first)
    gan, old_model = build_gan(args, data, model, device), copy.deepcopy(model).requires_grad_(False)
    model.add_classes(total - first)
    opt = torch.optim.RAdam(model.parameters(), lr=args.inc_lr, capturable=device.type == "cuda")
    bounds = (torch.full((1, 3, 1, 1), -2.0, device=device), torch.full((1, 3, 1, 1), 2.0, device=device))
    x, xg = (torch.randn(b, 3, data.image_size, data.image_size, device=device).contiguous(
        memory_format=torch.channels_last) for b in (args.batch_size, args.gan_batch_size))
    y, yg = (torch.randint(first, total, (b,), device=device) for b in (args.batch_size, args.gan_batch_size))
    z, prev_g = torch.randn(args.gan_batch_size, args.latent_dim, device=device), copy.deepcopy(gan["g_ema"])
    d_step, r1_step, g_step = make_gan_steps(gan, model.train(), prev_g, first, total, args, device)
    return [("classifier", make_classifier_step(model, old_model, prev_g, opt, first, bounds, args, device), opt,
             (x, y)), ("D", d_step, gan["opt_d"], (xg, yg, z, yg)), ("D+R1", r1_step, gan["opt_d"], (xg, yg, z, yg)),
            ("G", g_step, gan["opt_g"], (z, yg))]


# ----------------------------------------------------------------------------------------------- main
def run(args, shared_base=None):
    """One arm: all tasks -> the results dict (also in results.json), or None after --stop-after. `shared_base`:
    a pair's task 0 file (classifier, G, EMA G, D), loaded when its settings match."""
    t0, device, arm = time.time(), setup_device(args), arm_name(args)
    if args.memory_per_class != 0 or args.memory_total is not None:
        raise UserError("Genifer is exemplar-free: --memory-per-class must be 0 and --memory-total unset")
    if args.gan_batch_size % 2 or args.gan_batch_size < 2 or not 0 < args.replay_fraction < 1:
        raise UserError("--gan-batch-size must be even and --replay-fraction in (0, 1)")
    args.out_dir = args.out_dir or default_out_dir(f"genifer-{arm}", args)
    data, splits, order = load_protocol(args, device)
    if args.dataset == "cifar100":  # official constants.py
        data.mean, data.std = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (data.mean, data.std))
    bounds = ((0 - mean) / std, (1 - mean) / std)  # official: generated images clamped to the valid range
    seed_everything(args.seed)
    model = build_model(args, data, device)
    gan = None if args.arm in ("finetune", "lwf") else build_gan(args, data, model, device)
    if gan is not None and min(len(indices_of(data.train_y, a, b)) for a, b in splits) < args.gan_batch_size:
        raise UserError(f"--gan-batch-size {args.gan_batch_size} exceeds the training images of a task")
    # only now, the run folder: bad input has had its one-line error. An arm of a pair may reuse Genifer's task 0
    own_gan = args.arm == "image-replay" or args.no_ada  # a GAN of its own after Genifer's task-0 classifier
    ckpt = open_run(args, f"Genifer ({arm}): {args.dataset}, {len(splits) - 1} tasks after B{args.base_classes}",
                    None if own_gan else shared_base, ARM_KEYS)
    base_classifier = shared_classifier(args, shared_base) if own_gan and ckpt is None else None
    if ckpt is not None:
        model.add_classes(splits[ckpt["phase"]][1])
        model.load_state_dict(ckpt["model"])
        for k in GAN_PARTS if gan else ():
            gan[k].load_state_dict(ckpt["gan"][k])
    rows, start_phase = resume_point(ckpt)  # after the model's layers: restores the RNG state
    print(f"backbone {args.backbone}: {count_parameters(model.backbone):,} parameters" + ("" if gan is None else
          f"; generator {count_parameters(gan['g']):,}, discriminator {count_parameters(gan['d']):,}"))
    print(f"{'task':>5} {'classes':>7} {'CNN':>6} {'time':>7} {'img/s':>7} {'GAN img/s':>9}")

    for phase in range(start_phase, len(splits)):
        phase_start, (first, total), label = time.time(), splits[phase], f"task {phase}"
        old_model = copy.deepcopy(model).requires_grad_(False) if phase > 0 else None  # after the last task
        prev_g = copy.deepcopy(gan["g_ema"]).eval() if phase > 0 and gan is not None else None
        model.add_classes(total - first)
        train_idx = indices_of(data.train_y, first, total)  # exemplar-free: only this task's real images
        if phase == 0 and base_classifier is not None:  # trained as this arm would, on the same images
            model.load_state_dict(base_classifier)
            ips = 0.0
        else:
            ips = train_classifier(model, old_model, prev_g, data, train_idx, first, bounds, args, device, label)
        train_s, gan_ips, gan_s, replay_acc = time.time() - phase_start, 0.0, 0.0, None
        if gan is not None and phase < len(splits) - 1:  # the last task's GAN would never replay
            epochs = args.gan_epochs_first if phase == 0 else args.gan_epochs
            gan_ips = train_gan(gan, model, prev_g, data, train_idx, first, total, epochs, args, device, label)
            gan_s = time.time() - phase_start - train_s
            replay_acc = save_samples(gan["g_ema"], model.eval(), total, bounds, mean, std,
                                      os.path.join(args.out_dir, f"samples_task{phase}.png"))
        model.eval()
        result = evaluate(lambda x: model(x)[:2], data, splits, phase, device, None, args.workers)
        row = {"phase": phase, "known_classes": first, "total_classes": total, **result, "memory_size": 0,
               "train_s": train_s, "gan_s": gan_s, "phase_s": time.time() - phase_start, "train_img_per_s": ips,
               "gan_img_per_s": gan_ips, "ada_p": None if gan is None else gan["ada"].p.item(),
               "replay_acc": replay_acc}
        rows.append(row)
        print(f"{phase:>5} {total:>7} {row['cnn_acc']:>6.2f} {row['phase_s']:>6.0f}s {ips:>7.0f} {gan_ips:>9.0f}")
        gan_state = None if gan is None else {k: gan[k].state_dict() for k in GAN_PARTS}
        if end_phase(args, phase, rows, {"model": model.state_dict(), "gan": gan_state}, len(splits),
                     shared_base if gan and not own_gan else None, ARM_KEYS):  # Genifer writes task 0
            return None

    n = count_parameters(gan["g_ema"]) if gan else 0  # exemplar-free accounting: what the replay memory costs
    extra = {} if gan is None else {"generator_parameters": n, "generator_bytes": 4 * n, "discriminator_parameters":
             count_parameters(gan["d"]), "exemplars_in_generator_bytes": 4 * n // (3 * data.image_size ** 2)}
    return finish_run(args, "genifer", data, order, device, __file__, t0, results_from_rows(rows), arm=arm,
                      replay=gan is not None, ada=gan is not None and not args.no_ada, **extra)


def shared_classifier(args, shared_base):
    """The classifier of a pair's task-0 file, for an arm that trains its own GAN after it (image-replay, ada);
    None without the file (then the arm trains task 0 itself). Task 0's classifier does not depend on the arm."""
    if shared_base is None or not os.path.exists(shared_base):
        return None
    base = torch.load(shared_base, map_location="cpu", weights_only=True)
    ignored = set(ARM_KEYS) | {"no_ada"}
    if {k: v for k, v in base["base_key"].items() if k not in ignored} != \
            {k: v for k, v in base_key(args, ARM_KEYS).items() if k not in ignored}:
        raise UserError(f"{shared_base} was trained with other settings; delete it or choose another --out-dir")
    print(f"task 0's classifier shared with the Genifer arm: {shared_base}")
    return base["model"]


def arm_name(args):
    gan = args.arm in ("genifer", "image-replay")
    return args.arm.replace("-", "_") + "_no_ada" * (gan and args.no_ada) + "_no_gan_aug" * (gan and args.no_gan_aug)


def save_samples(g, model, num_classes, bounds, mean, std, path, per_class=8):
    """`path` (PNG): a row of `per_class` EMA-G images a replayed class, 1 px apart (z and noise from their own
    generator: the run's RNG is untouched). Returns the classifier's top-1 % on them (chance 100 / classes)."""
    rng, device = torch.Generator(mean.device).manual_seed(0), mean.device
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    with torch.no_grad():
        z = torch.randn(len(y), g.latent_dim, generator=rng, device=device)
        noise = g.sample_noise(len(y), device, rng)
        x = torch.cat([g(z[i:i + 256], y[i:i + 256], [n[i:i + 256] for n in noise]) for i in range(0, len(y), 256)])
        replay = torch.maximum(torch.minimum(x, bounds[1]), bounds[0])  # clamped as replayed (make_classifier_step)
        pred = torch.cat([model(replay[i:i + 256])[0].argmax(1) for i in range(0, len(y), 256)])
    if is_main():
        torchvision.utils.save_image((x * std + mean).clamp(0, 1), path, nrow=per_class, padding=1)
    return 100 * (pred == y).float().mean().item()


# the pair's name: arm A's overrides; arm B is Genifer, which runs first and writes task 0 (header)
PAIRS = {"finetune": dict(arm="finetune"), "lwf": dict(arm="lwf"), "image-replay": dict(arm="image-replay"),
         "ada": dict(no_ada=True), "gan-aug": dict(no_gan_aug=True)}
GENIFER = dict(arm="genifer", no_ada=False, no_gan_aug=False)


def run_paired(args):
    pairs = args.paired or list(PAIRS)
    out = args.out_dir or default_out_dir("genifer-paired" + "-".join([""] + args.paired), args)
    names = {p: arm_name(argparse.Namespace(**{**GENIFER, **PAIRS[p]})) for p in pairs}
    shared = os.path.join(out, "task0.pt")
    arms = run_arms(args, lambda a: run(a, shared),
                    [("genifer", GENIFER)] + [(names[p], {**GENIFER, **PAIRS[p]}) for p in pairs], out)
    for p in pairs if arms else ():
        os.makedirs(os.path.join(out, f"pair_{p}"), exist_ok=True)
        write_paired(os.path.join(out, f"pair_{p}"), {n: arms[n] for n in (names[p], "genifer")}, names[p],
                     extra_metrics=("generator_bytes",), paired=p, dataset=args.dataset, seed=args.seed)
    return arms


def main(argv=None):
    args = parse_args(argv)
    return run_paired(args) if args.paired is not None else run(args)


if __name__ == "__main__":
    run_main(main)
