"""Batches: small images augmented in batch on the training device from the uint8 tensors of `common.data`;
large images through a DataLoader with torchvision transforms and workers, one kept for the whole run."""
import math

import torch

from common import dist
from common.data import Data
from common.errors import UserError


def augment(x: torch.Tensor, padding: int = 4, mode: str = "constant") -> torch.Tensor:
    """Random crop after padding and horizontal flip in batch, one gather (NHWC -> NHWC, any dtype): torchvision's
    RandomCrop(size, padding) + RandomHorizontalFlip(); `mode="replicate"`: RandomCrop's padding_mode="edge"."""
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
    """FACIL's CIFAR-100 train transform Pad(4), RandomResizedCrop(input size, scale, ratio), flip, in batch (NHWC
    uint8): boxes as torchvision's get_params per sample (10 tries, else the ratio-clamped centre crop), bilinear
    at pixel centres rounded to uint8 like PIL, without PIL's antialiasing of boxes larger than the output."""
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
    """Batches of decoded, transformed images in `order` through a DataLoader kept for the whole run (persistent
    workers, pinned memory; its sampler, a list, takes each call's order in place). Train: RandomResizedCrop +
    flip, or the PIL transforms `train_transform(image_size)`; test: resize 256 / centre crop 224. One loader a
    `stream`: two streams iterated at once (TBBN's current and exemplar parts) would reset each other's order."""
    key = (id(data), split, train, stream, batch_size, workers, train_transform)
    if key not in _LOADERS:
        import torchvision.transforms as T
        augment = train_transform(data.image_size) if train_transform else \
            [T.RandomResizedCrop(data.image_size), T.RandomHorizontalFlip()]
        tf = T.Compose((augment if train else
                        [T.Resize(int(data.image_size * 256 / 224)), T.CenterCrop(data.image_size)]) +
                       [T.ToTensor(), T.Normalize(data.mean, data.std)])
        files, labels = (data.train_files, data.train_y) if split == "train" else (data.test_files, data.test_y)
        sampler = []
        loader = torch.utils.data.DataLoader(_Files(files, labels.tolist(), tf), batch_size=batch_size,
                                             sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                                             pin_memory=torch.cuda.is_available(),
                                             worker_init_fn=dist.seed_worker if dist.active() else None)
        _LOADERS[key] = (loader, sampler)
    loader, sampler = _LOADERS[key]
    sampler[:] = order
    return loader


def train_batches(data: Data, indices: torch.Tensor, batch_size: int, device: torch.device, workers: int = 0,
                  augmentation: str = "crop", stream: str = "train", batch_fn=None, train_transform=None,
                  shard: bool = True, drop_last: bool = False):
    """One epoch of augmented (x, y) batches of exactly `batch_size` over a shuffled `indices`. Small images:
    `augmentation` "crop" (padded random crop + flip), "resized-crop" or "none"; files: RandomResizedCrop + flip,
    or the PIL transforms `train_transform(image_size)`. Streams iterated side by side need their own `stream`
    name. `batch_fn(x, idx) -> x` edits each batch given its dataset indices: before the augmentation of small
    images (uint8 NHWC), after the transform of files (float NCHW). Static shapes (CUDA graphs): the last batch
    wraps around to the start of the permutation (ceil(n / batch_size) steps; `drop_last`: floor).
    Under torchrun `batch_size` stays the global batch: every rank uses rank 0's permutation and yields its 1/N
    slice of each batch (small images are augmented alike on every rank, so the slices make the one-process batch;
    files: each rank decodes its slice). `shard=False`: every rank gets the whole batch."""
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
