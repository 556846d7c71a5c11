"""Datasets, class order, phase splits and the batch iterators.

Small-image datasets (cifar100, tinyimagenet, synthetic) live on the training device as uint8 NHWC tensors;
padded random crop and horizontal flip run there in batch, and a phase's training set or the exemplar memory is
a tensor of indices into them. Large-image datasets (imagenet100, imagenet, food101, cub200) keep file paths and
go through a DataLoader with torchvision transforms and workers. Labels are re-indexed by the class order, so
label k is the k-th class of the order and the classes seen after a phase are simply 0 .. total-1.
"""
import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from common import dist
from common.errors import UserError

SMALL_IMAGE_DATASETS = ("cifar100", "tinyimagenet", "synthetic", "cifar100-synthetic")
LARGE_IMAGE_DATASETS = ("imagenet100", "imagenet", "food101", "cub200")
DATASETS = SMALL_IMAGE_DATASETS + LARGE_IMAGE_DATASETS

# (classes, image size) of each dataset, for generated inputs of the real shapes (common/bench.py)
SHAPES = {"cifar100": (100, 32), "tinyimagenet": (200, 64), "synthetic": (20, 32), "cifar100-synthetic": (100, 32),
          "imagenet100": (100, 224),
          "imagenet": (1000, 224), "food101": (101, 224), "cub200": (200, 224)}

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
# cifar100-synthetic: generated images of CIFAR-100's shapes (100 classes, 500 + 100 a class, 32 px), to time
# the full protocol where the real data cannot be had (a GPU machine without network); numbers are not CIFAR's.


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
    """Indices of the samples whose (ordered) label lies in [first, last)."""
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
    # --classes / --train-per-class before decoding, so a subset reads only its own files
    keep_train = subset_indices(train_labels, train_paths, classes, train_per_class)
    keep_test = subset_indices(test_labels, test_paths, classes, None)
    size = image_size or 64
    return Data("tinyimagenet", len(wnids), torch.tensor(train_labels)[keep_train],
                torch.tensor(test_labels)[keep_test], IMAGENET_MEAN, IMAGENET_STD, size,
                _read_images([train_paths[i] for i in keep_train], size),
                _read_images([test_paths[i] for i in keep_test], size), class_names=wnids)


def _image_folder(split_dir):
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    files, labels = [], []
    for i, c in enumerate(classes):
        names = sorted(os.listdir(os.path.join(split_dir, c)))
        files += [os.path.join(split_dir, c, n) for n in names]
        labels += [i] * len(names)
    return classes, files, labels


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
    """--data-dir, then --classes, --train-per-class, --image-size: the same smaller problem in every script (laptop
    protocol, README). They change the numbers, so they are protocol flags and results.json records them (in
    `args`). Each script adds its own --dataset (with the paper's datasets) before them."""
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


def subset_flags(args) -> dict:
    """The keyword arguments of load_dataset that the subset flags set."""
    return {k: getattr(args, k, None) for k in ("classes", "train_per_class", "image_size")}


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
    data = load_dataset(args.dataset, args.data_dir, device, args.class_list, **subset_flags(args))
    splits = phase_splits(data.num_classes, args.base_classes, args.increment)
    order = class_order(data.num_classes, args.class_order_seed)
    return apply_class_order(data, order), splits, order


