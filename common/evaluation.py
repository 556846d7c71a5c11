"""Evaluation: CNN and NME top-1 over the seen classes, per-task accuracy, and the summary metrics (papers.md
0.5): acc_k, top-1 on the test images of all classes seen after phase k; average incremental accuracy, the mean
of acc_0 .. acc_T (base phase included, LUCIR Sec. 4.1); last, acc_T; forgetting (Chaudhry et al. 2018), the mean
over j < T of max_{k in [j, T-1]} a[k][j] - a[T][j], a[k][j] the accuracy on phase j's classes after phase k."""
import torch
import torch.nn.functional as F

from common import dist
from common.batches import eval_batches
from common.data import indices_of


@torch.no_grad()
def evaluate(forward_fn, data, splits: list, phase: int, device, means: torch.Tensor = None, workers=0,
             batch_size=1000) -> dict:
    """Top-1 (%) on the test images of the classes of phases 0..phase. `forward_fn(x) -> (logits, features)`,
    logits over at least the seen classes; `means` (num_classes, D): NME class means, or None (no NME). Under
    torchrun each rank runs every N-th batch and the hits are gathered in order: the numbers of one process."""
    total = splits[phase][1]
    idx = indices_of(data.test_y, 0, total)
    cnn_hits, nme_hits, labels = [], [], []
    for x, y in eval_batches(data, dist.shard(idx, batch_size), device, "test", batch_size, workers):
        logits, feats = forward_fn(x)
        cnn_hits.append(logits[:, :total].float().argmax(1) == y)
        if means is not None:
            distance = torch.cdist(F.normalize(feats.float(), dim=1), means[:total])  # nearest mean of exemplars
            nme_hits.append(distance.argmin(1) == y)
        labels.append(y)
    labels = dist.gather(labels, len(idx), batch_size)

    def per_task(hits):
        return [100.0 * hits[(labels >= a) & (labels < b)].float().mean().item() for a, b in splits[:phase + 1]]
    cnn = dist.gather(cnn_hits, len(idx), batch_size)
    out = {"cnn_acc": 100.0 * cnn.float().mean().item(), "cnn_acc_per_task": per_task(cnn)}
    if means is not None:
        nme = dist.gather(nme_hits, len(idx), batch_size)
        out.update(nme_acc=100.0 * nme.float().mean().item(), nme_acc_per_task=per_task(nme))
    return out


def summarize(acc_per_phase: list, acc_matrix: list) -> dict:
    """Average incremental accuracy, last accuracy and forgetting from per-phase accuracies and the accuracy
    matrix (row k = per-task accuracies after phase k, lower-triangular)."""
    T = len(acc_matrix) - 1
    forgetting = sum(max(acc_matrix[k][j] for k in range(j, T)) - acc_matrix[T][j] for j in range(T)) / T \
        if T > 0 else None
    return {"avg_inc_acc": sum(acc_per_phase) / len(acc_per_phase), "last_acc": acc_per_phase[-1],
            "forgetting": forgetting}


def results_from_rows(rows: list) -> dict:
    """The accuracy part of results.json from the per-phase metrics rows: CNN always, NME where every row has it
    (None otherwise, e.g. without exemplars), and the summed phase wall time."""
    cnn = summarize([r["cnn_acc"] for r in rows], [r["cnn_acc_per_task"] for r in rows])
    has_nme = all(r.get("nme_acc") is not None for r in rows)
    nme = summarize([r["nme_acc"] for r in rows], [r["nme_acc_per_task"] for r in rows]) if has_nme else \
        dict.fromkeys(("avg_inc_acc", "last_acc", "forgetting"))
    return {
        "acc_per_phase": [r["cnn_acc"] for r in rows],
        "nme_acc_per_phase": [r["nme_acc"] for r in rows] if has_nme else None,
        **cnn, **{f"nme_{k}": v for k, v in nme.items()},
        "acc_matrix": [r["cnn_acc_per_task"] for r in rows],
        "nme_acc_matrix": [r["nme_acc_per_task"] for r in rows] if has_nme else None,
        "wall_s": sum(r["phase_s"] for r in rows),
    }
