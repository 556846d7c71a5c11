"""genifer.py: equalised-lr layers, generator and feature / pixel discriminator shapes, every ADA op against its
definition, the adaptive p, the EMA / ADA rule of shortened GAN runs, R1 against autograd, Genifer's, fine-tuning's
and LwF's losses against hand-computed values, the replays' per-batch crop/flip, stage_features' early stop, and one
shared smoke run of every pair (schema, shared task 0, exemplar-free accounting, the sample grids) plus stop +
--resume with the indices the loaders read. CPU."""
import contextlib
import io
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import genifer  # noqa: E402
from common.stop import Stopped  # noqa: E402

RESULT_KEYS = {"method", "finished", "args", "class_order", "normalization", "backbone", "memory_policy",
               "acc_per_phase", "nme_acc_per_phase", "avg_inc_acc", "last_acc", "forgetting", "nme_avg_inc_acc",
               "nme_last_acc", "nme_forgetting", "acc_matrix", "wall_s", "torch", "git_commit", "script_sha256"}


# ----------------------------------------------------------------------------------------------- layers, shapes
def test_equalised_lr_layers_scale_as_defined():
    torch.manual_seed(0)
    lin = genifer.EqualLinear(400, 300, bias_init=0.5, lr_mul=0.01)
    assert lin.weight.std().item() == pytest.approx(100, rel=0.02)       # stored N(0, 1/lr_mul^2)
    x = torch.randn(3, 400)
    want = x @ (lin.weight * 0.01 / 20).T + lin.bias * 0.01                 # lr_mul / sqrt(fan_in), bias * lr_mul
    assert torch.allclose(lin(x), want, atol=1e-5)
    conv = genifer.EqualConv2d(4, 5)
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * math.sqrt(2 / 36), conv.bias, padding=1), atol=1e-5)


def test_generator_and_discriminator_shapes():
    official = genifer.Generator(100, 32, latent_dim=8, label_dim=4)  # official 512/256/128/64 widths
    assert [c.conv.weight.shape[:2] for c in official.convs] == [(512, 512), (256, 512), (256, 256), (128, 256),
                                                                  (128, 128), (64, 128), (64, 64)]
    assert official.resolutions == [4, 4, 8, 8, 16, 16, 32] and official.const.shape == (1, 512, 4, 4)
    for size, channels in ((32, [8, 8, 4, 4]), (64, [8, 8, 4, 4, 4])):
        g = genifer.Generator(10, size, channels, latent_dim=6, label_dim=3)
        z, y = torch.randn(4, 6), torch.tensor([0, 3, 9, 2])
        assert g(z, y).shape == (4, 3, size, size)
        noise = g.sample_noise(4, "cpu")
        assert torch.equal(g(z, y, noise), g(z, y, noise))  # explicit noise: deterministic (G distillation)
    d = genifer.FeatureDiscriminator(100, 256, 8, width=512)
    convs = [m.weight.shape[0] for m in d.blocks if isinstance(m, genifer.EqualConv2d)]
    assert convs == [256, 256, 512, 512] and d.dense.weight.shape == (512, 512 * 2 * 2)  # official stage 4
    small = genifer.FeatureDiscriminator(7, 16, 16, width=8)  # 64 px: one more block, 16 -> 2
    assert small(torch.randn(4, 16, 16, 16), torch.tensor([0, 1, 2, 6])).shape == (4,)
    for flags, widths in (([], [512, 256, 128, 64]), (["--dataset", "tinyimagenet"], [512, 256, 128, 64, 32]),
                          (["--dataset", "tinyimagenet", "--image-size", "32"], [512, 256, 128, 64])):
        assert genifer.parse_args(flags + ["--device", "cpu"]).g_channels == widths  # official at 32 px, by size


