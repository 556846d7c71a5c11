"""common/: class order, phases, augmentation, herding, NME, metrics, backbones, loaders, bad input."""
import ast
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.batches import augment, eval_batches, train_batches
from common.data import apply_class_order, class_order, indices_of, load_dataset, phase_splits, synthetic
from common.evaluation import evaluate, summarize
from common.memory import check_budget, class_means, exemplars_per_class, herding, reduce_memory, select_exemplars
from common.models import count_parameters, create_backbone, stage_features
from common.errors import UserError
from conftest import ROOT, colour_of

CPU = torch.device("cpu")
SHARED_TINY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tiny-imagenet-200")

CORE = ("data", "batches", "memory", "models", "evaluation")  # the method-facing core a reader can copy (README "Layout")


@pytest.mark.parametrize("module", CORE)
def test_core_imports_nothing_of_the_run_lifecycle(module):
    """A core module imports only the core, the error type and the torchrun helpers: no flags, checkpoints,
    stage, results or stop (an allow-list, so a new harness module is caught too)."""
    with open(os.path.join(ROOT, "common", f"{module}.py")) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {f"{node.module}.{a.name}" if node.module == "common" else node.module for a in node.names}
    allowed = {f"common.{m}" for m in CORE + ("errors", "dist")}
    assert not {m for m in imported if m.split(".")[0] == "common"} - allowed


def test_class_order_seed_1993():
    order = class_order(100, 1993)
    assert order[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]       # papers.md 0.1
    assert order[-5:] == [67, 29, 49, 57, 33]
    assert sorted(order) == list(range(100))


def test_phase_splits_and_bad_split():
    assert phase_splits(100, 50, 10) == [(0, 50), (50, 60), (60, 70), (70, 80), (80, 90), (90, 100)]
    assert len(phase_splits(100, 10, 10)) == 10
    with pytest.raises(UserError, match="do not add up"):
        phase_splits(100, 50, 7)


def test_cifar100_synthetic_has_cifar_shapes():
    data = load_dataset("cifar100-synthetic", "", CPU)
    assert data.num_classes == 100 and data.train_x.shape == (50000, 32, 32, 3) and data.test_x.shape[0] == 10000
    assert torch.bincount(data.train_y).tolist() == [500] * 100


def test_apply_class_order_relabels_by_rank():
    data = synthetic(num_classes=5, train_per_class=2, test_per_class=1)
    order = [3, 0, 4, 1, 2]
    apply_class_order(data, order)
    assert data.train_y.tolist() == [1, 1, 3, 3, 4, 4, 0, 0, 2, 2]   # original class 0 is now rank 1, ...
    assert indices_of(data.train_y, 0, 1).tolist() == [6, 7]            # rank 0 = original class 3


@pytest.mark.parametrize("mode", ["constant", "replicate"])
def test_augment_is_a_pure_translation_or_flip(mode):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    out = augment(x, padding=2, mode=mode)
    padded = F.pad(x.permute(0, 3, 1, 2).float(), (2, 2, 2, 2), mode=mode).permute(0, 2, 3, 1).to(torch.uint8)
    for i in range(len(x)):
        candidates = [padded[i, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates), i


def test_train_batches_fixed_size_cover_every_sample():
    data = synthetic(num_classes=4, train_per_class=5, test_per_class=1)
    idx = torch.arange(3, 20)  # 17 samples, batch 8 -> 3 batches of 8, the last wrapped around
    seen = []
    batches = list(train_batches(data, idx, 8, CPU))
    assert [len(y) for _, y in batches] == [8, 8, 8]
    assert batches[0][0].shape == (8, 3, 32, 32)
    for _, y in batches:
        seen += y.tolist()
    assert sorted(set(seen)) == sorted(set(data.train_y[idx].tolist()))
    few = list(train_batches(data, torch.tensor([2, 7, 11]), 8, CPU))  # fewer than half a batch: still 8
    assert len(few) == 1 and len(few[0][1]) == 8 and set(few[0][1].tolist()) == set(data.train_y[[2, 7, 11]].tolist())


def test_train_batches_without_augmentation_are_the_shuffled_images():
    data = synthetic(num_classes=4, train_per_class=5, test_per_class=1)
    idx = torch.arange(3, 20)
    torch.manual_seed(0)
    batches = list(train_batches(data, idx, 8, CPU, augmentation="none"))  # as genifer's GAN batches
    torch.manual_seed(0)
    order = idx[torch.randperm(len(idx))]  # the same shuffle; the images as eval_batches reads them
    for (x, y), (x_want, y_want) in zip(batches[:2], eval_batches(data, order[:16], CPU, "train", 8)):
        assert torch.equal(x, x_want) and torch.equal(y, y_want)
    assert len(batches) == 3
    torch.manual_seed(0)  # drop_last (genifer's GAN batches): the same first two batches, no wrapped third
    dropped = list(train_batches(data, idx, 8, CPU, augmentation="none", drop_last=True))
    assert len(dropped) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(dropped, batches))


