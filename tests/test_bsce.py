"""bsce.py: the balanced softmax against hand-computed values and its theory, the phase counts, and end-to-end
smoke runs (paired with memory, memory-free, resume). CPU, well under a minute."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bsce  # noqa: E402
import common.data  # noqa: E402
from common.data import apply_class_order, class_order, indices_of, synthetic  # noqa: E402
from common.memory import memory_indices  # noqa: E402

RESULT_KEYS = {"method", "finished", "args", "class_order", "normalization", "backbone", "memory_policy",
               "acc_per_phase", "nme_acc_per_phase", "avg_inc_acc", "last_acc", "forgetting", "nme_avg_inc_acc",
               "nme_last_acc", "nme_forgetting", "acc_matrix", "wall_s", "torch", "git_commit", "script_sha256"}


# ----------------------------------------------------------------------------------------------- the loss
def test_loss_matches_hand_computed_value():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    targets = torch.tensor([0, 2])
    counts = torch.tensor([10, 1, 5])
    # -log(n_y e^{z_y} / sum_j n_j e^{z_j}), written out by hand
    row0 = -math.log(10 * math.exp(1.0) / (10 * math.exp(1.0) + 1 * math.exp(2.0) + 5 * math.exp(0.5)))
    row1 = -math.log(5 * math.exp(3.0) / (10 * math.exp(0.0) + 1 * math.exp(-1.0) + 5 * math.exp(3.0)))
    got = bsce.balanced_softmax_loss(logits, targets, counts).item()
    assert got == pytest.approx((row0 + row1) / 2, abs=1e-6)
    # not the class-weighted CE (papers.md 3.2)
    weighted = F.cross_entropy(logits, targets, weight=1.0 / counts.float()).item()
    assert abs(got - weighted) > 1e-3


def test_zero_count_classes_leave_the_softmax_without_nan():
    logits = torch.tensor([[4.0, 1.0, 0.5]], requires_grad=True)
    loss = bsce.balanced_softmax_loss(logits, torch.tensor([1]), torch.tensor([0, 3, 2]))
    expected = -math.log(3 * math.exp(1.0) / (3 * math.exp(1.0) + 2 * math.exp(0.5)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0].item() == 0.0


def test_equal_counts_equal_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=g) * 3
    targets = torch.randint(0, 7, (16,), generator=g)
    got = bsce.balanced_softmax_loss(logits, targets, torch.full((7,), 37))
    assert got.item() == pytest.approx(F.cross_entropy(logits, targets).item(), abs=1e-5)


def test_gradient_favours_the_rare_class():
    """2 classes, n = (2 rare, 50 frequent), logits z = 0. With BSCE the gradient on z_y is p~_y - 1, p~ =
    n e^z / sum n e^z. (a) A rare-class sample pushes its logit up harder than under CE: 2/52 - 1 < 1/2 - 1.
    (b) A frequent-class sample pushes the rare logit down less: 2/52 < 1/2. (c) Summed over the phase's data,
    the BSCE gradient vanishes at equal logits (the balanced posterior is the optimum, Ren et al. 2020), while
    CE's pushes z_freq up and z_rare down (its optimum is z_freq - z_rare = log 25)."""
    counts = torch.tensor([2, 50])

    def grad(loss_fn, targets):
        z = torch.zeros(len(targets), 2, requires_grad=True)
        loss_fn(z, targets).backward()
        return z.grad * len(targets)  # per-sample gradients (the losses average over the batch)
    bs = lambda z, y: bsce.balanced_softmax_loss(z, y, counts)  # noqa: E731
    rare, freq = torch.tensor([0]), torch.tensor([1])
    assert grad(bs, rare)[0, 0].item() == pytest.approx(2 / 52 - 1, abs=1e-6)
    assert grad(bs, rare)[0, 0] < grad(F.cross_entropy, rare)[0, 0] < 0                  # (a)
    assert grad(bs, freq)[0, 0].item() == pytest.approx(2 / 52, abs=1e-6)
    assert 0 < grad(bs, freq)[0, 0] < grad(F.cross_entropy, freq)[0, 0]                  # (b)
    data = torch.tensor([0] * 2 + [1] * 50)
    assert grad(bs, data).sum(0).abs().max().item() < 1e-5                                # (c)
    ce = grad(F.cross_entropy, data).sum(0)
    assert ce[0].item() == pytest.approx(52 / 2 - 2, abs=1e-4) and ce[1] < 0


