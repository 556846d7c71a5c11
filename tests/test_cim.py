"""cim.py: compression and its cost, CAM boxes, herding under a fractional budget and reduction, the rational
activation, the bilevel step, FOSTER's class weights and losses against hand-computed values, and end-to-end smoke
runs (paired; stop + --resume). CPU."""
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import cim  # noqa: E402
from common.data import apply_class_order, class_order, load_dataset  # noqa: E402
from common.evaluation import evaluate  # noqa: E402
from common.memory import herding  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.stop import run_main  # noqa: E402

RESULT_KEYS = {"method", "finished", "args", "class_order", "normalization", "backbone", "memory_policy",
               "acc_per_phase", "nme_acc_per_phase", "avg_inc_acc", "last_acc", "forgetting", "nme_avg_inc_acc",
               "acc_matrix", "wall_s", "torch", "git_commit", "script_sha256", "student_acc_per_phase",
               "student_avg_inc_acc", "student_last_acc", "student_acc_matrix", "student_nme_acc_per_phase",
               "exemplars_mean_per_phase", "scored_model"}


# ----------------------------------------------------------------------------------------------- compression
def test_compression_keeps_the_box_and_is_the_official_bbx_blur_outside():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    boxes = torch.tensor([[1, 2, 5, 7], [0, 0, 0, 0]])  # (y0, x0, y1, x1); the second: no box at all
    out = cim.compress_images(x, boxes, eta=4)
    coarse = x[:, :, 1::2, 1::2].repeat_interleave(2, 2).repeat_interleave(2, 3)  # by hand: PIL NEAREST's centres
    inside = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    inside[0, :, 1:5, 2:7] = True
    assert torch.equal(out, torch.where(inside, x, coarse))
    assert torch.equal(cim.compress_images(x, torch.tensor([[0, 0, 8, 8]] * 2), 4), x)  # full box: identity
    u8 = (x * 255).to(torch.uint8)  # the small-image path compresses uint8 exactly
    assert torch.equal(cim.compress_images(u8, boxes, 4), (torch.where(inside, x, coarse) * 255).to(torch.uint8))
    # the official utils/transform.py BbxBlur (PIL NEAREST down to int(side / 2) and up, the box pasted back) on
    # an odd-sized image; the meta step's torch "nearest" differs
    from PIL import Image
    im = Image.fromarray(torch.randint(0, 256, (13, 21, 3), generator=g, dtype=torch.uint8).numpy())
    box = (3, 5, 10, 9)  # y0, x0, y1, x1
    ref = im.resize((10, 6), Image.NEAREST).resize((21, 13), Image.NEAREST)
    ref.paste(im.crop((box[1], box[0], box[3], box[2])), (box[1], box[0], box[3], box[2]))
    t = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]
    assert torch.equal(cim.compress_images(t, torch.tensor([box]), 4)[0].permute(1, 2, 0), torch.from_numpy(
        np.array(ref)))
    assert not torch.equal(cim.compress_images(t, torch.tensor([box]), 4, "nearest"),
                           cim.compress_images(t, torch.tensor([box]), 4))


def test_cost_formula_on_hand_made_boxes():
    boxes = torch.tensor([[0, 0, 10, 10, 10, 10], [0, 0, 0, 0, 10, 10], [0, 0, 5, 10, 10, 10], [2, 2, 4, 7, 10, 10],
                          [0, 0, 5, 10, 10, 20], list(cim.FULL)])  # (box, H, W); FULL: no box
    cost = cim.compression_cost(boxes, eta=4)
    # box fraction of H x W + (1 - fraction) / eta: 1, 1/4, 0.5 + 0.5/4, 0.1 + 0.9/4, 0.25 + 0.75/4, 1
    assert cost.tolist() == pytest.approx([1.0, 0.25, 0.625, 0.325, 0.4375, 1.0])


