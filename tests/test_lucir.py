"""lucir.py: the cosine classifier and the three losses against hand-computed values, smoke, resume, bad input."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import synthetic
from conftest import run_script
import lucir
from lucir import (CosineClassifier, LUCIRNet, adaptive_lambda, imprint_weights, less_forget_loss,
                   margin_ranking_loss)


def test_cosine_classifier_logits():
    clf = CosineClassifier(2)
    clf.add_classes(1)
    clf.add_classes(1)
    with torch.no_grad():
        clf.heads[0].copy_(torch.tensor([[3.0, 4.0]]))
        clf.heads[1].copy_(torch.tensor([[0.0, 2.0]]))
        clf.sigma.fill_(2.0)
    logits = clf(torch.tensor([[5.0, 0.0], [1.0, 1.0]]))
    # Eq. 4: eta * cos(theta, f): [0.6, 0] for f = (1, 0); [0.7/sqrt(0.5)... ] for f = (1, 1)/sqrt(2)
    expected = 2 * torch.tensor([[0.6, 0.0], [(0.6 + 0.8) / math.sqrt(2), 1 / math.sqrt(2)]])
    assert torch.allclose(logits, expected, atol=1e-6)
    assert clf.num_classes == 2


def test_less_forget_loss_hand_computed():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    old = torch.tensor([[0.0, 3.0], [2.0, 2.0]])
    assert less_forget_loss(f, old).item() == pytest.approx((1.0 + 0.0) / 2)  # Eq. 6: 1 - cos, batch mean


def test_margin_ranking_loss_hand_computed():
    cosine = torch.tensor([[0.9, 0.1, 0.3, 0.6],     # old sample (class 0): max(0.5-0.9+0.6,0)+max(0.5-0.9+0.3,0)=0.2
                           [0.0, 0.0, 0.9, 0.8],     # new-class sample: not used
                           [0.2, 0.4, 0.5, -0.1]])   # old sample (class 1): 0.6 + 0.0
    targets = torch.tensor([0, 3, 1])
    loss = margin_ranking_loss(cosine, targets, num_old=2, margin=0.5, k=2)
    assert loss.item() == pytest.approx((0.2 + 0.6) / (2 * 2))  # averaged over (#old samples x K) pairs
    assert margin_ranking_loss(cosine, torch.tensor([2, 3, 3]), 2, 0.5, 2).item() == 0.0  # no old sample


def test_adaptive_lambda_directions():
    assert adaptive_lambda(5, 50, 10) == pytest.approx(5 * math.sqrt(5))            # official code: sqrt(old/new)
    assert adaptive_lambda(5, 90, 10) == pytest.approx(15.0)                       # papers.md 1.1: last phase, 15
    assert adaptive_lambda(5, 50, 10, "paper") == pytest.approx(5 * math.sqrt(0.2))


def test_imprinting_sets_normalised_class_means_scaled_to_old_norm():
    class MeanColour(nn.Module):
        num_features = 3

        def forward(self, x):
            return x.mean(dim=(2, 3))
    data = synthetic(num_classes=4, train_per_class=5, test_per_class=1)
    model = LUCIRNet(MeanColour())
    model.classifier.add_classes(2)
    model.classifier.add_classes(2)
    with torch.no_grad():
        model.classifier.heads[0].copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))  # mean norm 2
    imprint_weights(model, data, 2, 4, torch.device("cpu"))
    for c in (2, 3):
        x = torch.stack([(data.train_x[i].permute(2, 0, 1).float() / 255 - 0.5) / 0.25
                         for i in range(len(data.train_y)) if data.train_y[i] == c])
        feats = x.mean(dim=(2, 3))
        mean = (feats / feats.norm(dim=1, keepdim=True)).mean(0)
        assert torch.allclose(model.classifier.heads[1][c - 2], 2 * mean / mean.norm(), atol=1e-5)


RESULT_KEYS = {"method", "finished", "args", "class_order", "normalization", "backbone", "memory_policy",
               "acc_per_phase", "nme_acc_per_phase", "avg_inc_acc", "last_acc", "forgetting", "acc_matrix",
               "wall_s", "torch", "device", "git_commit", "script_sha256"}


class TinyBackbone(nn.Module):
    """Mean colour -> linear -> BN: a backbone with weights and BN statistics, fast on CPU."""
    num_features = 4

    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.linear(x.mean(dim=(2, 3))))


def tiny_models(num_old=4, num_new=2):
    torch.manual_seed(0)
    model = LUCIRNet(TinyBackbone())
    model.classifier.add_classes(num_old)
    old_model = LUCIRNet(TinyBackbone()).eval().requires_grad_(False)
    old_model.classifier.add_classes(num_old)
    model.classifier.add_classes(num_new)
    model.classifier.heads[0].requires_grad_(False)
    return model, old_model


def test_make_step_loss_is_the_sum_of_the_script_losses():
    """Eq. 9 as make_step assembles it, against the script's own loss functions with non-default flags (a flag
    that is parsed but ignored, a wrong lambda or wrong counts would show)."""
    args = lucir.parse_args(["--smoke", "--device", "cpu", "--mr-weight", "0.7", "--margin", "0.3", "--k-hard", "1"])
    model, old_model = tiny_models()
    x = torch.randn(8, 3, 4, 4)
    y = torch.tensor([0, 1, 4, 5, 2, 5, 4, 3])  # old samples (< 4) and new ones
    model.train()
    with torch.no_grad():
        features = model.backbone(x)
        cosine = model.classifier.cosine(features)
        expected = (F.cross_entropy(model.classifier.sigma * cosine, y)
                    + 2.5 * less_forget_loss(features, old_model.backbone(x))
                    + 0.7 * margin_ranking_loss(cosine, y, 4, 0.3, 1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss, correct = lucir.make_step(model, old_model, optimizer, 4, 2.5, args, torch.device("cpu"))(x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert margin_ranking_loss(cosine, y, 4, 0.3, 1).item() > 0 and expected.item() != pytest.approx(
        (F.cross_entropy(model.classifier.sigma * cosine, y) + 2.5 * less_forget_loss(features, old_model.backbone(x))
         + 0.7 * margin_ranking_loss(cosine, y, 4, 0.5, 2)).item())  # the flags change the value


def test_ablation_arms_switch_off_exactly_their_terms():
    """The ladder of Fig. 7(a) on one fixed batch: CN = CE + the code's score mimicking (no Eq. 6, no Eq. 8), CN + LC
    = CE + Eq. 6, CN + LC + IS = CE + Eq. 6 + Eq. 8; each term is non-zero here, so a term left on or off shows."""
    model, old_model = tiny_models()
    x, y = torch.randn(8, 3, 4, 4), torch.tensor([0, 1, 4, 5, 2, 5, 4, 3])
    model.train()
    with torch.no_grad():
        features = model.backbone(x)
        cosine = model.classifier.cosine(features)
        ce = F.cross_entropy(model.classifier.sigma * cosine, y)
        lf = less_forget_loss(features, old_model.backbone(x))
        mr = margin_ranking_loss(cosine, y, 4, 0.5, 2)
        old_cosine = old_model.classifier.cosine(old_model.backbone(x))
        ms = ((cosine[:, :4] - old_cosine) ** 2).mean() * 4  # official: MSELoss(old scores) x old classes
    assert min(lf.item(), mr.item(), ms.item()) > 1e-3
    expected = {"cn": ce + 0.5 * ms, "cn_lc": ce + 2.5 * lf, "cn_lc_is": ce + 2.5 * lf + mr}
    for arm, overrides in lucir.LADDER:
        flags = ["--smoke", "--device", "cpu", "--ms-weight", "0.5"] + [
            f"--{k.replace('_', '-')}" for k, on in overrides.items() if on]
        args = lucir.parse_args(flags)
        assert lucir.arm_of(args) == arm
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        loss, _ = lucir.make_step(model, old_model, optimizer, 4, 2.5, args, torch.device("cpu"))(x, y)
        assert loss.item() == pytest.approx(expected[arm].item(), rel=1e-6), arm


def test_nme_view_is_the_official_one_only_where_a_paper_number_depends_on_it():
    view = lambda *flags: lucir.parse_args(["--device", "cpu", *flags]).nme_view  # noqa: E731
    assert view() == "channels"                                   # CIFAR-100: the official CIFAR code's view
    assert view("--dataset", "imagenet100") == "none"             # the ImageNet code: no second view
    assert view("--dataset", "tinyimagenet") == "hflip"           # not in the paper: the intended mirror
    assert view("--classes", "50") == view("--image-size", "16") == "hflip"   # a CIFAR-100 subset
    assert view("--classes", "50", "--nme-view", "channels") == "channels"  # an explicit flag wins


def test_ablation_ladder_smoke_shares_the_base_phase(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ladder"
    done = run_script("lucir.py", "--smoke", "--paired", "ablation", "--epochs", "2", "--milestones", "1",
                      "--no-cbf", "--out-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("base phase shared with the other arm") == 2  # cn trains it, cn_lc and cn_lc_is load it
    paired = json.loads((out / "paired.json").read_text())
    assert paired["versus"] == {"cn_lc": "cn", "cn_lc_is": "cn_lc"}      # each rung minus the one below
    arms = paired["arms"]
    assert paired["difference"]["cn_lc_is"]["avg_inc_acc"] == pytest.approx(
        arms["cn_lc_is"]["avg_inc_acc"] - arms["cn_lc"]["avg_inc_acc"])
    rows = {arm: [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()]
            for arm in arms}
    assert rows["cn"][0]["cnn_acc_per_task"] == rows["cn_lc"][0]["cnn_acc_per_task"] == \
        rows["cn_lc_is"][0]["cnn_acc_per_task"]
    assert rows["cn"][1]["lambda"] == 0.0 and rows["cn_lc"][1]["lambda"] > 0
    base = torch.load(out / "base_phase.pt", weights_only=True)["model"]["classifier.heads.0"]
    heads = {arm: torch.load(out / arm / "checkpoint.pt", weights_only=True)["model"]["classifier.heads.0"]
             for arm in arms}
    assert not torch.equal(heads["cn"], base)                                  # CN trains the old embeddings
    assert torch.equal(heads["cn_lc"], base) and torch.equal(heads["cn_lc_is"], base)  # LC freezes them (lr 0)


def test_cbf_trains_the_heads_only_without_backbone_gradients():
    """CBF (Sec. 3.5, official ft_flag=2): heads change; backbone weights, BN statistics and sigma do not, and no
    backbone gradient is even computed."""
    args = lucir.parse_args(["--smoke", "--device", "cpu", "--cbf-epochs", "2", "--cbf-lr", "0.5"])
    data = synthetic(num_classes=6, train_per_class=4, test_per_class=1)
    model, old_model = tiny_models()
    memory = {c: torch.nonzero(data.train_y == c).flatten()[:2] for c in range(6)}
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    heads_before = [h.detach().clone() for h in model.classifier.heads]
    sigma_before = model.classifier.sigma.item()
    grads = []
    for p in model.backbone.parameters():
        p.register_hook(lambda g: grads.append(g))
    lucir.class_balanced_finetuning(model, old_model, data, memory, 4, 2.0, args, torch.device("cpu"), 1)
    assert grads == [] and all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, model.classifier.heads))  # old heads too
    assert model.classifier.sigma.item() == sigma_before
    assert all(p.requires_grad for p in model.backbone.parameters())  # the next phase trains the backbone again


def test_smoke_end_to_end_and_resume(tmp_path, monkeypatch):
    # one thread: six short runs stay fast on a shared 2-core machine (OpenMP threads spin under contention)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    full, part = tmp_path / "full", tmp_path / "part"
    done = run_script("lucir.py", "--smoke", "--out-dir", str(full))
    assert done.returncode == 0, done.stderr
    results = json.loads((full / "results.json").read_text())
    assert RESULT_KEYS <= set(results) and results["finished"]
    assert len(results["acc_per_phase"]) == 3 and len(results["acc_matrix"][2]) == 3
    assert results["nme_acc_per_phase"][0] > 50          # the synthetic classes are easy: learning happened
    assert results["acc_per_phase"][-1] > 30             # CNN on 20 classes (chance 5%), all losses on
    assert results["avg_inc_acc"] == pytest.approx(sum(results["acc_per_phase"]) / 3)
    assert len((full / "metrics.jsonl").read_text().splitlines()) == 3

    first = run_script("lucir.py", "--smoke", "--out-dir", str(part), "--stop-after", "0")
    assert first.returncode == 0, first.stderr
    assert not (part / "results.json").exists() and (part / "checkpoint.pt").exists()
    phase0 = torch.load(part / "checkpoint.pt", weights_only=False)
    again = run_script("lucir.py", "--smoke", "--out-dir", str(part))   # no --resume: refused, nothing touched
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_script("lucir.py", "--smoke", "--out-dir", str(part), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after phase 0" in resumed.stdout
    resumed_results = json.loads((part / "results.json").read_text())
    for key in ("acc_per_phase", "nme_acc_per_phase", "acc_matrix", "nme_acc_matrix"):
        assert resumed_results[key] == results[key], key                  # bit-identical on CPU
    assert (part / "metrics.jsonl").read_text().count("\n") == 3

    finished = run_script("lucir.py", "--smoke", "--out-dir", str(full))  # a finished run is not overwritten
    assert finished.returncode == 2 and "finished run" in finished.stderr
    changed = run_script("lucir.py", "--smoke", "--out-dir", str(part), "--resume", "--lr", "0.5")
    assert changed.returncode == 2 and "lr" in changed.stderr
    assert results["graph"] is False                                      # CPU: eager

    # a pair of arms that differ only in an incremental-phase setting (Fig. 8: adaptive weight off): the phase-0
    # checkpoints are identical, phase 1 differs (the flag reaches the training step)
    arm = tmp_path / "arm"
    flags = ["lucir.py", "--smoke", "--no-adaptive-lambda", "--out-dir", str(arm)]
    assert run_script(*flags, "--stop-after", "0").returncode == 0  # a subprocess, as `part`: the same threads
    arm0 = torch.load(arm / "checkpoint.pt", weights_only=False)
    assert arm0["phase"] == phase0["phase"] == 0 and arm0["model"].keys() == phase0["model"].keys()
    assert all(torch.equal(arm0["model"][k], phase0["model"][k]) for k in phase0["model"])
    assert all(torch.equal(arm0["memory"][c], phase0["memory"][c]) for c in phase0["memory"])
    timing = ("phase_s", "train_img_per_s")
    assert {k: v for k, v in arm0["rows"][0].items() if k not in timing} == \
        {k: v for k, v in phase0["rows"][0].items() if k not in timing}
    assert run_script(*flags, "--resume").returncode == 0
    rows = [json.loads(line) for line in (arm / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["lambda"] == 5.0 and ref_rows[1]["lambda"] == pytest.approx(5 * math.sqrt(2))
    assert rows[1]["train_loss"] != ref_rows[1]["train_loss"] and rows[1]["sigma"] != ref_rows[1]["sigma"]


@pytest.mark.parametrize("flags, message", [
    (["--increment", "3"], "do not add up"),
    (["--memory-total", "5"], "cannot hold one exemplar"),
    (["--memory-per-class", "0"], "cannot hold one exemplar"),
    (["--backbone", "no_such_net"], "unknown --backbone"),
    (["--lr", "1e12"], "NaN in phase 0 epoch 1"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, flags, message):
    out = run_script("lucir.py", "--smoke", "--out-dir", str(tmp_path / "run"), *flags)
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and message in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "run" / "results.json").exists()
    if "NaN" not in message:                                              # caught before training: nothing written
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "mnist"], "unknown --dataset"),
    (["--dataset", "tinyimagenet", "--data-dir", "/no/such/folder"], "tiny-imagenet-200"),
    (["--dataset", "cifar100", "--data-dir", "/no/such/folder"], "cifar-100-python"),
])
def test_bad_dataset_is_one_line_exit_2(flags, message):
    out = run_script("lucir.py", *flags, "--device", "cpu")
    assert out.returncode == 2 and out.stderr.startswith("error:") and message in out.stderr
    assert out.stderr.count("\n") == 1


def test_runs_end_to_end_on_real_on_disk_formats(cifar_dir, food_dir, tmp_path):
    """The uint8-on-device path (CIFAR-100 pickles) and the DataLoader path (Food-101 files), tiny protocols."""
    out = run_script("lucir.py", "--data-dir", str(cifar_dir), "--device", "cpu", "--epochs", "1", "--milestones",
                     "1", "--batch-size", "64", "--increment", "25", "--memory-per-class", "2", "--out-dir",
                     str(tmp_path / "cifar"))
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "cifar" / "results.json").read_text())
    assert results["class_order"][:3] == [68, 56, 78] and len(results["acc_per_phase"]) == 3
    assert results["normalization"]["std"] == [0.2009, 0.1984, 0.2023]          # LUCIR official constants
    out = run_script("lucir.py", "--dataset", "food101", "--data-dir", str(food_dir), "--device", "cpu",
                     "--base-classes", "1", "--increment", "1", "--epochs", "1", "--milestones", "1",
                     "--batch-size", "2", "--memory-per-class", "1", "--workers", "0", "--out-dir",
                     str(tmp_path / "food"))
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "food" / "results.json").read_text())
    assert results["backbone"] == "resnet18" and len(results["acc_matrix"]) == 3
