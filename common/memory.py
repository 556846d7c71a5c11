"""Exemplar memory: iCaRL herding returning indices, growing or fixed budgets, reduction, NME class means.

The memory is a dict {class: LongTensor of training-set indices in herding order}. Reducing a class keeps a
prefix of its herding order (iCaRL Alg. 5), so no features need to be recomputed.
"""
import torch
import torch.nn.functional as F

from common.data import eval_batches, indices_of
from common.run import UserError


def exemplars_per_class(seen_classes: int, memory_per_class: int, memory_total: int = None) -> int:
    """Growing memory: `memory_per_class` for every class; fixed memory: floor(memory_total / seen)."""
    if memory_total is not None:
        return memory_total // seen_classes
    return memory_per_class


def check_budget(num_classes: int, memory_per_class: int, memory_total: int = None, allow_zero: bool = False):
    """Fail before training if the budget cannot hold one exemplar per class at the end of the protocol."""
    per_class = exemplars_per_class(num_classes, memory_per_class, memory_total)
    if per_class < 1 and not (allow_zero and not memory_total):
        what = f"--memory-total {memory_total}" if memory_total is not None else \
            f"--memory-per-class {memory_per_class}"
        raise UserError(f"{what} cannot hold one exemplar per class for {num_classes} classes; raise it (e.g. "
                        f"--memory-total {num_classes * 20})")


@torch.no_grad()
def extract_features(feature_fn, data, indices, device, split="train", flip=False, batch_size=1000, workers=0):
    """Features (N, D) of `indices` in order, with `feature_fn` in whatever mode the caller set (eval)."""
    out = []
    for x, _ in eval_batches(data, indices, device, split, batch_size, workers):
        out.append(feature_fn(x.flip(3) if flip else x).float())
    return torch.cat(out) if out else torch.empty(0, device=device)


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL herding (Rebuffi et al. 2017, Alg. 4): greedily pick the sample that brings the mean of the picked
    set closest to the class mean of the L2-normalised features. Returns positions into `features`, in order.
    Runs on the features' device; no host syncs. (The iCaRL/LUCIR code runs the same greedy rule as
    argmax <w_t, x> with w_t += mu - x_picked, and may re-pick a sample without counting it; here a picked
    sample is excluded, as the definition says, so the two differ only after such a re-pick.)"""
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


def select_exemplars(feature_fn, data, classes, m: int, device, workers=0) -> dict:
    """Herding for each class in `classes` with one batched feature pass; returns {class: indices (CPU)}."""
    per_class = [indices_of(data.train_y, c, c + 1) for c in classes]
    if m <= 0 or not per_class:
        return {c: torch.empty(0, dtype=torch.long) for c in classes}
    feats = extract_features(feature_fn, data, torch.cat(per_class), device, "train", workers=workers)
    out, start = {}, 0
    for c, idx in zip(classes, per_class):
        out[c] = idx[herding(feats[start:start + len(idx)], m).cpu()]
        start += len(idx)
    return out


def reduce_memory(memory: dict, m: int) -> dict:
    """Keep the first `m` exemplars (herding order) of every class."""
    return {c: idx[:m] for c, idx in memory.items()}


def memory_indices(memory: dict) -> torch.Tensor:
    return torch.cat([memory[c] for c in sorted(memory)]) if memory else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def class_means(feature_fn, data, memory: dict, num_classes: int, device, workers=0) -> torch.Tensor:
    """NME class means (num_classes, D): per class, the mean of the L2-normalised features of its exemplars and
    of their horizontally flipped copies, averaged and L2-normalised (LUCIR official code, compute_features /
    class_means with the flipped set). A class without exemplars gets a zero mean (never nearest)."""
    idx = memory_indices(memory)
    feats = F.normalize(extract_features(feature_fn, data, idx, device, "train", workers=workers), dim=1)
    flipped = F.normalize(extract_features(feature_fn, data, idx, device, "train", flip=True, workers=workers), dim=1)
    labels = data.train_y[idx].to(device)
    both = (feats + flipped) / 2
    sums = torch.zeros(num_classes, both.shape[1], device=device).index_add_(0, labels, both)
    counts = torch.zeros(num_classes, device=device).index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))
    return F.normalize(sums / counts.clamp(min=1)[:, None], dim=1)