# ----------------------------------------------------------------------------------------------- the counts
def test_counts_match_phase_data_and_memory():
    data = synthetic(num_classes=20, train_per_class=24)
    apply_class_order(data, class_order(20, 1993))
    first, total = 10, 15
    memory = {c: indices_of(data.train_y, c, c + 1)[: c + 1] for c in range(first)}  # uneven, like a fixed memory
    train_idx = torch.cat([indices_of(data.train_y, first, total), memory_indices(memory)])
    counts = bsce.phase_class_counts(data.train_y, train_idx, total)
    assert counts.tolist() == [c + 1 for c in range(first)] + [24] * (total - first)
    free = bsce.phase_class_counts(data.train_y, indices_of(data.train_y, first, total), total)
    assert free.tolist() == [0] * first + [24] * (total - first)
    # memory-free design: BSCE with those counts is CE over the current classes only
    logits = torch.randn(6, total)
    y = torch.randint(first, total, (6,))
    assert bsce.balanced_softmax_loss(logits, y, free).item() == pytest.approx(
        F.cross_entropy(logits[:, first:], y - first).item(), abs=1e-5)


def test_bench_step_runs():
    from common.bench import main as bench
    rows = bench(["--scripts", "bsce", "--steps", "1", "--warmup", "1", "--batch-size", "4", "--device", "cpu"])
    assert rows[0][0] == "bsce" and rows[0][2] > 0