def brute_force_herding(feats, m):
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    mu = feats.mean(0)
    chosen = []
    for k in range(1, m + 1):
        best, best_d = None, np.inf
        for i in range(len(feats)):
            if i in chosen:
                continue
            d = np.sum((mu - (feats[chosen].sum(0) + feats[i]) / k) ** 2)
            if d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_matches_brute_force():
    rng = np.random.RandomState(0)
    feats = rng.randn(40, 6).astype(np.float64)
    got = herding(torch.tensor(feats), 12).tolist()
    assert got == brute_force_herding(feats, 12)
    assert len(set(got)) == 12
    assert herding(torch.tensor(feats), 100).numel() == 40  # never more than the class holds


def test_select_exemplars_returns_dataset_indices_and_reduction_keeps_prefix():
    data = synthetic(num_classes=3, train_per_class=6, test_per_class=1)
    feature_fn = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    memory = select_exemplars(feature_fn, data, [0, 2], 4, CPU)
    assert set(memory) == {0, 2}
    for c, idx in memory.items():
        assert len(idx) == 4 and (data.train_y[idx] == c).all()
        feats = torch.cat([feature_fn(x) for x, _ in eval_batches(data, indices_of(data.train_y, c, c + 1), CPU,
                                                                    "train")])
        expected = indices_of(data.train_y, c, c + 1)[brute_force_herding(feats.double().numpy(), 4)]
        assert idx.tolist() == expected.tolist()
    reduced = reduce_memory(memory, 2)
    assert {c: v.tolist() for c, v in reduced.items()} == {c: v[:2].tolist() for c, v in memory.items()}


def test_memory_budgets():
    assert exemplars_per_class(60, 20) == 20
    assert exemplars_per_class(60, 20, 2000) == 33
    with pytest.raises(UserError, match="cannot hold one exemplar"):
        check_budget(100, 20, memory_total=50)
    with pytest.raises(UserError, match="cannot hold one exemplar"):
        check_budget(100, 0)
    check_budget(100, 0, allow_zero=True)


def test_class_means_and_nme_against_brute_force():
    torch.manual_seed(0)
    data = synthetic(num_classes=3, train_per_class=5, test_per_class=4)
    weights = torch.randn(3 * 32, 5)

    def feature_fn(x):  # depends on the column order, so flipping changes the features
        return x.mean(dim=2).flatten(1) @ weights
    memory = {0: torch.tensor([0, 2]), 1: torch.tensor([5, 6, 9]), 2: torch.tensor([14])}
    means = class_means(feature_fn, data, memory, 3, CPU)
    for c, idx in memory.items():
        x = torch.stack([x for x, _ in eval_batches(data, idx, CPU, "train", batch_size=1)]).squeeze(1)
        expected = ((F.normalize(feature_fn(x), dim=1) + F.normalize(feature_fn(x.flip(3)), dim=1)) / 2).mean(0)
        assert torch.allclose(means[c], expected / expected.norm(), atol=1e-5)

    splits = [(0, 2), (2, 3)]
    logits_w = torch.randn(5, 3)
    result = evaluate(lambda x: (feature_fn(x) @ logits_w, feature_fn(x)), data, splits, 1, CPU, means)
    hits_cnn, hits_nme = [], []
    for i in range(len(data.test_y)):
        x = next(eval_batches(data, torch.tensor([i]), CPU))[0]
        f = feature_fn(x)[0]
        hits_cnn.append(int((f @ logits_w).argmax()) == int(data.test_y[i]))
        dists = [float(((f / f.norm() - means[c]) ** 2).sum()) for c in range(3)]
        hits_nme.append(int(np.argmin(dists)) == int(data.test_y[i]))
    assert result["cnn_acc"] == pytest.approx(100 * np.mean(hits_cnn))
    assert result["nme_acc"] == pytest.approx(100 * np.mean(hits_nme))
    y = data.test_y.numpy()
    assert result["nme_acc_per_task"][1] == pytest.approx(100 * np.mean(np.array(hits_nme)[y == 2]))


