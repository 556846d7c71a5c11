"""Datasets, class order and phase splits (the batch iterators are in common.batches).

Small-image datasets (cifar100, tinyimagenet, synthetic) live on the training device as uint8 NHWC tensors, and a
phase's training set or the exemplar memory is a tensor of indices into them; large-image datasets (imagenet100,
imagenet, food101, cub200) keep file paths. Labels are re-indexed by the class order: label k is the k-th class
of the order, so the classes seen after a phase are 0 .. total-1.
"""
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from common.errors import UserError

SMALL_IMAGE_DATASETS = ("cifar100", "tinyimagenet", "synthetic", "cifar100-synthetic")
LARGE_IMAGE_DATASETS = ("imagenet100", "imagenet", "food101", "cub200")
DATASETS = SMALL_IMAGE_DATASETS + LARGE_IMAGE_DATASETS

# (classes, image size) of each dataset, for generated inputs of the real shapes (common/bench.py)
SHAPES = {"cifar100": (100, 32), "tinyimagenet": (200, 64), "synthetic": (20, 32), "cifar100-synthetic": (100, 32),
          "imagenet100": (100, 224), "imagenet": (1000, 224), "food101": (101, 224), "cub200": (200, 224)}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LUCIR_CIFAR_MEAN, LUCIR_CIFAR_STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)  # LUCIR official code

LAYOUTS = {
    "cifar100": "<data-dir>/cifar-100-python/{train,test,meta} (torchvision's CIFAR-100 pickles)",
    "tinyimagenet": "<data-dir>/tiny-imagenet-200/{wnids.txt,train/<wnid>/images/*.JPEG,val/images/*.JPEG,"
                    "val/val_annotations.txt}",
    "imagenet100": "<data-dir>/{train,val}/<wnid>/*.JPEG (ImageNet train and val sorted into class folders)",
    "imagenet": "<data-dir>/{train,val}/<wnid>/*.JPEG (ImageNet train and val sorted into class folders)",
    "food101": "<data-dir>/food-101/{images/<class>/<id>.jpg,meta/train.txt,meta/test.txt,meta/classes.txt}",
    "cub200": "<data-dir>/CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,images/}",
}
# cifar100-synthetic: generated images of CIFAR-100's shapes, to time the full protocol without the data.


@dataclass
class Data:
    name: str
    num_classes: int
    train_y: torch.Tensor                 # int64, CPU, labels in class-order rank after apply_class_order
    test_y: torch.Tensor
    mean: tuple
    std: tuple
    image_size: int
    train_x: torch.Tensor = None          # small images: uint8 (N, H, W, 3) on the training device
    test_x: torch.Tensor = None
    train_files: list = field(default_factory=list)   # large images: file paths
    test_files: list = field(default_factory=list)
    class_names: list = field(default_factory=list)

    @property
    def on_device(self) -> bool:
        return self.train_x is not None


# ----------------------------------------------------------------------------------------------- class order
def class_order(num_classes: int, seed: int = 1993) -> list:
    """LUCIR's order: np.random.seed(1993); shuffle(arange(n)). CIFAR-100 starts 68, 56, 78, 8, 23, ..."""
    rng = np.random.RandomState(seed)
    order = np.arange(num_classes)
    rng.shuffle(order)
    return order.tolist()