@pytest.mark.parametrize("dataset,size", [("synthetic", 32), ("tinyimagenet", 64)])
def test_image_replay_discriminator_judges_images_of_the_datasets_shape(dataset, size):
    args = genifer.parse_args(["--dataset", dataset, "--arm", "image-replay", "--device", "cpu", "--latent-dim", "8",
                               "--label-dim", "4", "--g-channels", *["4"] * {32: 4, 64: 5}[size]])
    data = type("D", (), {"num_classes": 12, "image_size": size})
    model = genifer.build_model(args, data, "cpu")
    d = genifer.build_gan(args, data, model, "cpu")["d"]
    assert d(torch.randn(4, 3, size, size), torch.tensor([0, 1, 5, 11])).shape == (4,)
    convs = [m.weight.shape[:2] for m in d.blocks if isinstance(m, genifer.EqualConv2d)]
    official = [(128, 3), (128, 128), (256, 128), (256, 256), (512, 256), (512, 512), (512, 512)]  # stage0 prologue
    assert convs == (official if size == 32 else [(128, 3), (128, 128), (256, 128), (256, 256), (512, 256),
                                                  (512, 512), (512, 512), (512, 512), (512, 512)])
    assert d.conv.weight.shape[:2] == (512, 513) and d.dense.weight.shape == (512, 512 * 2 * 2)  # official epilogue


def test_minibatch_std_matches_its_definition():
    x = torch.randn(4, 3, 2, 2)
    out = genifer.minibatch_std(x, group_size=2)  # groups of 2 strided over the batch: (0, 2) and (1, 3)
    for members in ((0, 2), (1, 3)):
        std = x[list(members)].std(0, unbiased=False).mean()
        for i in members:
            assert torch.allclose(out[i, 3], std.expand(2, 2), atol=1e-4)
    assert torch.equal(out[:, :3], x)


# ----------------------------------------------------------------------------------------------- ADA
def image(n=64, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def augment(x, ops, p=1.0):
    ada = genifer.AdaptiveAugment(ops)
    ada.p.fill_(p)
    return ada(x)


def test_ada_is_identity_at_p0_and_differentiable():
    x = image(8).requires_grad_(True)
    assert torch.allclose(augment(x, genifer.ADA_OPS, 0.0), x, atol=1e-5)
    out = augment(x, genifer.ADA_OPS, 1.0)
    assert not torch.allclose(out, x, atol=1e-2)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ada_flips_and_quarter_turns_are_exact():
    torch.manual_seed(0)
    x = image()
    out = augment(x, ("xflip",))
    flipped = torch.tensor([torch.allclose(o, xi.flip(-1), atol=1e-4) for o, xi in zip(out, x)])
    same = torch.tensor([torch.allclose(o, xi, atol=1e-4) for o, xi in zip(out, x)])
    assert (flipped ^ same).all() and flipped.any() and same.any()
    out = augment(x, ("rotate90",))
    k_of = [[k for k in range(4) if torch.allclose(o, torch.rot90(xi, k, (1, 2)), atol=1e-4)] for o, xi in zip(out, x)]
    assert all(len(k) == 1 for k in k_of) and {k[0] for k in k_of} == {0, 1, 2, 3}


def test_ada_integer_translation_is_a_pixel_shift_up_to_an_eighth():
    torch.manual_seed(0)
    x = image(32)
    out = augment(x, ("xint",))  # 16 px: shifts in -2..2 pixels (0.125 * 16)
    shifts = []
    for o, xi in zip(out, x):
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.allclose(o[:, 3:-3, 3:-3], xi[:, 3 + dy:13 + dy, 3 + dx:13 + dx], atol=1e-4)]
        assert len(hits) == 1
        shifts.append(hits[0])
    assert len(set(shifts)) > 5