def test_summary_metrics_on_a_hand_made_matrix():
    matrix = [[80.0], [70.0, 60.0], [50.0, 40.0, 90.0]]
    out = summarize([80.0, 65.0, 60.0], matrix)
    assert out["avg_inc_acc"] == pytest.approx((80 + 65 + 60) / 3)    # base phase included
    assert out["last_acc"] == 60.0
    assert out["forgetting"] == pytest.approx(((80 - 50) + (60 - 40)) / 2)
    assert summarize([70.0], [[70.0]])["forgetting"] is None


def test_resnet32_backbone():
    model = create_backbone("resnet32", last_relu=False)
    assert count_parameters(model) + 64 * 100 + 100 == 472_756            # style.md 3.2: 0.46M with a 100-way head
    maps = {}
    model.layer3.register_forward_hook(lambda m, i, o: maps.update(last=o))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert (maps["last"] < 0).any()                                       # no last ReLU: negative activations
    with_relu = create_backbone("resnet32")
    with_relu.layer3.register_forward_hook(lambda m, i, o: maps.update(last=o))
    with_relu(torch.randn(2, 3, 32, 32))
    assert (maps["last"] >= 0).all()
    import timm
    assert "resnet32" in timm.list_models("resnet32")                    # registered with timm
    r18 = create_backbone("resnet18", last_relu=False, small_input=True)
    assert r18(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(UserError, match="unknown --backbone"):
        create_backbone("no_such_net")


# ------------------------------------------------------------------------------------------------ loaders
def test_cifar100_loader(cifar_dir):
    data = load_dataset("cifar100", str(cifar_dir), CPU)
    assert data.num_classes == 100 and data.train_x.shape == (300, 32, 32, 3) and data.test_x.shape == (100, 32, 32, 3)
    assert data.train_x.dtype == torch.uint8
    assert (data.train_x[:, 1, 1, 1].long() == data.train_y).all()      # pixel value written = label
    assert data.train_x[7, 0, 0, 0] == 7                                  # first pixel = position in the file


def test_tinyimagenet_loader(tiny_imagenet_dir):
    data = load_dataset("tinyimagenet", str(tiny_imagenet_dir), CPU)
    assert data.num_classes == 3 and data.class_names == ["n01", "n02", "n03"]
    assert data.train_x.shape == (6, 64, 64, 3) and data.test_x.shape == (3, 64, 64, 3)
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        for img, label in zip(x, y):
            assert np.allclose(img.float().mean(dim=(0, 1)).numpy(), colour_of(int(label)), atol=4)


def check_file_dataset(data, num_classes, n_train, n_test):
    assert data.num_classes == num_classes and len(data.train_files) == n_train and len(data.test_files) == n_test
    assert len(data.train_y) == n_train and all(os.path.isfile(f) for f in data.train_files + data.test_files)
    x, y = next(eval_batches(data, torch.arange(n_test), CPU, "test", batch_size=n_test))
    assert x.shape == (n_test, 3, 224, 224) and y.tolist() == data.test_y.tolist()
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    for img, label in zip(x, y):  # solid colours survive resizing: the image of each label is the right one
        rgb = (img * std + mean).mean(dim=(1, 2)) * 255
        assert np.allclose(rgb.numpy(), colour_of(int(label) % 10 if num_classes > 10 else int(label)), atol=6)
    xb, yb = next(train_batches(data, torch.arange(n_train), 2, CPU))
    assert xb.shape == (2, 3, 224, 224) and len(yb) == 2


def test_imagenet_loaders(imagenet_dir):
    full = load_dataset("imagenet", str(imagenet_dir), CPU)
    check_file_dataset(full, 120, 120, 120)
    subset = load_dataset("imagenet100", str(imagenet_dir), CPU)
    classes = sorted(f"n{c:08d}" for c in range(120))
    assert subset.class_names == sorted(np.random.RandomState(1993).choice(classes, 100, replace=False).tolist())
    assert len(subset.train_files) == 100
    class_list = imagenet_dir / "classes.txt"
    class_list.write_text("n00000003\nn00000001\n")
    listed = load_dataset("imagenet100", str(imagenet_dir), CPU, str(class_list))
    assert listed.class_names == ["n00000001", "n00000003"]


def test_food101_loader(food_dir):
    data = load_dataset("food101", str(food_dir), CPU)
    check_file_dataset(data, 3, 6, 3)
    assert data.class_names == ["apple_pie", "baby_back_ribs", "baklava"]


def test_cub200_loader(cub_dir):
    data = load_dataset("cub200", str(cub_dir), CPU)
    check_file_dataset(data, 3, 6, 3)
    assert data.train_y.tolist() == [0, 0, 1, 1, 2, 2]                   # 1-based CUB labels made 0-based


@pytest.mark.parametrize("name", ["cifar100", "tinyimagenet", "imagenet", "imagenet100", "food101", "cub200"])
def test_missing_dataset_is_one_clear_error(tmp_path, name):
    with pytest.raises(UserError) as e:
        load_dataset(name, str(tmp_path / "nowhere"), CPU)
    assert "expected" in str(e.value) and "\n" not in str(e.value)
    if name != "cifar100":  # an empty folder (cifar100 would try to download into it)
        with pytest.raises(UserError, match="expected"):
            load_dataset(name, str(tmp_path), CPU)
    with pytest.raises(UserError, match="unknown --dataset"):
        load_dataset("mnist", str(tmp_path), CPU)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_TINY, "val.tar.gz")),
                    reason="../shared/data/tiny-imagenet-200 not present")
