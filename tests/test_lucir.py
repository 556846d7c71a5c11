"""lucir.py: the cosine classifier and the three losses against hand-computed values, smoke, resume, bad input."""
import json
import math

import pytest
import torch
import torch.nn as nn

from common.data import synthetic
from conftest import run_script
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


def test_smoke_end_to_end_and_resume(tmp_path):
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
