"""--classes, --train-per-class, --image-size: the kept classes, the kept files in the documented order, the
resized shape, on each real on-disk layout; phases that do not add up to --classes; the shared real archives."""
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from common.batches import eval_batches
from common.data import load_dataset, resize_images, subset_indices
from common.errors import UserError
from conftest import run_script, solid_image

CPU = torch.device("cpu")
SHARED_TINY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tiny-imagenet-200")


def file_colour(label, i):
    """A JPEG-stable colour that names both the class and the file."""
    return [40 + 60 * label, 40 + 50 * i, 128]


def decode(img):
    """(label, file) back from the mean colour of a decoded image (NHWC uint8)."""
    r, g, _ = img.float().mean(dim=(0, 1)).tolist()
    return round((r - 40) / 60), round((g - 40) / 50)


def test_subset_indices_rules():
    labels = [2, 0, 1, 0, 2, 0, 1]
    names = ["c", "z", "b", "a", "a", "m", "a"]
    assert subset_indices(labels, names, classes=2) == [1, 2, 3, 5, 6]
    assert subset_indices(labels, names, per_class=1) == [3, 4, 6]          # first name of each class
    assert subset_indices(labels, None, per_class=1) == [0, 1, 2]           # file order without names
    assert subset_indices(labels, names, classes=1, per_class=2) == [3, 5]  # "a", "m" of class 0


def test_cifar_pickles_subset_and_resize(cifar_dir):
    data = load_dataset("cifar100", str(cifar_dir), CPU, classes=10, train_per_class=2, image_size=16)
    assert data.num_classes == 10 and data.train_x.shape == (20, 16, 16, 3) and data.test_x.shape == (10, 16, 16, 3)
    assert data.train_y.tolist() == [c for c in range(10) for _ in range(2)]
    assert data.test_y.tolist() == list(range(10))                       # every test image of the kept classes
    assert (data.train_x[:, 8, 8, 1].long() == data.train_y).all()      # solid pixel value = label survives
    full = load_dataset("cifar100", str(cifar_dir), CPU, train_per_class=2)
    kept_positions = full.train_x[:, 0, 0, 0].tolist()                  # first red pixel = position in the file
    assert kept_positions == [p % 256 for c in range(100) for p in (3 * c, 3 * c + 1)]  # pickle: file order