# ----------------------------------------------------------------------------------------------- batches
def augment(x: torch.Tensor, padding: int = 4, mode: str = "constant") -> torch.Tensor:
    """Random crop after padding and horizontal flip, in batch on the device (NHWC -> NHWC, any dtype). Padding
    with zeros (torchvision's RandomCrop(size, padding) + RandomHorizontalFlip()), or with `mode="replicate"` the
    edge pixel repeated (RandomCrop's padding_mode="edge"). One gather per batch.
    """
    n, h, w, _ = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device)
    flip = torch.rand(n, 1, device=x.device) < 0.5
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    rows = torch.arange(h, device=x.device).expand(n, h) + dy
    batch = torch.arange(n, device=x.device)[:, None, None]
    if mode == "replicate":  # a clamped index is the edge pixel of the padded image
        return x[batch, (rows - padding).clamp(0, h - 1)[:, :, None], (cols - padding).clamp(0, w - 1)[:, None, :]]
    padded = torch.nn.functional.pad(x, (0, 0, padding, padding, padding, padding))
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_resized_crop(x_uint8: torch.Tensor, padding: int = 4, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Zero padding, RandomResizedCrop(original size, scale, ratio) and horizontal flip, in batch on the device
    (NHWC uint8 -> NHWC uint8): FACIL's CIFAR-100 train transform Pad(4), RandomResizedCrop(32), flip.

    Boxes as torchvision's RandomResizedCrop.get_params, per sample: up to 10 tries of area U(scale) x H x W and
    log aspect ratio U(log ratio), w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first box
    that fits, at an integer offset drawn uniformly; if none fits, the centre crop with the ratio clamped.
    Resampling: bilinear at pixel centres (grid_sample, align_corners=False, border values), rounded to uint8
    like PIL's output; PIL also antialiases when it shrinks a box larger than the output, this does not.
    """
    n, h, w, _ = x_uint8.shape
    dev = x_uint8.device
    padded = torch.nn.functional.pad(x_uint8, (0, 0, padding, padding, padding, padding))
    H, W = h + 2 * padding, w + 2 * padding
    area = H * W * torch.empty(n, 10, device=dev).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, 10, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    box_w, box_h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (box_w > 0) & (box_w <= W) & (box_h > 0) & (box_h <= H)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits
    box_w, box_h = box_w.gather(1, first)[:, 0], box_h.gather(1, first)[:, 0]
    top = torch.floor(torch.rand(n, device=dev) * (H - box_h + 1))
    left = torch.floor(torch.rand(n, device=dev) * (W - box_w + 1))
    centre_w = float(W if W / H <= ratio[1] else round(H * ratio[1]))  # torchvision's fallback
    centre_h = float(H if W / H >= ratio[0] else round(W / ratio[0]))
    none_fits = ~fits.any(1)
    box_w, box_h = box_w.masked_fill(none_fits, centre_w), box_h.masked_fill(none_fits, centre_h)
    top = torch.where(none_fits, torch.floor((H - box_h) / 2), top)
    left = torch.where(none_fits, torch.floor((W - box_w) / 2), left)
    # output pixel a samples the box at top + (a + 0.5) * box_h / h; grid_sample wants it in [-1, 1] of the image
    steps_y = (torch.arange(h, device=dev) + 0.5) / h
    steps_x = (torch.arange(w, device=dev) + 0.5) / w
    steps_x = torch.where(torch.rand(n, 1, device=dev) < 0.5, 1 - steps_x, steps_x)  # horizontal flip
    grid_y = (top[:, None] + steps_y * box_h[:, None]) / H * 2 - 1
    grid_x = (left[:, None] + steps_x * box_w[:, None]) / W * 2 - 1
    grid = torch.stack([grid_x[:, None, :].expand(n, h, w), grid_y[:, :, None].expand(n, h, w)], dim=3)
    out = torch.nn.functional.grid_sample(padded.permute(0, 3, 1, 2).float(), grid, mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


AUGMENTATIONS = {"crop": augment, "resized-crop": random_resized_crop, "none": lambda x: x}


def to_input(x_uint8: torch.Tensor, data: Data) -> torch.Tensor:
    """NHWC uint8 -> normalised float NCHW in channels_last memory format (a free permute of NHWC)."""
    mean = torch.tensor(data.mean, device=x_uint8.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std, device=x_uint8.device).view(1, 3, 1, 1) * 255
    return (x_uint8.permute(0, 3, 1, 2).float() - mean) / std


class _Order(torch.utils.data.Sampler):
    """Yields whatever index order was set last, so one DataLoader (and its workers) serves every epoch."""

    def __init__(self):
        self.order = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


class _Files(torch.utils.data.Dataset):
    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


_LOADERS = {}


def _file_batches(data, split, train, batch_size, workers, order, stream="eval", train_transform=None):
    """Batches of decoded, transformed images in `order` through a DataLoader kept for the whole run
    (persistent workers, pinned memory). Train: RandomResizedCrop + flip, or the PIL transforms
    `train_transform(image_size)` returns; test: resize 256 / centre crop 224.
    One loader per `stream`: two streams iterated at the same time (TBBN's current and exemplar parts) must
    never share one, or each would reset the other's order."""
    key = (id(data), split, train, stream, batch_size, workers, train_transform)
    if key not in _LOADERS:
        import torchvision.transforms as T
        augment = train_transform(data.image_size) if train_transform else \
            [T.RandomResizedCrop(data.image_size), T.RandomHorizontalFlip()]
        tf = T.Compose((augment if train else
                        [T.Resize(int(data.image_size * 256 / 224)), T.CenterCrop(data.image_size)]) +
                       [T.ToTensor(), T.Normalize(data.mean, data.std)])
        files, labels = (data.train_files, data.train_y) if split == "train" else (data.test_files, data.test_y)
        sampler = _Order()
        loader = torch.utils.data.DataLoader(_Files(files, labels.tolist(), tf), batch_size=batch_size,
                                             sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                                             pin_memory=torch.cuda.is_available(),
                                             worker_init_fn=dist.seed_worker if dist.active() else None)
        _LOADERS[key] = (loader, sampler)
    loader, sampler = _LOADERS[key]
    sampler.order = order
    return loader


def train_batches(data: Data, indices: torch.Tensor, batch_size: int, device: torch.device, workers: int = 0,
                  augmentation: str = "crop", stream: str = "train", batch_fn=None, train_transform=None,
                  shard: bool = True, drop_last: bool = False):
    """One epoch of augmented (x, y) batches of exactly `batch_size` over a shuffled `indices`.

    Small images: `augmentation` "crop" (padded random crop + flip), "resized-crop" (`random_resized_crop`) or "none";
    large images: RandomResizedCrop + flip in the DataLoader, or the PIL transforms `train_transform(image_size)`
    returns. `stream` names the batch stream: streams iterated side by side need different names (each gets its
    own DataLoader). Optional `batch_fn(x, idx) -> x` edits each batch given its dataset indices (a device
    tensor): before the augmentation on the small-image path (x: uint8 NHWC), after the transform on the file
    path (x: normalised float NCHW).

    Static shapes (for CUDA graphs): the last partial batch is filled by wrapping around to the start of the
    permutation, so each sample is seen at least once an epoch and ceil(n / batch_size) steps are taken;
    `drop_last`: floor(n / batch_size) steps, the partial batch dropped (as a DataLoader with drop_last=True).

    Under torchrun (common.dist) `batch_size` stays the global batch: every rank uses rank 0's permutation and
    yields its own 1/N slice of each batch (small images: the global batch is augmented on every rank with
    the same random draws, then sliced, so the ranks' slices together are the one-process batch; large images:
    each rank decodes only its slice). `shard=False`: every rank gets the whole batch (e.g. a replicated step).
    """
    n = len(indices)
    steps = n // batch_size if drop_last else -(-n // batch_size)
    world = dist.world_size() if shard else 1
    if batch_size % world:
        raise UserError(f"a batch of {batch_size} cannot be split over the {world} processes of torchrun; choose "
                        f"batch sizes divisible by {world}")
    perm = torch.randperm(n, device=device if data.on_device else "cpu")
    if world > 1:  # the same order on every rank even if a rank's generator drifted (e.g. worker-less decoding)
        dist.broadcast_(perm)
    if steps * batch_size > n:  # wrap around (more than once when n < batch_size / 2)
        perm = perm.repeat(-(-steps * batch_size // n))[: steps * batch_size]
    if data.on_device:
        idx = indices.to(device)[perm]
        y_all = data.train_y.to(device)[idx]
        for s in range(steps):
            sl = idx[s * batch_size:(s + 1) * batch_size]
            x = data.train_x[sl] if batch_fn is None else batch_fn(data.train_x[sl], sl)
            x, y = AUGMENTATIONS[augmentation](x), y_all[s * batch_size:(s + 1) * batch_size]
            if world > 1:  # this rank's slice of the global batch, augmented alike on every rank
                x, y = dist.local_slice(x), dist.local_slice(y)
            yield to_input(x, data).contiguous(memory_format=torch.channels_last), y
    else:
        order = indices[perm[:steps * batch_size]]
        if world > 1:  # this rank's slice of every global batch, decoded by its own loader
            batch_size //= world
            order = order.view(steps, world, batch_size)[:, dist.rank()].reshape(-1)
        for s, (x, y) in enumerate(_file_batches(data, "train", True, batch_size, workers, order.tolist(), stream,
                                                 train_transform)):
            x = x.to(device, non_blocking=True)
            if batch_fn is not None:
                x = batch_fn(x, order[s * batch_size:(s + 1) * batch_size].to(device))
            yield x.contiguous(memory_format=torch.channels_last), y.to(device, non_blocking=True)


def eval_batches(data: Data, indices: torch.Tensor, device: torch.device, split: str = "test",
                 batch_size: int = 1000, workers: int = 0):
    """Un-augmented (x, y) batches over `indices` of the train or test split, in order."""
    labels = data.train_y if split == "train" else data.test_y
    if data.on_device:
        images = data.train_x if split == "train" else data.test_x
        idx = indices.to(device)
        labels = labels.to(device)
        for s in range(0, len(idx), batch_size):
            sl = idx[s:s + batch_size]
            yield to_input(images[sl], data).contiguous(memory_format=torch.channels_last), labels[sl]
    else:
        for x, y in _file_batches(data, split, False, batch_size, workers, indices.tolist()):
            yield x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last), \
                y.to(device, non_blocking=True)