def test_tinyimagenet_loader_on_real_images(tmp_path):
    """A few real Tiny-ImageNet images, unpacked from the shared archives into the native layout."""
    root = tmp_path / "tiny-imagenet-200"
    with tarfile.open(os.path.join(SHARED_TINY, "val.tar.gz")) as tar:
        annotations = tar.extractfile("tiny-imagenet-200/val/val_annotations.txt").read().decode().splitlines()
        wnids = tar.extractfile("tiny-imagenet-200/wnids.txt").read().decode().split()
        chosen = wnids[:2]  # train-0.tar.gz holds the first 40 classes of wnids.txt
        keep = [line for line in annotations if line.split("\t")[1] in chosen][:6]
        for line in keep:
            tar.extract(f"tiny-imagenet-200/val/images/{line.split(chr(9))[0]}", tmp_path, filter="data")
    (root / "wnids.txt").write_text("\n".join(chosen) + "\n")
    (root / "val" / "val_annotations.txt").write_text("\n".join(keep) + "\n")
    with tarfile.open(os.path.join(SHARED_TINY, "train-0.tar.gz")) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 5 and parts[2] in chosen and parts[3] == "images" and parts[4].endswith("_1.JPEG") or \
                    len(parts) == 5 and parts[2] in chosen and parts[4].endswith(("_2.JPEG", "_3.JPEG")):
                tar.extract(member, tmp_path, filter="data")
    data = load_dataset("tinyimagenet", str(tmp_path), CPU)
    assert data.num_classes == 2 and data.train_x.shape[1:] == (64, 64, 3) and len(data.train_x) >= 2
    assert data.test_x.shape == (len(keep), 64, 64, 3) and data.train_x.float().std() > 10
    assert data.test_y.tolist() == [sorted(chosen).index(line.split("\t")[1]) for line in keep]


# ------------------------------------------------------------------------------------------------ issue 8
def test_random_resized_crop_resamples_the_padded_image():
    """FACIL's CIFAR-100 transform (Pad 4, RandomResizedCrop 32, flip) in batch: a full box is the bilinear resize
    of the padded image; a box of the output size is an integer crop of it."""
    from common.batches import random_resized_crop
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8)
    padded = F.pad(x, (0, 0, 2, 2, 2, 2)).permute(0, 3, 1, 2).float()
    full = random_resized_crop(x, padding=2, scale=(1, 1), ratio=(1, 1)).permute(0, 3, 1, 2)
    resized = F.interpolate(padded, size=8, mode="bilinear", align_corners=False).round()
    for i in range(len(x)):
        assert torch.equal(full[i].float(), resized[i]) or torch.equal(full[i].float(), resized[i].flip(2)), i
    crops = random_resized_crop(x, padding=2, scale=(64 / 144, 64 / 144), ratio=(1, 1)).permute(0, 3, 1, 2)
    for i in range(len(x)):  # an 8 x 8 box of the 12 x 12 padded image
        candidates = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(crops[i].float(), c) or torch.equal(crops[i].float(), c.flip(2))
                   for c in candidates), i


