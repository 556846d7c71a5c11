"""Exemplar memory, a dict {class: LongTensor of training-set indices in herding order}: iCaRL herding, growing
or fixed budgets, reduction to a prefix of the herding order (iCaRL Alg. 5: no features recomputed), NME means."""
import torch
import torch.nn.functional as F

from common import dist
from common.batches import eval_batches
from common.data import indices_of
from common.errors import UserError


def exemplars_per_class(seen_classes: int, memory_per_class: int, memory_total: int = None,
                        rounding: str = "floor") -> int:
    """Growing memory: `memory_per_class` a class; fixed: memory_total / seen, rounded down ("floor": PyCIL) or up
    ("ceil": LUCIR's `ceil(2000/seen)`, FACIL exemplars_selection.py: up to seen-1 more than memory_total)."""
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"rounding must be floor or ceil, not {rounding!r}")
    if memory_total is not None:
        return -(-memory_total // seen_classes) if rounding == "ceil" else memory_total // seen_classes
    return memory_per_class


def check_budget(num_classes: int, memory_per_class: int, memory_total: int = None, allow_zero: bool = False):
    """Fail before training if the budget cannot hold one exemplar per class at the end (floor rounding)."""
    per_class = exemplars_per_class(num_classes, memory_per_class, memory_total)
    if per_class < 1 and not (allow_zero and not memory_total):
        what = f"--memory-total {memory_total}" if memory_total is not None else \
            f"--memory-per-class {memory_per_class}"
        raise UserError(f"{what} cannot hold one exemplar per class for {num_classes} classes; raise it (e.g. "
                        f"--memory-total {num_classes * 20})")


@torch.no_grad()
def extract_features(feature_fn, data, indices, device, split="train", batch_size=1000, workers=0):
    """Features (N, D) of `indices` in order, with `feature_fn` in the mode the caller set. Under torchrun each
    rank runs every N-th batch and gets all features, so herding, means and imprinting agree on every rank."""
    out = []
    for x, _ in eval_batches(data, dist.shard(indices, batch_size), device, split, batch_size, workers):
        out.append(feature_fn(x).float())
    return dist.gather(out, len(indices), batch_size) if len(indices) else torch.empty(0, device=device)


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL herding (Rebuffi et al. 2017, Alg. 4): greedily pick the sample that brings the mean of the picked
    set closest to the class mean of the L2-normalised features; positions into `features`, in order, no host
    syncs. (The iCaRL/LUCIR code runs it as argmax <w_t, x>, w_t += mu - x_picked, and may re-pick a sample
    without counting it; here a picked sample is excluded, as the definition says.)"""
    feats = F.normalize(features.float(), dim=1)
    mu = feats.mean(0)
    m = min(m, len(feats))
    chosen = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    picked, running_sum = [], torch.zeros_like(mu)
    for k in range(1, m + 1):
        dist = ((mu[None] - (running_sum[None] + feats) / k) ** 2).sum(1)
        i = dist.masked_fill(chosen, float("inf")).argmin()
        chosen[i] = True
        running_sum = running_sum + feats[i]
        picked.append(i)
    return torch.stack(picked) if picked else torch.empty(0, dtype=torch.long, device=feats.device)


def select_exemplars(feature_fn, data, classes, m: int, device, workers=0, candidates=None) -> dict:
    """Herding for each class in `classes` with one batched feature pass; returns {class: indices (CPU)}.
    `candidates`: a bool mask over the training set to choose from (e.g. without a held-out validation part)."""
    per_class = [indices_of(data.train_y, c, c + 1) for c in classes]
    if candidates is not None:
        per_class = [idx[candidates[idx]] for idx in per_class]
    if m <= 0 or not per_class:
        return {c: torch.empty(0, dtype=torch.long) for c in classes}
    feats = extract_features(feature_fn, data, torch.cat(per_class), device, "train", workers=workers)
    out, start = {}, 0
    for c, idx in zip(classes, per_class):
        out[c] = idx[herding(feats[start:start + len(idx)], m).cpu()]
        start += len(idx)
    return out


def reduce_memory(memory: dict, m: int) -> dict:
    return {c: idx[:m] for c, idx in memory.items()}


def memory_indices(memory: dict) -> torch.Tensor:
    return torch.cat([memory[c] for c in sorted(memory)]) if memory else torch.empty(0, dtype=torch.long)


NME_VIEWS = ("hflip", "channels", "none")


def second_view(x: torch.Tensor, view: str, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """The second view of a normalised NCHW batch for the NME means: "hflip" mirrors the width; "channels" reverses
    the colour channels of the raw image, normalised as RGB (LUCIR's CIFAR code: `prototypes[c][:,:,:,::-1]` on
    HWC uint8 arrays, before the transform); "none" is the image itself."""
    if view == "hflip":
        return x.flip(3)
    if view == "channels":
        mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for v in (mean, std))
        return ((x * std + mean).flip(1) - mean) / std
    return x


@torch.no_grad()
def class_means(feature_fn, data, memory: dict, num_classes: int, device, workers=0, view: str = "hflip"):
    """NME class means (num_classes, D): per class, the mean over its exemplars of (L2-normalised feature of the
    image + L2-normalised feature of its second view) / 2, then L2-normalised (iCaRL; LUCIR official code,
    class_means[..] = (D.alph + D2.alph) / 2). LUCIR's "flipped" view is "channels" in its CIFAR code, "none" in
    its ImageNet code; "hflip" is what the name says. A class without exemplars gets a zero mean."""
    if view not in NME_VIEWS:
        raise ValueError(f"view must be one of {NME_VIEWS}, not {view!r}")
    idx = memory_indices(memory)
    feats = F.normalize(extract_features(feature_fn, data, idx, device, "train", workers=workers), dim=1)
    if view == "none":
        both = feats
    else:
        second = extract_features(lambda x: feature_fn(second_view(x, view, data.mean, data.std)), data, idx,
                                  device, "train", workers=workers)
        both = (feats + F.normalize(second, dim=1)) / 2
    labels = data.train_y[idx].to(device)
    sums = torch.zeros(num_classes, both.shape[1], device=device).index_add_(0, labels, both)
    counts = torch.zeros(num_classes, device=device).index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))
    return F.normalize(sums / counts.clamp(min=1)[:, None], dim=1)