# ----------------------------------------------------------------------------------------------- end to end
def run_script(*flags):
    return subprocess.run([sys.executable, "bsce.py", "--smoke", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def check_schema(res, phases=3, nme=True):
    assert RESULT_KEYS <= set(res) and res["finished"] and res["method"] == "bsce"
    assert len(res["acc_per_phase"]) == phases and len(res["acc_matrix"]) == phases
    assert [len(r) for r in res["acc_matrix"]] == list(range(1, phases + 1))
    assert res["avg_inc_acc"] == pytest.approx(sum(res["acc_per_phase"]) / phases)
    assert (res["nme_acc_per_phase"] is not None) == nme and (res["nme_avg_inc_acc"] is not None) == nme


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bsce") / "pair"
    proc = run_script("--paired", "rebalance", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_smoke_paired_with_memory(paired_run):
    """--paired rebalance: CE + class-balanced finetuning vs BSCE alone, iCaRL host, 20 exemplars a class."""
    arms = {a: json.load(open(paired_run / a / "results.json")) for a in ("ce_rebalance", "bsce")}
    for arm, res in arms.items():
        check_schema(res)
        assert res["host"] == "icarl" and res["memory_policy"] == "growing, 20 per class"
        rows = [json.loads(line) for line in open(paired_run / arm / "metrics.jsonl")]
        assert rows[1]["class_counts"] == [20] * 10 + [24] * 5  # 20 exemplars an old class, all 24 of a new one
        assert (rows[2]["rebalance_s"] > 0) == (arm == "ce_rebalance") and rows[0]["rebalance_s"] == 0
        assert res["nme_acc_per_phase"][-1] > 50 and res["acc_per_phase"][-1] > 30  # learning (chance 5%)
    assert (arms["ce_rebalance"]["loss"], arms["bsce"]["loss"]) == ("ce", "bsce")
    assert arms["ce_rebalance"]["acc_matrix"][0] == arms["bsce"]["acc_matrix"][0]  # one shared base phase
    rows = {a: [json.loads(line) for line in open(paired_run / a / "metrics.jsonl")] for a in arms}
    assert rows["ce_rebalance"][0]["train_loss"] == rows["bsce"][0]["train_loss"]
    assert rows["ce_rebalance"][1]["train_loss"] != rows["bsce"][1]["train_loss"]  # phase 1: the arms differ
    assert all(res["graph"] is False for res in arms.values())                     # CPU: eager
    paired = json.load(open(paired_run / "paired.json"))
    assert paired["baseline"] == "ce_rebalance"
    assert paired["difference"]["bsce"]["avg_inc_acc"] == pytest.approx(
        arms["bsce"]["avg_inc_acc"] - arms["ce_rebalance"]["avg_inc_acc"])


def test_smoke_memory_free(tmp_path):
    proc = run_script("--memory-per-class", "0", "--host", "lucir", "--out-dir", str(tmp_path / "free"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.load(open(tmp_path / "free" / "results.json"))
    check_schema(res, nme=False)
    assert res["arm"] == "lucir_bsce_nomem" and res["memory_policy"].startswith("none")
    rows = [json.loads(line) for line in open(tmp_path / "free" / "metrics.jsonl")]
    assert rows[2]["class_counts"] == [0] * 15 + [24] * 5 and rows[2]["memory_size"] == 0
    assert all(math.isfinite(a) for a in res["acc_per_phase"])


def test_resume_gives_the_numbers_of_an_uninterrupted_run(paired_run, tmp_path):
    """--stop-after 1, then --resume: the numbers of the uninterrupted BSCE arm of the paired run."""
    out = str(tmp_path / "resumed")
    flags = ["--smoke", "--loss", "bsce", "--out-dir", out, "--device", "cpu"]
    assert bsce.main(flags + ["--stop-after", "1"]) is None
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 2
    res = bsce.main(flags + ["--resume"])
    ref = json.load(open(paired_run / "bsce" / "results.json"))
    assert res["acc_matrix"] == ref["acc_matrix"] and res["nme_acc_matrix"] == ref["nme_acc_matrix"]


# ----------------------------------------------------------------------------------------------- wiring (issue 8)
class TinyBackbone(torch.nn.Module):
    num_features = 4

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))


def tiny_pair(cosine, num_old=4, num_new=2):
    torch.manual_seed(0)
    model, old_model = bsce.Net(TinyBackbone(), cosine), bsce.Net(TinyBackbone(), cosine)
    model.classifier.add_classes(num_old)
    old_model.classifier.add_classes(num_old)
    model.classifier.add_classes(num_new)
    return model, old_model.eval().requires_grad_(False)


COUNTS = torch.tensor([3, 5, 2, 4, 400, 300])  # strongly imbalanced: 4 old classes (exemplars), 2 new


@pytest.mark.parametrize("host", ["icarl", "lucir"])
def test_make_step_loss_is_the_sum_of_the_script_losses(host):
    """The loss make_step optimises, against the script's own functions with non-default flags: BSCE with the
    phase counts, plus the host's distillation on the unadjusted logits (a prior leaking into KD would show)."""
    args = bsce.parse_args(["--smoke", "--device", "cpu", "--host", host, "--kd-weight", "0.6", "--kd-temperature",
                            "3", "--mr-weight", "0.7", "--margin", "0.3", "--k-hard", "1"])
    model, old_model = tiny_pair(host == "lucir")
    x, y = torch.randn(8, 3, 2, 2), torch.tensor([0, 1, 4, 5, 2, 5, 4, 3])
    model.train()
    with torch.no_grad():
        features = model.backbone(x)
        logits = model.classifier(features)
        expected = bsce.balanced_softmax_loss(logits, y, COUNTS)
        if host == "icarl":
            old_logits = old_model.classifier(old_model.backbone(x))
            expected = expected + 0.6 * bsce.kd_loss(logits[:, :4], old_logits, 3.0)
            prior = COUNTS.float().log()
            leaked = bsce.balanced_softmax_loss(logits, y, COUNTS) + 0.6 * bsce.kd_loss(
                logits[:, :4] + prior[:4], old_logits + prior[:4], 3.0)
            assert abs(leaked.item() - expected.item()) > 1e-4  # the test can tell the two apart
        else:
            cosine = model.classifier.cosine(features)
            expected = expected + 2.5 * bsce.less_forget_loss(features, old_model.backbone(x)) + \
                0.7 * bsce.margin_ranking_loss(cosine, y, 4, 0.3, 1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss = bsce.make_step(model, old_model, optimizer, COUNTS, 4, 2.5, args, torch.device("cpu"))(x, y)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    ce = bsce.make_step(model, old_model, optimizer, COUNTS, 4, 2.5, args, torch.device("cpu"), "ce")(x, y)[0]
    assert ce.item() != pytest.approx(loss.item())  # loss_name="ce" (the base phase) really is plain CE


def test_evaluation_uses_the_raw_logits():
    """After BSCE training with a strongly imbalanced prior, test-time predictions are the argmax of the raw
    logits (the prior never reaches the test), and they differ from the prior-adjusted ones."""
    from common.batches import eval_batches
    from common.evaluation import evaluate
    args = bsce.parse_args(["--smoke", "--device", "cpu"])
    data = synthetic(num_classes=6, train_per_class=4, test_per_class=6)
    model, old_model = tiny_pair(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = bsce.make_step(model, old_model, optimizer, COUNTS, 4, 0.0, args, torch.device("cpu"))
    x, y = next(iter(bsce.train_batches(data, torch.arange(24), 24, torch.device("cpu"))))
    for _ in range(20):
        step(x, y)
    model.eval()
    result = evaluate(model, data, [(0, 4), (4, 6)], 1, torch.device("cpu"))
    xt, yt = next(eval_batches(data, torch.arange(36), torch.device("cpu")))
    with torch.no_grad():
        raw = model.classifier(model.backbone(xt))
    assert result["cnn_acc"] == pytest.approx(100 * (raw.argmax(1) == yt).float().mean().item())
    adjusted = (raw + COUNTS.float().log()).argmax(1)
    assert (adjusted != raw.argmax(1)).any()  # with the prior the predictions would differ


def imbalanced_synthetic(*_, **__):
    """The smoke data with unequal class counts (12 .. 24 training images a class), like ImageNet or Food."""
    data = synthetic(num_classes=20, train_per_class=24)
    keep = torch.cat([torch.nonzero(data.train_y == c).flatten()[:12 + (c * 7) % 13] for c in range(20)])
    data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    return data


def test_pair_shares_a_ce_base_phase_with_unequal_counts(tmp_path, monkeypatch, capsys):
    """--paired loss on data with unequal class counts: one base phase, trained with CE, shared by both arms
    (identical phase-0 rows); phase 1 differs (CE vs BSCE)."""
    monkeypatch.setattr(common.data, "load_dataset", imbalanced_synthetic)  # what load_protocol reads
    out = tmp_path / "pair"
    bsce.main(["--smoke", "--device", "cpu", "--paired", "loss", "--epochs", "1", "--milestones", "1",
               "--increment", "10", "--out-dir", str(out)])
    assert "base phase shared with the other arm" in capsys.readouterr().out
    rows = {a: [json.loads(line) for line in open(out / a / "metrics.jsonl")] for a in ("ce", "bsce")}
    assert len(set(rows["ce"][0]["class_counts"])) > 1  # the base phase really has unequal counts
    timing = ("phase_s", "train_s", "train_img_per_s")
    assert {k: v for k, v in rows["ce"][0].items() if k not in timing} == \
        {k: v for k, v in rows["bsce"][0].items() if k not in timing}
    base = torch.load(out / "base_phase.pt", weights_only=False)
    assert base["rows"][0]["train_loss"] == rows["bsce"][0]["train_loss"]
    assert rows["ce"][1]["train_loss"] != rows["bsce"][1]["train_loss"]