def test_ada_geometric_matrices_follow_their_definitions():
    torch.manual_seed(0)
    n = 256
    for op, check in (("scale", lambda m: torch.allclose(m[:, 0, 0], m[:, 1, 1]) and (m[:, 0, 1] == 0).all()),
                      ("aniso", lambda m: torch.allclose(m[:, 0, 0] * m[:, 1, 1], torch.ones(n))),
                      ("rotate", lambda m: torch.allclose(m[:, :2, :2] @ m[:, :2, :2].transpose(1, 2),
                                                          torch.eye(2).expand(n, 2, 2), atol=1e-5)),
                      ("xfrac", lambda m: torch.equal(m[:, :2, :2], torch.eye(2).expand(n, 2, 2)))):
        m = genifer.geometric_matrix(n, 1.0, (op,), 32, "cpu")
        assert check(m), op
        assert (m - torch.eye(3)).abs().amax((1, 2)).gt(1e-6).float().mean() > 0.3, op  # applied to many
    log_scale = torch.log2(genifer.geometric_matrix(4096, 1.0, ("scale",), 32, "cpu")[:, 0, 0])
    assert log_scale.std().item() == pytest.approx(0.2, rel=0.1)                 # 2^N(0, 0.2)
    shift = genifer.geometric_matrix(4096, 1.0, ("xfrac",), 32, "cpu")[:, 0, 2] / 2
    assert shift.std().item() == pytest.approx(0.125, rel=0.1)                   # N(0, 0.125) of the width
    # warp samples at mat @ output coordinates: an exact quarter turn and a one-pixel shift
    x = image(2, 8)
    quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    assert torch.allclose(genifer.warp(x, quarter), torch.rot90(x, 1, (2, 3)), atol=1e-5)
    shift1 = torch.tensor([[1.0, 0.0, 2 / 8], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    assert torch.allclose(genifer.warp(x, shift1)[..., :-1], x[..., 1:], atol=1e-5)


def test_ada_colour_ops_match_their_definitions():
    torch.manual_seed(0)
    x = image(64) * 0.5 + 0.6  # positive, so ratios are defined
    luma = x.mean(1, keepdim=True)
    out = augment(x, ("brightness",))
    diff = out - x
    assert torch.allclose(diff, diff[:, :1, :1, :1].expand_as(diff), atol=1e-5)  # one offset a sample
    assert diff[:, 0, 0, 0].std().item() == pytest.approx(0.2, rel=0.3)
    ratio = augment(x, ("contrast",)) / x
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-4)  # one factor a sample
    out = augment(x, ("lumaflip",))
    flipped = torch.tensor([torch.allclose(o, xi - 2 * xi.mean(0), atol=1e-5) for o, xi in zip(out, x)])
    same = torch.tensor([torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x)])
    assert (flipped ^ same).all() and flipped.any() and same.any()
    out = augment(x, ("hue",))  # rotation about the luma axis: luma and chroma norm kept, chroma turned
    assert torch.allclose(out.mean(1, keepdim=True), luma, atol=1e-5)
    assert torch.allclose((out - luma).norm(dim=1), (x - luma).norm(dim=1), atol=1e-4)
    assert not torch.allclose(out, x, atol=1e-2)
    out = augment(x, ("saturation",))  # chroma scaled by one factor a sample
    assert torch.allclose(out.mean(1, keepdim=True), luma, atol=1e-5)
    factor = (out - luma)[:, 0, 0, 0] / (x - luma)[:, 0, 0, 0]
    assert torch.allclose(out - luma, (x - luma) * factor[:, None, None, None], atol=1e-4)


def test_adaptive_p_moves_toward_the_target_and_stays_in_range():
    ada = genifer.AdaptiveAugment()
    step = 4 / 4000
    ada.adjust(torch.tensor(0.9), 0.5, 4, 4, 0.5)  # D overfits (E[sign D(real)] > target): more augmentation
    assert ada.p.item() == pytest.approx(step)
    ada.adjust(torch.tensor(0.1), 0.5, 4, 4, 0.5)
    ada.adjust(torch.tensor(0.1), 0.5, 4, 4, 0.5)
    assert ada.p.item() == 0.0                      # clipped at 0
    ada.p.fill_(0.4999)
    ada.adjust(torch.tensor(1.0), 0.5, 4, 4, 0.5)
    assert ada.p.item() == pytest.approx(0.5)       # clipped at --ada-max