def test_exemplars_per_class_rounding():
    assert exemplars_per_class(60, 20, 2000, rounding="ceil") == 34          # LUCIR/FACIL: ceil(2000 / 60)
    assert exemplars_per_class(60, 20, 2000, rounding="floor") == 33         # PyCIL
    assert exemplars_per_class(50, 20, 2000, rounding="ceil") == 40
    assert exemplars_per_class(60, 20, rounding="ceil") == 20                # growing memory: no rounding


def test_class_means_second_views():
    """`channels` = the official LUCIR CIFAR view: colour channels of the raw image reversed, then normalised;
    `none` = the ImageNet code's D2 = D."""
    torch.manual_seed(0)
    data = synthetic(num_classes=2, train_per_class=3, test_per_class=1)
    data.mean, data.std = (0.2, 0.5, 0.7), (0.3, 0.2, 0.1)
    weights = torch.randn(3, 4)

    def feature_fn(x):  # depends on the channel order and values
        return x.mean(dim=(2, 3)) @ weights
    memory = {0: torch.tensor([0, 2]), 1: torch.tensor([4])}
    for view in ("channels", "none"):
        means = class_means(feature_fn, data, memory, 2, CPU, view=view)
        for c, idx in memory.items():
            raw = data.train_x[idx].permute(0, 3, 1, 2).float() / 255
            mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
            norm = lambda r: (r - mean) / std  # noqa: E731
            first = F.normalize(feature_fn(norm(raw)), dim=1)
            second = F.normalize(feature_fn(norm(raw.flip(1))), dim=1) if view == "channels" else first
            expected = ((first + second) / 2).mean(0)
            assert torch.allclose(means[c], expected / expected.norm(), atol=1e-5), (view, c)


def test_timm_backbones_keep_gamma_one():
    """torchvision/LUCIR/FACIL ResNets start every BN at gamma 1; timm zero-initialises the last BN of a block
    unless told not to."""
    model = create_backbone("resnet18")
    gammas = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(gammas) == 20 and all(bool((g == 1).all()) for g in gammas)


def test_two_file_streams_side_by_side_keep_their_own_samples(food_dir):
    """Large-image path with workers: two streams of the same batch size iterated together (TBBN's current part
    and exemplar part) must each yield only their own samples."""
    data = load_dataset("food101", str(food_dir), CPU)
    a, b = indices_of(data.train_y, 0, 1), indices_of(data.train_y, 1, 3)  # 2 and 4 images
    for _ in range(2):
        pairs = list(zip(train_batches(data, a, 1, CPU, workers=1, stream="current"),
                         train_batches(data, b, 1, CPU, workers=1, stream="memory")))
        assert len(pairs) == 2
        for (_, ya), (_, yb) in pairs:
            assert ya.tolist() == [0] and yb.item() in (1, 2)


@pytest.mark.parametrize("name,layer,small", [("resnet32", "layer2", False), ("resnet18", "layer3", True)])
def test_stage_features_are_the_backbones_own_stages(name, layer, small):
    """The map after `layer` and the pooled last stage equal what the backbone's own forward computes."""
    torch.manual_seed(0)
    backbone = create_backbone(name, small_input=small).eval()
    x = torch.randn(2, 3, 32, 32)
    fmap, pooled = stage_features(backbone, x, layer)
    with torch.no_grad():
        assert torch.allclose(pooled, backbone.forward_features(x).mean((2, 3)), atol=1e-6)
        expected = getattr(backbone, "maxpool", torch.nn.Identity())(backbone.bn1(backbone.conv1(x)).relu())
        for stage in ("layer1", "layer2", "layer3")[:int(layer[-1])]:
            expected = getattr(backbone, stage)(expected)
        assert fmap.shape == expected.shape and torch.allclose(fmap, expected, atol=1e-6)