def test_cam_boxes_are_the_tight_box_of_the_thresholded_map():
    cam = torch.zeros(2, 4, 4)
    cam[0, 1:3, 2] = 5.0          # a blob in rows 1-2, column 2
    cam[0, 0, 0] = -1.0           # the minimum; min-max normalisation maps the rest to 1/6 < tau
    boxes = cim.cam_boxes(cam, (4, 4), tau=0.6)  # same size: bilinear up is the identity
    assert boxes[0].tolist() == [1, 2, 3, 3]
    assert boxes[1].tolist() == [0, 0, 4, 4]  # constant CAM: empty mask, the full image (no compression)


# ----------------------------------------------------------------------------------------------- memory
class FlatFeatures(nn.Module):
    """A stand-in model: the features are the first 24 pixel values of the (compressed) image."""

    def forward(self, x):
        f = x.flatten(1)[:, :24].float()
        return f, f


def small_box_data():
    data = load_dataset("synthetic", "", torch.device("cpu"), image_size=16)
    apply_class_order(data, class_order(20, 1993))
    boxes = torch.tensor([[4, 4, 8, 8, 16, 16]]).repeat(len(data.train_y), 1)  # 1/16 of the image: cost 0.296875
    boxes[::3] = torch.tensor(cim.FULL)                                         # every third image: none (cost 1)
    return data, boxes


def test_herding_under_a_fractional_budget():
    data, boxes = small_box_data()
    budget = 3
    memory = cim.select_compressed(FlatFeatures(), data, [0, 1], boxes, budget, 4.0, torch.device("cpu"))
    for c in (0, 1):
        rows = memory[c]
        idx = rows[:, 0]
        assert (data.train_y[idx] == c).all() and torch.equal(rows[:, 1:], boxes[idx])
        cost = cim.compression_cost(rows[:, 1:], 4.0)
        assert cost.sum() <= budget and len(rows) > budget  # more exemplars than the uncompressed budget
        # the herding order on the compressed images, and the next exemplar would not have fitted
        all_idx = torch.nonzero(data.train_y == c).flatten()
        feats = FlatFeatures()(cim.compress_images(
            torch.cat([x for x, _ in cim.eval_batches(data, all_idx, torch.device("cpu"), "train")]),
            boxes[all_idx], 4.0))[1]
        order = all_idx[herding(feats, len(all_idx))]
        assert torch.equal(idx, order[:len(idx)])
        if len(idx) < len(order):
            assert cost.sum() + cim.compression_cost(boxes[order[len(idx)]][None], 4.0)[0] > budget


def test_reduction_keeps_a_fitting_prefix():
    rows = torch.tensor([[7, 0, 0, 0, 0, 16, 16], [3, 0, 0, 16, 16, 16, 16], [9, 0, 0, 0, 0, 16, 16],
                         [4, 0, 0, 0, 0, 16, 16]])  # cost .25, 1, .25, .25
    reduced = cim.reduce_compressed({0: rows}, 1.4, 4.0)[0]
    assert torch.equal(reduced, rows[:2])  # 1.25 fits, 1.5 does not
    assert torch.equal(cim.reduce_compressed({0: rows}, 1.75, 4.0)[0], rows)
    assert len(cim.reduce_compressed({0: rows}, 0.2, 4.0)[0]) == 0
    assert cim.budget_prefix(torch.tensor([0.5, 0.5, 0.5]), 1) == 2