# ----------------------------------------------------------------------------------------------- losses
def test_r1_penalty_matches_autograd_on_toy_discriminators():
    w = torch.randn(3, 2, 2, requires_grad=True)
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    penalty = genifer.r1_penalty((x * w).sum((1, 2, 3)), x)  # grad_x = w for every sample
    assert penalty.item() == pytest.approx(w.square().sum().item(), rel=1e-5)
    grad_w, = torch.autograd.grad(penalty, w)
    assert torch.allclose(grad_w, 2 * w)                   # differentiable in D's parameters (create_graph)
    quad = genifer.r1_penalty((x ** 2).sum((1, 2, 3)), x)  # grad_x = 2x
    assert quad.item() == pytest.approx((4 * x.detach() ** 2).sum((1, 2, 3)).mean().item(), rel=1e-5)


def test_classifier_loss_terms_match_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, -1.0], [1.0, 2.0, 3.0]])  # rows 0-1 replayed, row 2 new
    old_logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    fmap, old_fmap = torch.zeros(3, 2, 1, 1), torch.zeros(3, 2, 1, 1)
    fmap[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    fmap[2] = 100.0  # a new sample: not distilled
    ce, kd, feat = genifer.classifier_losses(logits, old_logits, fmap, old_fmap, torch.tensor([2]), 2, 2)
    assert ce.item() == pytest.approx(-math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3))), abs=1e-6)
    kd_rows = []
    for z, t in ((logits[0].tolist(), old_logits[0].tolist()), (logits[1].tolist(), old_logits[1].tolist())):
        lse = math.log(sum(math.exp(v) for v in z))  # log-softmax over all 3 classes, then the 2 old ones
        q = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
        kd_rows.append(-sum(qi * (zi - lse) for qi, zi in zip(q, z[:2])))
    assert kd.item() == pytest.approx(sum(kd_rows) / 2, abs=1e-6)
    assert feat.item() == pytest.approx((5.0 + 0.0) / 2)  # ||(3, 4)|| = 5 and 0, mean over replayed


def test_lwf_losses_match_hand_computed_values():
    """FACIL lwf.py without exemplars: CE over the new classes only; KD over the old classes at T = 2 with FACIL's
    eps = 1e-5 smoothing of the student's probabilities."""
    # classes 0-1 old, 2-3 new; row 2: the student gives class 1 e^-20, where FACIL's eps decides the KD term
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 1.0, -1.0, 3.0], [20.0, -20.0, 0.0, 0.0]])
    old_logits = torch.tensor([[1.0, 0.0, 9.0, 9.0], [0.0, 2.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]])  # new columns unused
    y = torch.tensor([2, 3, 2])
    ce, kd = genifer.lwf_losses(logits, old_logits, y, 2, temperature=2.0)
    want_ce = [-math.log(math.exp(1) / (math.exp(1) + math.exp(-1))), -math.log(math.exp(3) / (math.exp(-1) +
                                                                                               math.exp(3))),
               math.log(2)]
    assert ce.item() == pytest.approx(sum(want_ce) / 3, abs=1e-6)
    rows = []
    for z, t in zip(logits[:, :2].tolist(), old_logits[:, :2].tolist()):
        q = [math.exp(v / 2) / sum(math.exp(u / 2) for u in z) + 1e-5 / 2 for v in z]
        q = [v / sum(q) for v in q]
        p = [math.exp(v / 2) / sum(math.exp(u / 2) for u in t) for v in t]
        rows.append(-sum(pi * math.log(qi) for pi, qi in zip(p, q)))
    assert kd.item() == pytest.approx(sum(rows) / 3, rel=1e-5)


def tiny_args(*flags):
    return genifer.parse_args(["--smoke", "--device", "cpu", *flags])