def phase_splits(num_classes: int, base_classes: int, increment: int) -> list:
    """[(first, last+1), ...] class ranges of phase 0 (base) and each incremental phase."""
    if base_classes <= 0 or increment <= 0 or base_classes > num_classes or \
            (num_classes - base_classes) % increment:
        raise UserError(f"--base-classes {base_classes} plus phases of --increment {increment} do not add up to "
                        f"the {num_classes} classes in use (the dataset's, or --classes); pick values with "
                        f"base + k*increment = {num_classes}")
    bounds = list(range(base_classes, num_classes + 1, increment))
    return [(0, base_classes)] + [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def apply_class_order(data: Data, order: list) -> Data:
    rank = torch.empty(len(order), dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(len(order))
    data.train_y, data.test_y = rank[data.train_y], rank[data.test_y]
    if data.class_names:
        data.class_names = [data.class_names[c] for c in order]
    return data


def indices_of(labels: torch.Tensor, first: int, last: int) -> torch.Tensor:
    return torch.nonzero((labels >= first) & (labels < last)).flatten()


# ----------------------------------------------------------------------------------------------- loaders
def _missing(name, root, what):
    return UserError(f"{name}: {what} not found under {root}; expected {LAYOUTS[name]} (set --data-dir)")


def _load_cifar100(root):
    folder = os.path.join(root, "cifar-100-python")
    if not os.path.isdir(folder):
        try:  # downloads when the network allows
            import socket
            import torchvision
            socket.setdefaulttimeout(20)
            torchvision.datasets.CIFAR100(root, train=True, download=True)
        except Exception:
            raise _missing("cifar100", root, "cifar-100-python/") from None
    out = []
    for split in ("train", "test"):
        path = os.path.join(folder, split)
        if not os.path.isfile(path):
            raise _missing("cifar100", root, f"cifar-100-python/{split}")
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out += [torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(d["fine_labels"], dtype=torch.long)]
    return Data("cifar100", 100, out[1], out[3], LUCIR_CIFAR_MEAN, LUCIR_CIFAR_STD, 32, out[0], out[2])


def _read_images(paths, size):
    from PIL import Image

    def read(p):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    with ThreadPoolExecutor(8) as pool:
        return torch.from_numpy(np.stack(list(pool.map(read, paths)))) if paths else \
            torch.empty(0, size, size, 3, dtype=torch.uint8)


def _load_tinyimagenet(root, classes=None, train_per_class=None, image_size=None):
    folder = os.path.join(root, "tiny-imagenet-200")
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(root, "wnids.txt")):
        folder = root
    wnids_file = os.path.join(folder, "wnids.txt")
    annotations = os.path.join(folder, "val", "val_annotations.txt")
    if not os.path.isfile(wnids_file) or not os.path.isdir(os.path.join(folder, "train")) or \
            not os.path.isfile(annotations):
        raise _missing("tinyimagenet", root, "tiny-imagenet-200/ with wnids.txt, train/ and val/")
    wnids = sorted(open(wnids_file).read().split())
    label_of = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        img_dir = os.path.join(folder, "train", w, "images")
        if not os.path.isdir(img_dir):
            raise _missing("tinyimagenet", root, f"train/{w}/images")
        names = sorted(os.listdir(img_dir))
        train_paths += [os.path.join(img_dir, n) for n in names]
        train_labels += [label_of[w]] * len(names)
    test_paths, test_labels = [], []
    for line in open(annotations):
        parts = line.split("\t")
        if len(parts) >= 2:
            test_paths.append(os.path.join(folder, "val", "images", parts[0]))
            test_labels.append(label_of[parts[1]])
    keep_train = subset_indices(train_labels, train_paths, classes, train_per_class)
    keep_test = subset_indices(test_labels, test_paths, classes, None)
    size = image_size or 64  # the subset is kept before decoding: only its own files are read
    return Data("tinyimagenet", len(wnids), torch.tensor(train_labels)[keep_train],
                torch.tensor(test_labels)[keep_test], IMAGENET_MEAN, IMAGENET_STD, size,
                _read_images([train_paths[i] for i in keep_train], size),
                _read_images([test_paths[i] for i in keep_test], size), class_names=wnids)


def _load_imagenet(root, name, class_list=None):
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(train_dir) or not os.path.isdir(val_dir):
        raise _missing(name, root, "train/ and val/")
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if name == "imagenet100":
        if class_list:
            if not os.path.isfile(class_list):
                raise UserError(f"--class-list {class_list} does not exist")
            wanted = [w for w in open(class_list).read().split() if w]
        else:  # LUCIR gen_imagenet_subset.py: seed 1993, 100 folders drawn from the sorted train folders
            if len(classes) < 100:
                raise _missing(name, root, f"at least 100 class folders in train/ (found {len(classes)})")
            wanted = np.random.RandomState(1993).choice(classes, 100, replace=False).tolist()
        classes = sorted(wanted)  # the subset itself is sorted by folder name before the class-order shuffle
    out = []
    for split_dir in (train_dir, val_dir):
        files, labels = [], []
        for i, c in enumerate(classes):
            cdir = os.path.join(split_dir, c)
            if not os.path.isdir(cdir):
                raise _missing(name, root, f"class folder {os.path.relpath(cdir, root)}")
            names = sorted(os.listdir(cdir))
            files += [os.path.join(cdir, n) for n in names]
            labels += [i] * len(names)
        out.append((files, labels))
    return Data(name, len(classes), torch.tensor(out[0][1]), torch.tensor(out[1][1]), IMAGENET_MEAN,
                IMAGENET_STD, 224, train_files=out[0][0], test_files=out[1][0], class_names=classes)


def _load_food101(root):
    folder = os.path.join(root, "food-101")
    meta = os.path.join(folder, "meta")
    if not all(os.path.isfile(os.path.join(meta, f)) for f in ("classes.txt", "train.txt", "test.txt")):
        raise _missing("food101", root, "food-101/meta/{classes,train,test}.txt")
    classes = open(os.path.join(meta, "classes.txt")).read().split()
    label_of = {c: i for i, c in enumerate(classes)}
    out = []
    for split in ("train", "test"):
        items = open(os.path.join(meta, f"{split}.txt")).read().split()
        out.append(([os.path.join(folder, "images", it + ".jpg") for it in items],
                    [label_of[it.split("/")[0]] for it in items]))
    return Data("food101", len(classes), torch.tensor(out[0][1]), torch.tensor(out[1][1]), IMAGENET_MEAN,
                IMAGENET_STD, 224, train_files=out[0][0], test_files=out[1][0], class_names=classes)


def _load_cub200(root):
    folder = os.path.join(root, "CUB_200_2011")
    needed = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
    if not all(os.path.isfile(os.path.join(folder, f)) for f in needed):
        raise _missing("cub200", root, "CUB_200_2011/{images,image_class_labels,train_test_split}.txt")

    def table(name):
        return dict(line.split()[:2] for line in open(os.path.join(folder, name)) if line.strip())
    paths, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    split = {"1": ([], []), "0": ([], [])}
    for image_id in sorted(paths, key=int):
        files, ys = split[is_train[image_id]]
        files.append(os.path.join(folder, "images", paths[image_id]))
        ys.append(int(labels[image_id]) - 1)  # CUB labels are 1-based
    num_classes = max(split["1"][1] + split["0"][1]) + 1
    return Data("cub200", num_classes, torch.tensor(split["1"][1]), torch.tensor(split["0"][1]), IMAGENET_MEAN,
                IMAGENET_STD, 224, train_files=split["1"][0], test_files=split["0"][0])


def synthetic(num_classes=20, train_per_class=24, test_per_class=8, size=32, seed=0) -> Data:
    """Tiny learnable images: each class is a fixed random 4x4 colour pattern, upsampled, plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, 4, 4, generator=g)

    def make(per_class):
        y = torch.arange(num_classes).repeat_interleave(per_class)
        x = torch.nn.functional.interpolate(patterns[y], size=size, mode="nearest")
        x = (x * 0.7 + 0.3 * torch.rand(x.shape, generator=g)).clamp(0, 1)
        return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), y
    train_x, train_y = make(train_per_class)
    test_x, test_y = make(test_per_class)
    return Data("synthetic", num_classes, train_y, test_y, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), size, train_x,
                test_x)


# ----------------------------------------------------------------------------------------------- subsets
def add_data_flags(group):
    """--data-dir, then --classes, --train-per-class, --image-size: the same smaller problem in every script (the
    laptop protocol), protocol flags recorded in results.json. Each script adds its own --dataset before them."""
    group.add_argument("--data-dir", default=None, help="dataset root; the expected layout is printed if missing")
    group.add_argument("--classes", type=int, default=None, metavar="N", help="keep only the first N classes of "
                       "the dataset's own sorted class list (Tiny-ImageNet: sorted wnids), before the class order "
                       "is drawn; base + phases must add up to N (default: all classes)")
    group.add_argument("--train-per-class", type=int, default=None, metavar="N", help="keep the first N training "
                       "images of each class in sorted file-name order (CIFAR pickles: file order); the test set "
                       "keeps every image of the kept classes (default: all)")
    group.add_argument("--image-size", type=int, default=None, metavar="S", help="small-image datasets: resize to "
                       "S x S on load (bilinear); large-image datasets: crop to S instead of 224 (default: the "
                       "dataset's own size)")


def subset_indices(labels, names=None, classes=None, per_class=None) -> list:
    """Indices (ascending) kept by --classes N (labels < N: labels follow the dataset's sorted class list) and
    --train-per-class K (the first K of each class in the order of `names`, or in file order without names)."""
    labels = [int(y) for y in labels]
    keep = [i for i, y in enumerate(labels) if classes is None or y < classes]
    if per_class is not None:
        by_class = {}
        for i in sorted(keep, key=(lambda i: names[i]) if names else (lambda i: i)):
            by_class.setdefault(labels[i], []).append(i)
        keep = sorted(i for members in by_class.values() for i in members[:per_class])
    return keep


def resize_images(x_uint8: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """NHWC uint8 -> NHWC uint8 of size x size, bilinear (antialiased when shrinking, as PIL's BILINEAR)."""
    out = []
    for part in x_uint8.split(chunk):
        x = torch.nn.functional.interpolate(part.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear",
                                            align_corners=False, antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return torch.cat(out) if out else x_uint8.new_empty(0, size, size, 3)


def _apply_subset(data: Data, classes, train_per_class, image_size) -> Data:
    if classes is not None and classes > data.num_classes:
        raise UserError(f"--classes {classes}, but {data.name} has only {data.num_classes} classes")
    train = subset_indices(data.train_y, data.train_files, classes, train_per_class)
    test = subset_indices(data.test_y, None, classes)
    data.train_y, data.test_y = data.train_y[train], data.test_y[test]
    if data.on_device:
        data.train_x, data.test_x = data.train_x[train], data.test_x[test]
    else:
        data.train_files, data.test_files = [data.train_files[i] for i in train], [data.test_files[i] for i in test]
    if classes is not None:
        data.num_classes, data.class_names = classes, data.class_names[:classes]
    if image_size is not None and image_size != data.image_size:
        if data.on_device:
            data.train_x, data.test_x = resize_images(data.train_x, image_size), resize_images(data.test_x,
                                                                                                image_size)
        data.image_size = image_size  # large images: the crop size of the train and test transforms
    return data


def load_dataset(name: str, data_dir: str, device: torch.device, class_list=None, classes=None,
                 train_per_class=None, image_size=None) -> Data:
    """Read a dataset (one-line UserError if it is missing), keep the subset that --classes/--train-per-class
    ask for, resize to --image-size; small images are moved to `device` as uint8."""
    if name not in DATASETS:
        raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    for flag, value, least in (("--classes", classes, 2), ("--train-per-class", train_per_class, 1),
                               ("--image-size", image_size, 8)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")
    if "synthetic" not in name and not os.path.isdir(data_dir):
        raise UserError(f"{name}: --data-dir {data_dir} does not exist; expected {LAYOUTS[name]}")
    data = {"cifar100": lambda: _load_cifar100(data_dir),
            "tinyimagenet": lambda: _load_tinyimagenet(data_dir, classes, train_per_class, image_size),
            "imagenet100": lambda: _load_imagenet(data_dir, name, class_list),
            "imagenet": lambda: _load_imagenet(data_dir, name), "food101": lambda: _load_food101(data_dir),
            "cub200": lambda: _load_cub200(data_dir), "synthetic": synthetic,
            "cifar100-synthetic": lambda: synthetic(100, 500, 100, 32)}[name]()
    data = _apply_subset(data, classes, train_per_class, image_size)
    if data.on_device:
        data.train_x, data.test_x = data.train_x.to(device), data.test_x.to(device)
    return data


def load_protocol(args, device: torch.device):
    """What every script starts from: the --dataset (with the subset flags) on `device`, its phases (--base-classes,
    --increment) and the class order of --class-order-seed applied to its labels. Returns (data, splits, order)."""
    data = load_dataset(args.dataset, args.data_dir, device, args.class_list,
                        **{k: getattr(args, k, None) for k in ("classes", "train_per_class", "image_size")})
    splits = phase_splits(data.num_classes, args.base_classes, args.increment)
    order = class_order(data.num_classes, args.class_order_seed)
    return apply_class_order(data, order), splits, order
