"""Shared test helpers: tiny datasets written in each real on-disk format, and a subprocess runner."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One thread a test process (set before torch is imported; subprocesses inherit it): the tests' models and batches
# are tiny, so threads cost more than they give, and the suite runs as two processes (`pytest -n 2`, README).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_script(*args, timeout=300):
    """Run a top-level script (e.g. 'lucir.py', '--smoke') on the CPU and return the CompletedProcess."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def solid_image(path, colour, size=16):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path)


def colour_of(label):
    """A distinct, JPEG-stable colour per class, so a test can check that images and labels line up."""
    return [(label * 40) % 256, (label * 90 + 30) % 256, (255 - label * 25) % 256]


@pytest.fixture
def cifar_dir(tmp_path):
    """torchvision's CIFAR-100 pickles: 100 classes, 3 train and 1 test image each, pixel value = label."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, per_class in (("train", 3), ("test", 1)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = np.stack([np.full(3072, c, dtype=np.uint8) for c in labels])
        data[:, 0] = np.arange(len(labels)) % 256  # first red pixel: the position in the file
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return tmp_path


@pytest.fixture
def tiny_imagenet_dir(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # not sorted on purpose: labels follow the sorted order
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for w in wnids:
        label = sorted(wnids).index(w)
        for i in range(2):
            solid_image(str(root / "train" / w / "images" / f"{w}_{i}.JPEG"), colour_of(label), 64)
        name = f"val_{label}.JPEG"
        solid_image(str(root / "val" / "images" / name), colour_of(label), 64)
        lines.append(f"{name}\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def imagenet_dir(tmp_path):
    """ImageFolder layout with 120 classes (enough for LUCIR's 100-class subset draw), 1 image per split."""
    for split in ("train", "val"):
        for c in range(120):
            solid_image(str(tmp_path / split / f"n{c:08d}" / f"img_{split}_{c}.JPEG"), colour_of(c % 10), 8)
    return tmp_path


@pytest.fixture
def food_dir(tmp_path):
    root = tmp_path / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    train, test = [], []
    for c, name in enumerate(classes):
        for i in range(3):
            solid_image(str(root / "images" / name / f"{c}{i}.jpg"), colour_of(c), 8)
            (train if i < 2 else test).append(f"{name}/{c}{i}")
    (root / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    return tmp_path


@pytest.fixture
def cub_dir(tmp_path):
    root = tmp_path / "CUB_200_2011"
    images, labels, split = [], [], []
    image_id = 0
    for c in range(1, 4):  # CUB class ids are 1-based
        for i in range(3):
            image_id += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
            solid_image(str(root / "images" / rel), colour_of(c - 1), 8)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {1 if i < 2 else 0}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return tmp_path