class RedCam(nn.Module):
    """A stand-in model whose CAM of every class is the red channel of its input (feature map = red channel, fc 1)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2, bias=False)
        nn.init.ones_(self.fc.weight)

    def outputs(self, x):
        maps = x[:, :1].float()
        return self.fc(maps.mean((2, 3))), maps.mean((2, 3)), maps

    def forward(self, x):
        return self.outputs(x)[:2]


def test_large_images_compressed_in_original_coordinates_before_the_crop(tmp_path, monkeypatch):
    """Official order (models/base.py _gen_bbx, utils/data_manager.py DummyDataset) on a tiny Food-101 layout of
    48 x 24 images whose red channel marks rows 6-17, columns 24-41: the CAM of the whole image's Resize((16, 16))
    view gives that box in original coordinates (not in the 16-px eval crop's); the training transform receives
    the original image compressed with it (BbxBlur), before its crop; the stored cost is BbxBlur's compress_rate
    on the original's 48 x 24 pixels."""
    from PIL import Image
    import torchvision.transforms as T
    root = tmp_path / "food-101"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("a\nb\n")
    g = torch.Generator().manual_seed(0)
    for c in "ab":
        (root / "images" / c).mkdir(parents=True)
        for i in range(2):
            im = torch.randint(0, 256, (24, 48, 3), generator=g, dtype=torch.uint8)
            im[:, :, 0] = 0
            im[6:18, 24:42, 0] = 255
            Image.fromarray(im.numpy()).save(root / "images" / c / f"{i}.jpg", format="PNG")  # lossless
    (root / "meta" / "train.txt").write_text("a/0\na/1\nb/0\nb/1\n")
    (root / "meta" / "test.txt").write_text("a/0\nb/0\n")
    data = load_dataset("food101", str(tmp_path), torch.device("cpu"), image_size=16)
    assert not data.on_device
    table = torch.tensor([cim.FULL] * 4)
    cim.set_boxes(RedCam(), data, torch.arange(4), table, 0.6, torch.device("cpu"))
    assert table.tolist() == [[6, 24, 18, 42, 24, 48]] * 4  # y0, x0, y1, x1, H, W of the original
    seen = []  # what the training transform receives

    def record(im):
        seen.append(torch.from_numpy(np.array(im)))
        return im
    monkeypatch.setattr(cim, "autoaugment", lambda size: [T.Lambda(record), T.RandomResizedCrop(size)])
    ctx = {"box_table": table, "new_mask": torch.zeros(4, dtype=torch.bool)}  # exemplars: always compressed
    args = cim.parse_args(["--device", "cpu", "--workers", "0", "--eta", "4"])
    batches = list(cim.epoch_batches(data, torch.arange(4), 2, torch.device("cpu"), ctx, 0.0, args))
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 16, 16) and len(seen) == 4
    refs = []  # the training images by hand: the original, nearest down to 24 x 12 and up, the box kept
    for path in data.train_files:
        orig = Image.open(path).convert("RGB")
        ref = orig.resize((24, 12), Image.NEAREST).resize((48, 24), Image.NEAREST)
        ref.paste(orig.crop((24, 6, 42, 18)), (24, 6, 42, 18))
        refs.append(torch.from_numpy(np.array(ref)))
        assert not torch.equal(refs[-1], torch.from_numpy(np.array(orig)))
    assert sorted(next(i for i, r in enumerate(refs) if torch.equal(r, got)) for got in seen) == [0, 1, 2, 3]
    memory = cim.select_compressed(RedCam(), data, [0, 1], table, 2, 4.0, torch.device("cpu"))
    rate = 12 * 18 / (24 * 48)  # official compress_rate = box fraction + (1 - fraction) / compress_ratio
    assert [len(r) for r in memory.values()] == [2, 2]
    assert cim.compression_cost(cim.memory_rows(memory)[:, 1:], 4.0).tolist() == \
        pytest.approx([rate + (1 - rate) / 4] * 4)