@pytest.mark.parametrize("arm,flags", [("genifer", []), ("genifer", ["--no-gan-aug"]), ("finetune", []), ("lwf", [])])
def test_step_total_is_the_weighted_sum_of_its_terms(arm, flags, monkeypatch):
    torch.manual_seed(0)
    args = tiny_args("--arm", arm, *flags)
    crops = []  # the replays' crop and flip: once a batch (crop_flip_batch), none with --no-gan-aug
    monkeypatch.setattr(genifer, "crop_flip_batch", lambda x, f=genifer.crop_flip_batch: crops.append(len(x)) or f(x))
    data = type("D", (), {"num_classes": 20, "image_size": 32})
    model = genifer.build_model(args, data, "cpu")
    model.add_classes(3)
    old_model = __import__("copy").deepcopy(model).requires_grad_(False)
    model.add_classes(2)
    prev_g = genifer.build_gan(args, data, model, "cpu")["g_ema"] if arm == "genifer" else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    bounds = (torch.full((1, 3, 1, 1), -2.0), torch.full((1, 3, 1, 1), 2.0))
    step = genifer.make_classifier_step(model, old_model, prev_g, optimizer, 3, bounds, args, torch.device("cpu"))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(3, 5, (8,))
    model.train()
    old_model.train(arm != "lwf")  # as train_classifier: FACIL's LwF runs the old model in eval mode
    head = model.head.weight.detach().clone()
    if arm != "genifer":  # the losses on the real batch, by hand, before the step changes the model
        with torch.no_grad():
            logits, old_logits = model(x)[0], old_model(x)[0]
        want = [F.cross_entropy(logits, y).item(), 0.0] if arm == "finetune" else \
            [t.item() for t in genifer.lwf_losses(logits, old_logits, y, 3, 2.0)]
    loss, ce, kd, feat, _ = step(x, y).tolist()
    assert crops == ([4] if arm == "genifer" and not flags else [])
    if arm == "genifer":
        assert loss == pytest.approx(0.02 * ce + 0.98 * kd + 1.0 * feat, rel=1e-5) and kd > 0 and feat >= 0
    else:
        assert [ce, kd, feat] == pytest.approx(want + [0.0], rel=1e-4, abs=1e-7) and loss == pytest.approx(ce + kd)
        assert arm == "finetune" or kd > 0
    # LwF: the old classes' rows of the head get no gradient (FACIL: old heads out of the optimiser); the others do
    changed = (model.head.weight.detach() - head).abs().sum(1) > 0
    assert changed.tolist() == ([False] * 3 if arm == "lwf" else [True] * 3) + [True] * 2


def test_classifier_step_learns_a_fixed_batch():
    """Task 0's step (SGD Nesterov, as train_classifier) fits a fixed batch: the end-to-end runs below are too short
    for BatchNorm's running statistics to show learning on the test set."""
    torch.manual_seed(0)
    args = tiny_args("--image-size", "16", "--g-channels", "8", "8", "4")
    model = genifer.build_model(args, type("D", (), {"num_classes": 6, "image_size": 16}), "cpu")
    model.add_classes(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True)
    step = genifer.make_classifier_step(model.train(), None, None, optimizer, 0, None, args, torch.device("cpu"))
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 2
    losses = [step(x, y)[0].item() for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]