@pytest.fixture
def tiny_layout(tmp_path):
    """Tiny-ImageNet layout whose file names are created out of sorted order, one colour per (class, file)."""
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]                  # labels follow the sorted wnids: n01=0, n02=1, n03=2
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for w in wnids:
        label = sorted(wnids).index(w)
        for i, stem in enumerate(["c", "a", "b"]):  # sorted order: a (i=1), b (i=2), c (i=0)
            solid_image(str(root / "train" / w / "images" / f"{w}_{stem}.JPEG"), file_colour(label, i), 64)
        for i in range(2):
            name = f"val_{label}_{i}.JPEG"
            solid_image(str(root / "val" / "images" / name), file_colour(label, i), 64)
            lines.append(f"{name}\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_tinyimagenet_subset_keeps_sorted_classes_and_files(tiny_layout):
    data = load_dataset("tinyimagenet", str(tiny_layout), CPU, classes=2, train_per_class=2, image_size=32)
    assert data.num_classes == 2 and data.class_names == ["n01", "n02"]
    assert data.train_x.shape == (4, 32, 32, 3) and data.image_size == 32
    assert [decode(img) for img in data.train_x] == [(0, 1), (0, 2), (1, 1), (1, 2)]  # files a, b of n01, n02
    assert data.train_y.tolist() == [0, 0, 1, 1]
    assert sorted(decode(img) for img in data.test_x) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # all kept val images


def test_food101_subset_sorted_file_names_and_crop_size(tmp_path):
    root = tmp_path / "food-101"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("apple_pie\nbaklava\nchurros\n")
    train, test = [], []
    for label, name in enumerate(["apple_pie", "baklava", "churros"]):
        for i, stem in enumerate(["30", "10", "20"]):       # train.txt lists them out of sorted order
            solid_image(str(root / "images" / name / f"{stem}.jpg"), file_colour(label, i), 8)
            train.append(f"{name}/{stem}")
        solid_image(str(root / "images" / name / "99.jpg"), file_colour(label, 0), 8)
        test.append(f"{name}/99")
    (root / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    data = load_dataset("food101", str(tmp_path), CPU, classes=2, train_per_class=1, image_size=48)
    assert [os.path.basename(f) for f in data.train_files] == ["10.jpg", "10.jpg"]
    assert data.train_y.tolist() == [0, 1] and data.test_y.tolist() == [0, 1] and data.num_classes == 2
    x, _ = next(eval_batches(data, torch.arange(2), CPU, "test", batch_size=2))
    assert x.shape == (2, 3, 48, 48)                                       # large images: crop size S


def test_resize_is_bilinear():
    x = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    x[0, :, 1] = 200                                                       # left column 0, right column 200
    up = resize_images(x, 4)
    assert up.shape == (1, 4, 4, 3)
    assert up[0, 0, :, 0].tolist() == [0, 50, 150, 200]                    # half-pixel-centre bilinear weights


def test_bad_subset_values_are_one_line(cifar_dir):
    for kwargs, message in ((dict(classes=101), "has only 100 classes"), (dict(classes=1), "at least 2"),
                            (dict(train_per_class=0), "at least 1"), (dict(image_size=4), "at least 8")):
        with pytest.raises(UserError, match=message) as e:
            load_dataset("cifar100", str(cifar_dir), CPU, **kwargs)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("script", ["lucir", "tbbn", "bsce"])
def test_phases_must_add_up_to_classes(script, tmp_path):
    module = __import__(script)
    with pytest.raises(UserError, match="--classes") as e:  # smoke: base 10 + phases of 5; 12 classes don't fit
        module.main(["--smoke", "--classes", "12", "--out-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run")


def test_subset_flags_end_to_end_recorded(tmp_path):
    out = tmp_path / "run"
    r = run_script("lucir.py", "--smoke", "--classes", "15", "--train-per-class", "12", "--image-size", "16",
                   "--out-dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.load(open(out / "results.json"))
    assert (results["args"]["classes"], results["args"]["train_per_class"], results["args"]["image_size"]) == \
        (15, 12, 16)
    assert len(results["class_order"]) == 15 and len(results["acc_matrix"]) == 2   # B10 + one phase of 5


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_TINY, "val.tar.gz")),
                    reason="../shared/data/tiny-imagenet-200 not present")
def test_subset_flags_on_real_tinyimagenet(tmp_path):
    """Three real classes unpacked from the shared archives; keep 2 classes, 2 images each, at 32 px."""
    root = tmp_path / "tiny-imagenet-200"
    with tarfile.open(os.path.join(SHARED_TINY, "val.tar.gz")) as tar:
        annotations = tar.extractfile("tiny-imagenet-200/val/val_annotations.txt").read().decode().splitlines()
        wnids = tar.extractfile("tiny-imagenet-200/wnids.txt").read().decode().split()[:3]  # in train-0.tar.gz
        keep = [line for line in annotations if line.split("\t")[1] in wnids]
        for line in keep:
            tar.extract(f"tiny-imagenet-200/val/images/{line.split(chr(9))[0]}", tmp_path, filter="data")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "val" / "val_annotations.txt").write_text("\n".join(keep) + "\n")
    with tarfile.open(os.path.join(SHARED_TINY, "train-0.tar.gz")) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 5 and parts[2] in wnids and parts[4].endswith(("_0.JPEG", "_1.JPEG", "_10.JPEG")):
                tar.extract(member, tmp_path, filter="data")
    data = load_dataset("tinyimagenet", str(tmp_path), CPU, classes=2, train_per_class=2, image_size=32)
    kept = sorted(wnids)[:2]
    assert data.class_names == kept and data.train_x.shape == (4, 32, 32, 3) and data.train_x.float().std() > 10
    assert data.test_y.tolist() == [kept.index(line.split("\t")[1]) for line in keep if line.split("\t")[1] in kept]
    assert len(data.test_y) == 100                                          # 50 val images a class, all kept
    from PIL import Image                                                   # sorted names: _0 then _1 (not _10)
    first = os.path.join(root, "train", kept[0], "images", f"{kept[0]}_0.JPEG")
    with Image.open(first) as im:
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR))
    assert np.array_equal(data.train_x[0].numpy(), expected)