# ----------------------------------------------------------------------------------------------- mask model
def test_rational_is_close_to_relu_at_init_and_trains():
    act = cim.RationalReLU()
    x = torch.linspace(-3, 3, 601)
    assert torch.equal(act(x), torch.relu(x))  # ReLU mode: exactly ReLU
    act.rational = True
    assert (act(x) - torch.relu(x)).abs().max() < 0.035  # stated tolerance of the fitted coefficients
    start = [p.detach().clone() for p in act.parameters()]
    opt = torch.optim.Adam(act.parameters(), lr=0.01)
    target = torch.nn.functional.leaky_relu(x, 0.3)
    losses = []
    for _ in range(50):
        loss = ((act(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(not torch.equal(a, p) for a, p in zip(start, act.parameters()))
    x = torch.tensor([0.0, 1e6], requires_grad=True)  # no overflow, finite second derivative at 0
    (g,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    assert torch.isfinite(torch.autograd.grad(g.sum(), x)[0]).all()


def test_bilevel_step_changes_only_the_rational_parameters():
    args = cim.parse_args(["--smoke", "--device", "cpu"])
    torch.manual_seed(0)
    model = cim.build_model(args, 4)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3]))
    batch2 = (torch.randn(4, 3, 16, 16, generator=g), torch.tensor([3, 2, 1, 0]))
    phi = [p for n, p in model.named_parameters() if "ratl" in n]
    assert len(phi) > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    loss = cim.meta_step(model, torch.optim.Adam(phi, lr=0.01), batch, batch2, None, 0, 0.01, args, 1.0)
    assert torch.isfinite(loss)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("ratl" in k for k in changed)
    assert all(p.grad is None for n, p in model.named_parameters() if "ratl" not in n)


# ----------------------------------------------------------------------------------------------- FOSTER
def test_class_weights_and_losses_against_hand_computed_values():
    w = cim.effective_number_weights(torch.tensor([2, 5]), 0.9)
    raw = [0.1 / (1 - 0.9 ** 2), 0.1 / (1 - 0.9 ** 5)]
    assert w.tolist() == pytest.approx([2 * r / sum(raw) for r in raw], rel=1e-6)
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    T = 2.0
    t = [math.exp(0.0 / T), math.exp(2.0 / T)]
    t = [v / sum(t) for v in t]
    log_s = [0.5 - math.log(math.exp(0.5) + 1.0), 0.0 - math.log(math.exp(0.5) + 1.0)]
    assert cim.kd_loss(student, teacher, T).item() == pytest.approx(-(t[0] * log_s[0] + t[1] * log_s[1]), rel=1e-6)
    bt = [t[0] * w[0].item(), t[1] * w[1].item()]
    bt = [v / sum(bt) for v in bt]
    got = cim.balanced_kd_loss(student, teacher, w, T).item()
    assert got == pytest.approx(-(bt[0] * log_s[0] + bt[1] * log_s[1]), rel=1e-6)
    assert abs(got - cim.kd_loss(student, teacher, T).item()) > 1e-3


def test_grow_and_compress_keep_the_old_model():
    args = cim.parse_args(["--smoke", "--device", "cpu"])
    torch.manual_seed(0)
    old = cim.build_model(args, 3).eval()
    teacher = cim.grow(old, 5).eval()
    x = torch.randn(2, 3, 16, 16)
    logits, features, _ = teacher.outputs(x)
    dim = teacher.fe_fc.in_features
    # the teacher's old-class logits on the old features equal the old model's; the new backbone starts as a copy
    assert torch.allclose(teacher.old_fc(features[:, :dim]), old(x)[0], atol=1e-5)
    assert torch.allclose(features[:, :dim], features[:, dim:], atol=1e-6)
    assert all(p.requires_grad == ("ratl" in n) for n, p in teacher.backbones[0].named_parameters())
    student = cim.new_student(teacher, 5).eval()
    assert torch.allclose(student(x)[0][:, :3], old(x)[0], atol=1e-5)


def test_base_phase_trains_as_bsce_ce_phase(tmp_path, capsys):
    """Issue 20: cim.py's base phase learned at half the speed of bsce.py --loss ce. Given the same weights and RNG
    state on a tiny Tiny-ImageNet layout, cim.py's base phase (run_stage: its batches, SGD, cosine or step lr, the
    captured step) and bsce.py's CE phase (train_phase) print the same loss and accuracy every epoch, and the loss
    falls. A scaled logit, a parameter left out, another weight decay, BN or the rationals in the wrong mode would
    fail it. What differs is only the classifier's initialisation: the official SimpleLinear's (kaiming uniform,
    linear gain: bound sqrt(3 / 64)), against nn.Linear's 1 / sqrt(64) in bsce.py."""
    import bsce
    from common.models import to_channels_last
    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{c:02d}" for c in range(4)]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    g = torch.Generator().manual_seed(0)
    from PIL import Image
    for c, w in enumerate(wnids):  # a colour a class, plus noise
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(6):
            im = torch.tensor([80 * c, 240 - 80 * c, 120]) + torch.rand(32, 32, 3, generator=g) * 15
            Image.fromarray(im.to(torch.uint8).numpy()).save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    (root / "val" / "val_annotations.txt").write_text("")
    flags = ["--dataset", "tinyimagenet", "--data-dir", str(tmp_path), "--image-size", "16", "--device", "cpu",
             "--backbone", "resnet32", "--epochs", "5", "--milestones", "4", "--batch-size", "8", "--lr", "0.02"]
    cargs = cim.parse_args(flags + ["--boost-epochs", "5", "--compress-epochs", "5", "--no-cim"])
    bargs = bsce.parse_args(flags + ["--loss", "ce", "--weight-decay", "5e-4"])
    data, device, idx = load_dataset("tinyimagenet", str(tmp_path), torch.device("cpu"), image_size=16), \
        torch.device("cpu"), torch.arange(24)
    torch.manual_seed(0)
    foster = to_channels_last(cim.build_model(cargs, 4), device)
    bound = math.sqrt(3 / 64)  # official SimpleLinear: kaiming_uniform_(nonlinearity="linear")
    assert foster.fc.bias is None and foster.fc.weight.abs().max() <= bound and foster.fc.weight.std() > 0.8 / 8
    net = bsce.build_model(bargs, device)
    net.classifier.add_classes(4)
    net.backbone.load_state_dict(foster.backbones[0].state_dict(), strict=False)  # all but the rationals' phi
    with torch.no_grad():
        net.classifier.heads[0].copy_(foster.fc.weight)
        net.classifier.biases[0].zero_().requires_grad_(False)  # CIM's classifier has no bias
    torch.manual_seed(1)
    ctx = {"prob": 0.0, "new_idx": idx, "new_mask": torch.ones(24, dtype=torch.bool),
           "box_table": torch.tensor(cim.FULL).repeat(24, 1)}
    cim.run_stage(foster, foster, data, idx, ctx, cargs, device, epochs=5, label="phase 0",  # as run() calls it
                  weight_decay=cargs.weight_decay,
                  params=[p for n, p in foster.named_parameters() if p.requires_grad and "ratl" not in n])
    ours = re.findall(r"loss (\S+) train-acc (\S+)", capsys.readouterr().out)
    torch.manual_seed(1)
    bsce.train_phase(net, None, data, idx, torch.full((4,), 6), 0, 0.0, bargs, device, epochs=5, lr=0.02,
                     milestones=[4], params=[p for p in net.parameters() if p.requires_grad], label="phase 0",
                     loss_name="ce")
    theirs = re.findall(r"loss (\S+) train-acc (\S+)", capsys.readouterr().out)
    assert len(ours) == len(theirs) == 5
    for (loss, acc), (loss_b, acc_b) in zip(ours, theirs):
        assert float(loss) == pytest.approx(float(loss_b), abs=2e-3) and acc == acc_b
    assert float(ours[-1][0]) < 0.8 * float(ours[0][0])


def test_bad_input_is_one_line_error():
    with pytest.raises(UserError, match="--eta"):
        cim.main(["--smoke", "--device", "cpu", "--eta", "0.5"])


def test_milestones_are_checked_against_every_stage(capsys):
    """--milestones decays the base, boosting and compression stages: each must be long enough (one line, exit 2)."""
    base = ["--dataset", "synthetic", "--device", "cpu", "--epochs", "6", "--milestones", "3", "5"]
    with pytest.raises(UserError, match=r"too short: --boost-epochs 4, --compress-epochs 2$"):
        cim.parse_args(base + ["--boost-epochs", "4", "--compress-epochs", "2"])
    with pytest.raises(UserError, match=r"too short: --compress-epochs 4$"):
        cim.parse_args(base + ["--boost-epochs", "6", "--compress-epochs", "4"])
    assert cim.parse_args(base + ["--boost-epochs", "5", "--compress-epochs", "5"]).milestones == [3, 5]
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: cim.main(base + ["--boost-epochs", "4", "--compress-epochs", "6"]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "--boost-epochs 4" in err


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    """`--smoke --paired` in this process (3 phases an arm), every evaluation recorded in order: (phase, number
    of backbones, cnn_acc, cnn_acc_per_task); each arm evaluates phase 0's model, then teacher and student."""
    out = tmp_path_factory.mktemp("cim") / "paired"
    seen = []

    def spy(model, data, splits, phase, *a, **k):
        result = evaluate(model, data, splits, phase, *a, **k)
        seen.append((phase, len(model.backbones), result["cnn_acc"], result["cnn_acc_per_task"]))
        return result
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cim, "evaluate", spy)
        cim.main(["--smoke", "--paired", "--device", "cpu", "--out-dir", str(out)])
    return out, {"foster": seen[:5], "foster_cim": seen[5:]}


def read(path):
    return [json.loads(line) for line in open(path)] if path.endswith(".jsonl") else json.load(open(path))


def test_paired_smoke_schema_and_memory(paired_run):
    out, _ = paired_run
    paired = read(str(out / "paired.json"))
    assert paired["baseline"] == "foster" and set(paired["arms"]) == {"foster", "foster_cim"}
    for arm, cim_on in (("foster", False), ("foster_cim", True)):
        res = read(str(out / arm / "results.json"))
        assert RESULT_KEYS <= set(res) and res["finished"] and res["method"] == "cim" and res["cim"] == cim_on
        assert len(res["acc_per_phase"]) == 3 and [len(r) for r in res["acc_matrix"]] == [1, 2, 3]
        assert res["avg_inc_acc"] == pytest.approx(sum(res["acc_per_phase"]) / 3)
        assert paired["arms"][arm]["avg_inc_acc"] == res["avg_inc_acc"]
        rows = read(str(out / arm / "metrics.jsonl"))
        for r in rows:
            assert r["class_budget"] == 100 // r["total_classes"]            # PyCIL: floor(M / seen)
            assert r["memory_cost"] <= 100 + 1e-4
            assert r["exemplars_min"] <= r["exemplars_mean"] <= r["exemplars_max"]
            if not cim_on:  # uncompressed: exactly the budget a class
                assert r["exemplars_min"] == r["exemplars_max"] == r["class_budget"]
        if cim_on:
            assert max(r["exemplars_mean"] for r in rows[1:]) > rows[-1]["class_budget"]
    d = paired["difference"]["foster_cim"]
    assert d["avg_inc_acc"] == pytest.approx(paired["arms"]["foster_cim"]["avg_inc_acc"] -
                                             paired["arms"]["foster"]["avg_inc_acc"])


@pytest.mark.parametrize("arm", ["foster", "foster_cim"])
def test_the_teacher_is_scored_and_the_student_logged(paired_run, arm):
    """The headline curve is the teacher's (official trainer.py scores self._network), the student's is logged
    as student_*: the two-backbone teacher's accuracies (as evaluated) are acc_per_phase, the single-backbone
    student's student_acc_per_phase and student_acc_matrix; the checkpointed model is the student; the curves differ."""
    out, seen = paired_run
    res = read(str(out / arm / "results.json"))
    assert [(p, n) for p, n, _, _ in seen[arm]] == [(0, 1), (1, 2), (1, 1), (2, 2), (2, 1)]
    teacher, student = [seen[arm][i][2] for i in (0, 1, 3)], [seen[arm][i][2] for i in (0, 2, 4)]
    assert res["scored_model"] == "teacher" and res["acc_per_phase"] == teacher
    assert res["student_acc_per_phase"] == student and student[1:] != teacher[1:]
    assert res["student_acc_matrix"][2] == seen[arm][4][3] and len(res["student_acc_matrix"]) == 3
    ckpt = torch.load(out / arm / "checkpoint.pt", map_location="cpu", weights_only=False)
    model = cim.build_model(cim.parse_args(["--smoke", "--device", "cpu"]), 20)
    model.load_state_dict(ckpt["model"])
    data = load_dataset("synthetic", "", torch.device("cpu"), image_size=16)
    apply_class_order(data, res["class_order"])
    acc = evaluate(model.eval(), data, [(0, 10), (10, 15), (15, 20)], 2, torch.device("cpu"))["cnn_acc"]
    assert acc == pytest.approx(res["student_last_acc"], abs=1e-4)


def test_stop_mid_phase_and_resume_gives_the_same_numbers(paired_run, tmp_path, capsys):
    """Stopped (as by SIGTERM) in phase 1's second boosting epoch, after its CAM refresh: --resume restores the
    boxes and compression probability of the checkpoint (no refresh from a half-trained model) and ends phase 1
    with the numbers of the uninterrupted run. Smoke steps: phase 0 2 x 15 (120 images, batch 8); phase 1 epochs of
    ceil((60 + compressed exemplars) / 8) steps: 21 to 23 in our runs (how many exemplars the compression keeps
    depends on float rounding, e.g. on the thread count), so step 56 lies in its second epoch (any length 14-25)."""
    out, _ = paired_run
    flags = ["--smoke", "--device", "cpu", "--out-dir", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: cim.main(flags + ["--checkpoint-minutes", "0", "--stop-after-steps", "56"]))
    assert exit_.value.code == 143 and re.search(r"in phase 1, epoch 2 after step \d+;", capsys.readouterr().err)
    assert cim.main(flags + ["--resume", "--stop-after", "1"]) is None  # phase 2 would add nothing to check
    assert "phase 1: resumed at epoch 2 step" in capsys.readouterr().out
    resumed = read(str(tmp_path / "r" / "metrics.jsonl"))
    straight = read(str(out / "foster_cim" / "metrics.jsonl"))[:2]  # the same settings, uninterrupted
    assert len(resumed) == 2
    for key in ("cnn_acc", "nme_acc", "student_cnn_acc", "student_nme_acc", "exemplars_mean", "memory_cost"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key


def test_bench_step_runs():
    from common.bench import main as bench
    rows = bench(["--scripts", "cim", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--device", "cpu",
                  "--script-flags=--smoke"])
    assert rows[0][0] == "cim" and rows[0][2] > 0


def test_batch_fn_sees_each_batch_with_its_indices():
    """common.batches.train_batches(batch_fn=...): the hook CIM compresses small images with (before their
    augmentation) gets every batch's dataset indices."""
    from common.batches import train_batches
    data = load_dataset("synthetic", "", torch.device("cpu"), image_size=8)
    seen = []

    def batch_fn(x, idx):
        seen.append(idx.clone())
        return x
    indices = torch.arange(0, len(data.train_y), 2)
    for x, y in train_batches(data, indices, 2, torch.device("cpu"), 0, batch_fn=batch_fn):
        assert torch.equal(y, data.train_y[seen[-1]])
    assert set(torch.cat(seen).tolist()) == set(indices.tolist())