def test_replays_are_cropped_and_flipped_once_per_batch():
    """As torchvision's RandomCrop(32, 4, edge) + RandomHorizontalFlip on a 4-D tensor: one offset and one flip."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    seen = set()
    for _ in range(40):
        out = genifer.crop_flip_batch(x)
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                if torch.equal(out, (lambda c: c.flip(-1) if f else c)(padded[..., dy:dy + 8, dx:dx + 8]))]
        assert len(hits) >= 1  # every sample of the batch: the same crop and flip
        seen.add(hits[0])
    assert len(seen) > 20


def ema_weights(steps, horizon, ramp, batch=64):
    """The final EMA generator as a mixture of the generators after each step: weights over steps 1..steps."""
    beta = torch.tensor([genifer.ema_beta(d, batch, horizon, ramp) for d in range(steps)], dtype=torch.float64)
    later = torch.cat([torch.flip(torch.cumprod(torch.flip(beta, [0]), 0), [0])[1:], torch.ones(1, dtype=torch.float64)])
    return (1 - beta) * later


def test_ema_and_ada_rule_of_shortened_gan_runs():
    """At the official length the rule gives the official EMA half-life, ramp and ADA speed; at a tenth of it the
    EMA generator's weight centre of mass (a fraction of the run) stays within 0.05 of the full-length one, where
    the official values unscaled would move it."""
    args = genifer.parse_args(["--device", "cpu"])  # official CIFAR-100 settings
    horizon, ramp, ksteps, s = genifer.gan_schedule(args, 642, 25000, later=False)
    assert (horizon, ksteps, s) == (500_000, 4, 1.0)
    assert ramp == pytest.approx(500_000 / (64 * 642 / 4 * 782))  # official ema_rampup, loader of 32: 782 batches
    assert genifer.gan_schedule(args, 1026, 5000, later=True)[::2] == (500_000, 4)

    def centre(epochs, scaled=True):
        steps = epochs * (25000 // 64)
        h, r = genifer.gan_schedule(args, epochs, 25000, later=False)[:2] if scaled else (500_000, 500_000 / (
            64 * epochs / 4 * 782))
        w = ema_weights(steps, h, r)
        return (w * torch.arange(1, steps + 1) / steps).sum().item() / w.sum().item(), w
    full, _ = centre(642)
    tenth, _ = centre(64)
    assert abs(tenth - full) < 0.05 and 0.9 < full < 1.0  # the trained generator, late in the run
    unscaled, w = centre(64, scaled=False)
    assert abs(unscaled - full) > 0.05
    w = ema_weights(5 * 390, 500_000, 500_000 / (64 * 5 / 4 * 782))  # 1,950 steps unscaled: 80 % on the first tenth
    assert w[:195].sum() / w.sum() > 0.75
    assert genifer.gan_schedule(args, 64, 25000, later=False)[2] == pytest.approx(4 * 64 * 390 / 250_380)


def test_stage_features_stop_at_the_asked_stage():
    from common.models import create_backbone, stage_features
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", small_input=True).eval()
    calls = []
    backbone.layer4.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = stage_features(backbone, x, "layer3")[0]
        assert len(calls) == 1
        fmap, pooled = stage_features(backbone, x, "layer3", stop=True)
        assert len(calls) == 1 and pooled is None and torch.equal(fmap, full)
        expected = backbone.layer3(backbone.layer2(backbone.layer1(backbone.act1(backbone.bn1(backbone.conv1(x))))))
        assert torch.allclose(fmap, expected, atol=1e-6)


def test_sample_grid_has_a_row_a_class_and_the_classifier_scores_it(tmp_path):
    """save_samples: row c of the PNG holds class c's images (8 of them, 1 px apart), and the returned top-1 % is the
    classifier's on those images, clamped to the valid range as replays are."""
    class ClassImages(torch.nn.Module):  # a G whose images are class / 10 at every pixel, whatever z and noise
        latent_dim = 2

        def sample_noise(self, n, device, generator=None):
            return [torch.randn(n, 1, 4, 4, generator=generator)]

        def forward(self, z, y, noise):
            return (y.float() / 10).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)

    def classifier(x):  # reads the class off the pixels, except that it calls class 1 class 0
        read = (x[:, 0, 0, 0] * 10).round().long()
        return F.one_hot(torch.where(read == 1, 0, read), 3).float(), None
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    acc = genifer.save_samples(ClassImages(), classifier, 3, (zero, one), zero, one, tmp_path / "g.png")
    assert acc == pytest.approx(200 / 3)
    from PIL import Image
    with Image.open(tmp_path / "g.png") as im:
        grid = torch.tensor(__import__("numpy").asarray(im.convert("L")))
    assert grid.shape == (3 * 5 + 1, 8 * 5 + 1)
    for c in range(3):
        assert (grid[1 + 5 * c:5 + 5 * c, 1:5] == round(255 * c / 10)).all()


