"""tbbn.py: the TBBN layer against a hand-built task-balanced batch, the vanilla-BN cases, gradients, partial
batches, CN, the SS-IL loss, the paired smoke run with resume, and bad flags."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_script

import tbbn
from common.data import apply_class_order, class_order, indices_of, synthetic
from tbbn import (ContinualNorm2d, Net, TaskBalancedBatchNorm2d, build_model, parse_args, split_factor, ssil_loss,
                  swap_norm)


def make_layer(c=3, seed=0):
    """A TBBN layer in float64 with non-trivial gamma, beta and running buffers."""
    g = torch.Generator().manual_seed(seed)
    layer = TaskBalancedBatchNorm2d(c).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        layer.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return layer


def reference(x, n_mem, r, layer):
    """Task-balanced BN written out with loops: group j = the current samples i with i % r == j (the rows that
    the reshape to (B_c/r, C*r, H, W) puts into channel block j) plus every exemplar. Returns the output, the
    per-group (mean, biased var), and the running buffers after the official per-group EMA + group average."""
    n_cur = len(x) - n_mem
    w, b, eps, m = layer.weight.detach(), layer.bias.detach(), layer.eps, layer.momentum
    h, wd = x.shape[2:]
    stats = []
    for j in range(r):
        members = torch.cat([x[j:n_cur:r], x[n_cur:]])          # (B_c/r + B_p, C, H, W)
        mean = members.mean(dim=(0, 2, 3))
        var = ((members - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
        stats.append((mean, var, len(members) * h * wd))

    def affine(v, j):
        mean, var, _ = stats[j]
        return (v - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps) * w[:, None, None] + b[:, None, None]
    out = torch.empty_like(x)
    for i in range(n_cur):
        out[i] = affine(x[i], i % r)
    for k in range(n_cur, len(x)):
        out[k] = sum(affine(x[k], j) for j in range(r)) / r  # each exemplar: the mean of its r copies
    rm = sum((1 - m) * layer.running_mean + m * mean for mean, _, _ in stats) / r
    rv = sum((1 - m) * layer.running_var + m * var * n / (n - 1) for _, var, n in stats) / r
    return out, stats, rm, rv


def test_split_factor_schedule_matches_the_official_array():
    # the official code's earlier hard-coded num_splits_arr for 48 + 16: [1, 2, 4, 8, 8, 8, 16, 16, 16, 16, 16]
    layer = TaskBalancedBatchNorm2d(4)
    assert [layer.set_task(t, 48, 16) for t in range(11)] == [1, 2, 4, 8, 8, 8, 16, 16, 16, 16, 16]
    assert split_factor(1, 24, 8, 3) == 2 and split_factor(3, 24, 8, 9) == 8   # smoke geometry
    assert split_factor(2, 10, 16, 6) == 2 and split_factor(5, 7, 16, 15) == 1  # partial batches
    assert split_factor(0, 48, 16, 99) == 1 and split_factor(3, 0, 16, 9) == 1


@pytest.mark.parametrize("task, expected_r", [(1, 2), (2, 4), (4, 8), (7, 16)])
def test_output_and_running_stats_equal_the_hand_built_balanced_batch(task, expected_r):
    layer = make_layer()
    assert layer.set_task(task, 48, 16) == expected_r
    x = torch.randn(64, 3, 4, 5, dtype=torch.float64) * 2 + 1
    x[48:] += 3.0  # exemplars from a shifted distribution, so balancing visibly matters
    out_ref, stats, rm_ref, rv_ref = reference(x, 16, expected_r, layer)
    out = layer(x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(layer.running_mean, rm_ref)
    torch.testing.assert_close(layer.running_var, rv_ref)
    assert int(layer.num_batches_tracked) == 1
    # the statistics are really the balanced ones, not the plain batch's
    plain_mean = x.mean(dim=(0, 2, 3))
    assert not torch.allclose(stats[0][0], plain_mean, atol=1e-3)


def test_task_zero_and_eval_are_exactly_vanilla_bn():
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    for task, training in [(0, True), (3, False)]:
        layer = make_layer()
        bn = nn.BatchNorm2d(3).double()
        bn.load_state_dict(layer.state_dict())
        layer.set_task(task, 48, 16)
        layer.train(training), bn.train(training)
        torch.testing.assert_close(layer(x), bn(x), rtol=0, atol=0)
        torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(layer.running_var, bn.running_var, rtol=0, atol=0)
        assert layer.num_batches_tracked == bn.num_batches_tracked


def test_exemplar_output_is_the_mean_of_its_normalised_copies():
    layer = make_layer()
    layer.set_task(2, 48, 16)
    x = torch.randn(64, 3, 2, 2, dtype=torch.float64)
    out = layer(x)
    _, stats, _, _ = reference(x, 16, 4, layer)
    w, b = layer.weight.detach()[:, None, None], layer.bias.detach()[:, None, None]
    copies = [(x[48:] - mu[:, None, None]) / torch.sqrt(var[:, None, None] + layer.eps) * w + b
              for mu, var, _ in stats]
    torch.testing.assert_close(out[48:], torch.stack(copies).mean(0))
    assert not torch.allclose(out[48:], copies[0])  # the copies really differ (different group statistics)


def test_gamma_and_beta_gradients_from_exemplars_sum_over_copies():
    layer = make_layer()
    layer.set_task(1, 48, 16)
    r = 2
    x = torch.randn(64, 3, 3, 3, dtype=torch.float64)
    upstream = torch.zeros_like(x)
    upstream[48:] = torch.randn(16, 3, 3, 3, dtype=torch.float64)  # gradient only on the exemplar rows
    layer(x).backward(upstream)
    _, stats, _, _ = reference(x, 16, r, layer)
    # d out_k / d gamma = (1/r) sum_j xhat_kj: each of the r copies gets 1/r of the row's gradient, summed
    grad_w = sum(((upstream[48:] / r) * (x[48:] - mu[:, None, None]) / torch.sqrt(var[:, None, None] + layer.eps))
                 .sum(dim=(0, 2, 3)) for mu, var, _ in stats)
    torch.testing.assert_close(layer.weight.grad, grad_w)
    # beta: r copies x 1/r each = the plain sum over the exemplar rows
    torch.testing.assert_close(layer.bias.grad, sum((upstream[48:] / r).sum(dim=(0, 2, 3)) for _ in range(r)))


@pytest.mark.parametrize("n_cur, task, expected_r", [(10, 1, 2), (8, 3, 8), (7, 5, 1)])
def test_partial_batch_lowers_r_instead_of_failing(n_cur, task, expected_r):
    layer = make_layer()
    layer.set_task(task, 48, 16)
    x = torch.randn(n_cur + 16, 3, 2, 3, dtype=torch.float64)
    out_ref, _, rm_ref, rv_ref = reference(x, 16, expected_r, layer)  # before the forward updates the buffers
    out = layer(x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(layer.running_mean, rm_ref)
    torch.testing.assert_close(layer.running_var, rv_ref)


def test_continual_norm_is_group_norm_then_bn():
    layer = ContinualNorm2d(16, groups=8)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
    x = torch.randn(6, 16, 3, 3) * 3 + 2
    gn = F.group_norm(x, 8, eps=1e-5)
    bn = (gn - gn.mean((0, 2, 3), keepdim=True)) / torch.sqrt(gn.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), bn * layer.weight[:, None, None] + layer.bias[:, None, None])


def test_swap_norm_replaces_every_bn_of_the_backbone():
    args = parse_args(["--smoke", "--device", "cpu", "--norm", "tbbn"])
    model = build_model(args, 20)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 33 and all(isinstance(m, TaskBalancedBatchNorm2d) for m in norms)
    assert swap_norm(nn.Sequential(nn.BatchNorm2d(16)), "cn") == 1
    resnet18 = build_model(parse_args(["--dataset", "imagenet100", "--device", "cpu", "--norm", "cn"]), 100)
    assert sum(isinstance(m, ContinualNorm2d) for m in resnet18.modules()) == 20  # every BN of timm's ResNet-18


def test_ssil_loss_hand_computed():
    torch.manual_seed(0)
    splits = [(0, 2), (2, 4), (4, 6)]
    logits, old = torch.randn(5, 6), torch.randn(5, 4)
    y = torch.tensor([4, 5, 4, 1, 2])  # 3 current samples (classes 4-5), then 2 exemplars
    ce = (F.cross_entropy(logits[:3, 4:6], y[:3] - 4, reduction="sum")
          + F.cross_entropy(logits[3:, :4], y[3:], reduction="sum")) / 5

    def kd(a, b):
        p = F.softmax(old[:, a:b] / 2, 1)
        return (p * (p.log() - F.log_softmax(logits[:, a:b] / 2, 1))).sum(1).mean() * 4
    torch.testing.assert_close(ssil_loss(logits, old, y, 3, splits, 2, "all"), ce + kd(0, 2) + kd(2, 4))
    torch.testing.assert_close(ssil_loss(logits, old, y, 3, splits, 2, "last"), ce + kd(2, 4))


RESULT_KEYS = {"method", "finished", "args", "class_order", "normalization", "backbone", "memory_policy",
               "acc_per_phase", "nme_acc_per_phase", "avg_inc_acc", "last_acc", "forgetting", "nme_avg_inc_acc",
               "nme_last_acc", "nme_forgetting", "acc_matrix", "nme_acc_matrix", "wall_s", "torch", "device",
               "git_commit", "script_sha256"}


def test_defaults_follow_facil_order_validation_and_augmentation():
    """Official runs: FACIL's cifar100 order under --seed 0 is np.random.seed(0) then np.random.shuffle of the
    class list (memory_dataset.get_data); imagenet100 hard-codes the iCaRL list (= the seed-1993 order)."""
    import numpy as np
    args = parse_args(["--device", "cpu"])
    assert args.class_order_seed == 0 and args.validation == 0.1 and args.augmentation == "resized-crop"
    np.random.seed(0)
    facil = list(range(100))
    np.random.shuffle(facil)
    assert class_order(100, args.class_order_seed)[:10] == facil[:10] == [26, 86, 2, 55, 75, 93, 16, 73, 54, 95]
    assert parse_args(["--device", "cpu", "--dataset", "imagenet100"]).class_order_seed == 1993
    for name in ("tinyimagenet", "food101", "cub200", "imagenet"):
        assert parse_args(["--device", "cpu", "--dataset", name]).backbone == "resnet18"


def test_all_norm_arms_start_from_identical_weights():
    """The arms of a pair differ only in the normalisation layer: same initial weights (timm's ResNet-18 must not
    zero-initialise the last BN of a block in the bn arm while the swapped layers start at gamma 1)."""
    states = {}
    for norm in ("bn", "tbbn", "cn"):
        torch.manual_seed(0)
        states[norm] = build_model(parse_args(["--dataset", "imagenet100", "--device", "cpu", "--norm", norm]),
                                   100).state_dict()
    for norm in ("tbbn", "cn"):
        assert states[norm].keys() == states["bn"].keys()
        assert all(torch.equal(states[norm][k], states["bn"][k]) for k in states["bn"]), norm


class TinyBackbone(nn.Module):
    num_features = 4

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))


@pytest.mark.parametrize("host", ["er", "ssil"])
def test_make_step_loss_equals_the_host_loss(host):
    """The loss make_step optimises is the host's own loss on the batch (ER: CE over the seen classes; SS-IL:
    ssil_loss with the current/exemplar split and --ssil-kd)."""
    torch.manual_seed(0)
    args = parse_args(["--smoke", "--device", "cpu", "--host", host, "--ssil-kd", "all"])
    splits, phase, n_current = [(0, 2), (2, 4), (4, 6)], 2, 5
    model, old_model = Net(TinyBackbone(), 8), Net(TinyBackbone(), 8).eval()
    x = torch.randn(8, 3, 2, 2)
    y = torch.tensor([4, 5, 4, 4, 5, 0, 3, 1])
    model.train()
    with torch.no_grad():
        logits = model(x)[0][:, :6]
        expected = ssil_loss(logits, old_model(x)[0], y, n_current, splits, phase, "all") if host == "ssil" \
            else F.cross_entropy(logits, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = tbbn.make_step(model, old_model, optimizer, splits, phase, n_current, args, torch.device("cpu"))(x, y)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    if host == "ssil":  # --ssil-kd reaches the step: "last" is a different value here
        assert expected.item() != pytest.approx(ssil_loss(logits, old_model(x)[0], y, n_current, splits, phase,
                                                          "last").item())


def test_batches_end_with_exemplars_and_the_best_validation_epoch_is_restored(monkeypatch):
    """Every incremental step: the last --batch-memory rows are exemplars, the others current-task samples (none
    held out for validation). At the end of the task, the model of the epoch with the lowest validation loss is
    restored (FACIL train_loop)."""
    args = parse_args(["--dataset", "synthetic", "--device", "cpu", "--epochs", "3", "--milestones", "2",
                       "--batch-size", "12", "--batch-memory", "4"])
    data = synthetic(num_classes=6, train_per_class=10, test_per_class=1)
    apply_class_order(data, class_order(6, 1993))
    splits, phase = [(0, 3), (3, 6)], 1
    held_out = tbbn.validation_split(data.train_y, 0.1, 0)
    assert held_out.sum() == 6 and all(held_out[data.train_y == c].sum() == 1 for c in range(6))  # round(1.0)
    assert torch.equal(held_out, tbbn.validation_split(data.train_y, 0.1, 0))               # same on --resume
    memory = {c: indices_of(data.train_y, c, c + 1)[:3] for c in range(3)}
    model = Net(TinyBackbone(), 6)
    batches = []

    def fake_make_step(model, old_model, optimizer, splits, phase, n_current, args, device):
        def step(x, y):
            batches.append(y.clone())
            with torch.no_grad():
                model.head.bias.add_(1.0)  # epoch e ends with bias = e * steps
            return torch.zeros(2)
        return step
    monkeypatch.setattr(tbbn, "make_step", fake_make_step)
    val_losses = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(tbbn, "validation_loss", lambda *a: next(val_losses))
    before = model.head.bias.clone()
    out = tbbn.train_phase(model, None, data, splits, phase, memory, held_out, args, torch.device("cpu"))
    steps = len(batches) // 3
    assert steps == 4  # ceil(27 current training images / 8) (9 exemplars / 4: 3)
    for y in batches:
        assert len(y) == 12 and ((y[:8] >= 3) & (y[:8] < 6)).all() and (y[8:] < 3).all()
    assert out["best_epoch"] == 2 and out["val_loss"] == 1.0
    torch.testing.assert_close(model.head.bias, before + 2 * steps)  # the state after epoch 2, not epoch 3


def test_paired_smoke_and_resume(tmp_path, monkeypatch):
    # one thread: four short runs stay fast on a shared 2-core machine (OpenMP threads spin under contention)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    paired = run_script("tbbn.py", "--smoke", "--paired", "--out-dir", str(tmp_path / "pair"))
    assert paired.returncode == 0, paired.stderr
    summary = json.loads((tmp_path / "pair" / "paired.json").read_text())
    arms = {n: json.loads((tmp_path / "pair" / n / "results.json").read_text()) for n in ("bn", "tbbn")}
    for norm, res in arms.items():
        assert RESULT_KEYS <= set(res) and res["finished"] and res["norm"] == norm
        assert len(res["acc_per_phase"]) == 4 and len(res["acc_matrix"][3]) == 4
        assert res["nme_acc_per_phase"][0] > 50  # the synthetic classes are easy: learning happened
        assert res["acc_per_phase"][-1] > 30     # CNN on 20 classes (chance 5%)
        assert res["avg_inc_acc"] == pytest.approx(sum(res["acc_per_phase"]) / 4)
    assert arms["tbbn"]["tbbn_split_per_phase"] == [1, 2, 4, 8] and arms["bn"]["tbbn_split_per_phase"] == [1] * 4
    assert arms["bn"]["acc_per_phase"][0] == arms["tbbn"]["acc_per_phase"][0]  # task 0: TBBN is vanilla BN
    for key in ("avg_inc_acc", "last_acc", "forgetting"):
        assert summary["difference"]["tbbn"][key] == pytest.approx(arms["tbbn"][key] - arms["bn"][key])
    assert "tbbn - bn" in paired.stdout and summary["baseline"] == "bn"

    rows = {n: [json.loads(line) for line in (tmp_path / "pair" / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("bn", "tbbn")}
    timing = ("phase_s", "train_img_per_s")
    assert {k: v for k, v in rows["bn"][0].items() if k not in timing} == \
        {k: v for k, v in rows["tbbn"][0].items() if k not in timing}
    assert rows["bn"][1]["train_loss"] != rows["tbbn"][1]["train_loss"]  # phase 1: the norm layer matters
    assert all(r["best_epoch"] is not None for r in rows["tbbn"]) and arms["tbbn"]["graph"] is False

    # standalone runs stopped after phase 0: both arms' phase-0 checkpoints are identical; the TBBN one, resumed,
    # ends with the paired arm's numbers (bit-identical)
    part, bn0 = tmp_path / "part", tmp_path / "bn0"
    first = run_script("tbbn.py", "--smoke", "--out-dir", str(part), "--stop-after", "0")
    assert first.returncode == 0, first.stderr
    assert not (part / "results.json").exists()
    first_bn = run_script("tbbn.py", "--smoke", "--norm", "bn", "--out-dir", str(bn0), "--stop-after", "0")
    assert first_bn.returncode == 0, first_bn.stderr  # a subprocess too: the same threads, the same float sums
    ckpt = {n: torch.load(d / "checkpoint.pt", weights_only=False) for n, d in (("bn", bn0), ("tbbn", part))}
    assert ckpt["bn"]["phase"] == ckpt["tbbn"]["phase"] == 0
    assert all(torch.equal(v, ckpt["tbbn"]["model"][k]) for k, v in ckpt["bn"]["model"].items())
    assert all(torch.equal(v, ckpt["tbbn"]["memory"][c]) for c, v in ckpt["bn"]["memory"].items())
    resumed = run_script("tbbn.py", "--smoke", "--out-dir", str(part), "--resume")
    assert resumed.returncode == 0 and "resumed after phase 0" in resumed.stdout, resumed.stderr
    res = json.loads((part / "results.json").read_text())
    for key in ("acc_per_phase", "nme_acc_per_phase", "acc_matrix", "nme_acc_matrix"):
        assert res[key] == arms["tbbn"][key], key


@pytest.mark.parametrize("flags, message", [
    (["--host", "nope"], "unknown --host"),
    (["--batch-memory", "64"], "--batch-memory 64"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, flags, message):
    out = run_script("tbbn.py", "--smoke", "--out-dir", str(tmp_path / "run"), *flags)
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and message in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_bad_flags_in_process():
    from common.memory import check_budget
    from common.errors import UserError
    for flags in (["--norm", "gn"], ["--paired", "bn", "xx"], ["--batch-memory", "0"], ["--host", "lucir"]):
        with pytest.raises(UserError):
            parse_args(["--smoke", "--device", "cpu", *flags])
    args = parse_args(["--smoke", "--device", "cpu", "--memory-total", "5"])
    with pytest.raises(UserError, match="cannot hold one exemplar"):
        check_budget(20, args.memory_per_class, args.memory_total)
    with pytest.raises(UserError, match="--cn-groups 5"):
        build_model(parse_args(["--smoke", "--device", "cpu", "--norm", "cn", "--cn-groups", "5"]), 20)
    args = parse_args(["--smoke", "--device", "cpu", "--memory-per-class", "3"])  # growing memory
    assert args.memory_total is None and args.memory_per_class == 3 and args.batch_memory == 8


def test_runs_on_tiny_imagenet(tiny_imagenet_dir, tmp_path):
    """--dataset tinyimagenet (the real dataset we ship): its stated protocol with tiny sizes, end to end."""
    tbbn.main(["--dataset", "tinyimagenet", "--data-dir", str(tiny_imagenet_dir), "--device", "cpu",
               "--base-classes", "1", "--increment", "1", "--memory-total", "3", "--epochs", "1",
               "--milestones", "1", "--batch-size", "4", "--batch-memory", "1", "--out-dir", str(tmp_path / "t")])
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    assert res["backbone"] == "resnet18" and len(res["acc_per_phase"]) == 3
    assert res["args"]["class_order_seed"] == 0 and res["args"]["augmentation"] == "resized-crop"