def test_bench_runs_every_genifer_step():
    from common.bench import main as bench
    rows = bench(["--scripts", "genifer", "--steps", "1", "--warmup", "1", "--device", "cpu", "--batch-size", "4",
                  "--script-flags=--smoke --gan-batch-size 4 --image-size 16 --g-channels 8 8 4"])
    assert [r[0] for r in rows] == ["genifer classifier", "genifer D", "genifer D+R1", "genifer G"]
    assert all(r[2] > 0 for r in rows)


# ----------------------------------------------------------------------------------------------- end to end
def check_schema(res, arm):
    assert RESULT_KEYS <= set(res) and res["finished"] and res["method"] == "genifer" and res["arm"] == arm
    assert len(res["acc_per_phase"]) == len(SPLITS) and [len(r) for r in res["acc_matrix"]] == [1, 2, 3]
    assert res["avg_inc_acc"] == pytest.approx(sum(res["acc_per_phase"]) / 3)
    assert res["nme_acc_per_phase"] is None and res["nme_avg_inc_acc"] is None  # exemplar-free: no NME
    assert res["memory_policy"].startswith("none") and res["args"]["seed"] == 1212


# the smoke protocol shrunk to seconds: 6 of its classes at 16 px, B2 then 2 tasks of 2, one epoch, a 3-resolution G
TINY = ["--classes", "6", "--base-classes", "2", "--increment", "2", "--image-size", "16", "--g-channels", "8", "8",
        "4", "--batch-size", "16", "--epochs", "1", "--milestones", "1", "--device", "cpu"]
SPLITS = [(0, 2), (2, 4), (4, 6)]
PAIR_ARMS = {"finetune": "finetune", "lwf": "lwf", "image-replay": "image_replay", "ada": "genifer_no_ada",
             "gan-aug": "genifer_no_gan_aug"}


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    """One run of every pair: Genifer once, then the five other arms (three of them on Genifer's task 0). In this
    process: a subprocess would spend more on importing torch than on the run."""
    out = tmp_path_factory.mktemp("genifer") / "pair"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        genifer.main(["--smoke", "--paired", *TINY, "--out-dir", str(out)])
    return out, stdout.getvalue()


def test_smoke_paired_every_pair_against_genifer(paired_run):
    out, stdout = paired_run
    arms = {a: json.load(open(out / a / "results.json")) for a in ["genifer", *PAIR_ARMS.values()]}
    for arm, res in arms.items():
        check_schema(res, arm)
        assert res["replay"] == (arm not in ("finetune", "lwf")) and res["ada"] == (res["replay"] and "ada" not in arm)
    for pair, arm in PAIR_ARMS.items():
        paired = json.load(open(out / f"pair_{pair}" / "paired.json"))
        assert paired["paired"] == pair and paired["baseline"] == arm and set(paired["arms"]) == {arm, "genifer"}
        assert paired["difference"]["genifer"]["avg_inc_acc"] == pytest.approx(
            arms["genifer"]["avg_inc_acc"] - arms[arm]["avg_inc_acc"])
        # task 0 loaded from Genifer's (its row, timings included) where the arm keeps it; the others change the
        # GAN trained after task 0 and train their own on Genifer's task-0 classifier (loaded, not trained again)
        task0 = [json.loads(next(open(out / a / "metrics.jsonl"))) for a in (arm, "genifer")]
        assert (task0[0] == task0[1]) == (pair in ("finetune", "lwf", "gan-aug"))
        assert task0[0]["cnn_acc_per_task"] == task0[1]["cnn_acc_per_task"]
        assert (task0[0]["train_img_per_s"] == 0) == (pair in ("image-replay", "ada"))
    g = arms["genifer"]
    assert g["generator_bytes"] == 4 * g["generator_parameters"] > 0
    assert g["exemplars_in_generator_bytes"] == g["generator_bytes"] // (16 * 16 * 3)
    rows = [json.loads(line) for line in open(out / "genifer" / "metrics.jsonl")]
    assert rows[0]["gan_img_per_s"] > 0 and rows[1]["gan_img_per_s"] > 0 and rows[2]["gan_s"] == 0  # none after last
    assert all(r["memory_size"] == 0 for r in rows) and 0 <= rows[1]["ada_p"] <= 0.5
    assert all(0 <= r["replay_acc"] <= 100 for r in rows[:2]) and rows[2]["replay_acc"] is None
    assert "GAN epoch" in stdout and "img/s" in stdout
    ckpt = torch.load(out / "genifer" / "checkpoint.pt", weights_only=False)
    assert set(ckpt["gan"]) == {"g", "g_ema", "d", "ada"}
    assert json.load(open(out / "pair_lwf" / "paired.json"))["arms"]["genifer"]["generator_bytes"] == \
        g["generator_bytes"]
    from PIL import Image
    for arm, tasks in (("genifer", (0, 1)), ("image_replay", (0, 1)), ("genifer_no_gan_aug", (1,)), ("lwf", ())):
        assert sorted(p.name for p in (out / arm).glob("samples_task*.png")) == [f"samples_task{t}.png" for t in tasks]
        for t in tasks:  # a row of 8 images of 16 px, 1 px apart, a class the generator replays (2 after task 0, 4
            with Image.open(out / arm / f"samples_task{t}.png") as im:  # after task 1)
                assert im.size == (8 * 17 + 1, SPLITS[t][1] * 17 + 1) and im.mode == "RGB"


def test_resume_matches_and_no_old_real_image_is_read(paired_run, tmp_path, monkeypatch):
    """Resume from task 0 (the pair's shared task-0 checkpoint), stop (as by SIGTERM) inside task 1's GAN
    training, --resume: the numbers of the paired run's Genifer arm. Every batch the classifier and GAN loaders
    draw holds only the current task's classes, tasks in order (exemplar-free)."""
    out = tmp_path / "resumed"
    out.mkdir()
    state = torch.load(paired_run[0] / "task0.pt", weights_only=False)
    state["args"]["out_dir"] = str(out)
    torch.save(state, out / "checkpoint.pt")
    seen = []

    def recording(loader):
        def wrapped(data, indices, *a, **k):
            seen.append(data.train_y[indices.cpu()])
            return loader(data, indices, *a, **k)
        return wrapped
    monkeypatch.setattr(genifer, "train_batches", recording(genifer.train_batches))  # classifier and GAN loaders
    flags = ["--smoke", *TINY, "--out-dir", str(out)]
    with pytest.raises(genifer.UserError):
        genifer.main(flags)  # an unfinished run is never overwritten without --resume
    # task 1: classifier 1 epoch x 3 steps (48 images, batch 16), GAN 1 epoch x 3 steps (batch 16)
    with pytest.raises(Stopped, match="in task 1 GAN, epoch 1 after step 2"):
        genifer.main(flags + ["--resume", "--checkpoint-minutes", "0", "--stop-after-steps", "5"])
    assert (out / "in_phase.pt").exists() and not (out / "results.json").exists()
    res = genifer.main(flags + ["--resume"])
    ref = json.load(open(paired_run[0] / "genifer" / "results.json"))
    assert res["acc_matrix"] == ref["acc_matrix"]
    assert [r["ada_p"] for r in map(json.loads, open(out / "metrics.jsonl"))] == \
        [r["ada_p"] for r in map(json.loads, open(paired_run[0] / "genifer" / "metrics.jsonl"))]
    tasks = []
    for labels in seen:
        task = [t for t, (a, b) in enumerate(SPLITS) if ((labels >= a) & (labels < b)).all()]
        assert len(task) == 1 and len(labels) > 0
        tasks.append(task[0])
    assert tasks == sorted(tasks) and set(tasks) == {1, 2}
