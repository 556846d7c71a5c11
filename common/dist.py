"""Several processes under `torchrun` (NCCL on GPUs, gloo on CPU) without a DDP wrapper (design, and what was
verified: README, "Several GPUs (torchrun)"). Every rank draws the same global batch and keeps its 1/N slice;
gradients are averaged in an optimiser step pre-hook (so a step still captures as one CUDA graph); evaluation runs
batch b on rank b mod N and gathers in order. A single process takes none of these paths."""
import os
import sys
import weakref

import torch
import torch.distributed as tdist

_hooked = weakref.WeakSet()  # the optimisers whose gradients are already averaged


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (from torchrun's RANK before the process group is joined); 0 in a single process."""
    return tdist.get_rank() if active() else int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group (once): NCCL and cuda:LOCAL_RANK on GPUs, gloo on CPU; ranks > 0 print no stdout."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if tdist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")
    return device


def launcher() -> list:
    """How this process was started, for the commands a run prints and records: python, or torchrun."""
    if not launched():
        return ["python"]
    per_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    nodes = int(os.environ["WORLD_SIZE"]) // int(per_node)
    return ["torchrun", f"--nproc_per_node={per_node}"] + ([f"--nnodes={nodes}"] if nodes > 1 else [])


def close(wait: bool = False):
    """Leave the process group; `wait` first for every rank (no rank tears down connections another still uses)."""
    if tdist.is_available() and tdist.is_initialized():
        if wait:
            tdist.barrier()
        tdist.destroy_process_group()


def exit_now(code: int):
    """End this torchrun process with `code` after `close`, skipping the interpreter's teardown, during which a
    gloo worker thread freeing its last work aborted the process (README; pytorch/pytorch PR 179291)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _comm_device() -> torch.device:
    """NCCL works on CUDA tensors, gloo here on CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else \
        torch.device("cpu")


def broadcast_error(message):
    """Rank 0's error message (or None) on every rank, so a failure of rank 0 alone (e.g. an unwritable
    --out-dir) ends every rank with the same error. Also a barrier."""
    if not active():
        return message
    box = [message]
    tdist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


# ----------------------------------------------------------------------------------------------- training
def per_rank(n: int) -> int:  # this rank's share of a global batch (the caller checks that N divides n)
    return n // world_size()


def local_slice(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch (rank r: rows r*n/N .. (r+1)*n/N)."""
    if not active():
        return batch
    n = len(batch) // world_size()
    return batch[rank() * n:(rank() + 1) * n]


def seed_worker(worker_id: int):
    """DataLoader workers under torchrun: seeds offset by the rank, or the ranks' random crops would repeat."""
    import random
    import numpy as np
    seed = (torch.initial_seed() + 1_000_003 * rank()) % 2 ** 32
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if active():
        buffer = tensor.to(_comm_device())
        tdist.broadcast(buffer, src)
        if buffer is not tensor:
            tensor.copy_(buffer)
    return tensor


@torch.no_grad()
def broadcast_state(module: torch.nn.Module, buffers_only: bool = False):
    """Rank 0's parameters and buffers on every rank, as DDP does when it wraps a model. `buffers_only`: the BN
    statistics each rank updates from its own slice, as DDP's broadcast_buffers (Stage: after every epoch)."""
    if active():
        for t in list([] if buffers_only else module.parameters()) + list(module.buffers()):
            broadcast_(t.data)


def _average(grads: list):
    """Every gradient replaced by its mean over the ranks (equal slices: the global batch mean), one flat
    all_reduce per dtype, no host sync (so it can be captured with the step)."""
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        tdist.all_reduce(flat)
        flat /= world_size()
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))


def sync_gradients(optimizer):
    """Average the gradients over the ranks before every `optimizer.step()` (once per optimiser), and start
    from rank 0's parameters. Single process: nothing."""
    if not active() or optimizer is None or optimizer in _hooked:
        return
    _hooked.add(optimizer)
    with torch.no_grad():
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            broadcast_(p.data)
    optimizer.register_step_pre_hook(lambda opt, *_: _average([p.grad for group in opt.param_groups
                                                               for p in group["params"] if p.grad is not None]))


def average_gradients(params):
    """The same averaging by hand, where a loop changes the gradients before its step (clipping must see the
    global gradient). Single process: nothing."""
    if active():
        _average([p.grad for p in params if p.grad is not None])


def average_(stats: torch.Tensor):
    """An epoch's running sums in place: their mean over the ranks (loss sums of the global batches, counts of
    one rank's share); a NaN on one rank is a NaN on all, so every rank stops at the same epoch."""
    if active() and stats is not None:
        buffer = stats.to(_comm_device())
        tdist.all_reduce(buffer)
        stats.copy_(buffer / world_size())


class StopVote:
    """SIGTERM / Ctrl-C reach every rank, not always within the same step, and a rank stopping alone would leave
    the others waiting. So each rank adds its stop request (0 or 1) to a small all_reduce after every step, read
    one step later (the device never waits for the host): every rank stops after the same step."""

    def __init__(self):
        self.pending = None

    def __call__(self, requested: bool) -> bool:
        """Vote for this step; True when some rank asked to stop in the step before."""
        flag = torch.full((1,), float(requested), device=_comm_device())
        tdist.all_reduce(flag)
        host = torch.empty(1, pin_memory=flag.is_cuda)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event() if flag.is_cuda else None
        if event is not None:
            event.record()
        previous, self.pending = self.pending, (host, event)
        return self._read(previous)

    def last(self) -> bool:
        """At the end of the batches: whether the last step's vote asked to stop."""
        previous, self.pending = self.pending, None
        return self._read(previous)

    @staticmethod
    def _read(vote) -> bool:
        if vote is None:
            return False
        host, event = vote
        if event is not None:
            event.synchronize()
        return host.item() > 0


# ----------------------------------------------------------------------------------------------- evaluation
def shard(indices: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's part of `indices` for an evaluation pass in batches of `batch_size`: the batches b with
    b mod N = rank, so each batch is the one of a single process."""
    if not active():
        return indices
    mine = indices.split(batch_size)[rank()::world_size()]
    return torch.cat(mine) if mine else indices[:0]


def gather(local: list, total: int, batch_size: int) -> torch.Tensor:
    """The outputs of every rank's `shard` (a list of per-batch tensors, rows first), concatenated on every rank
    in the original order of the `total` rows. Single process: torch.cat(local)."""
    if not active():
        return torch.cat(local)
    world, sizes = world_size(), [len(b) for b in torch.arange(total).split(batch_size)]
    counts = [sum(sizes[r::world]) for r in range(world)]
    meta = [(total, tuple(local[0].shape[1:]), local[0].dtype, local[0].device) if local else None]
    tdist.broadcast_object_list(meta, src=0, device=_comm_device())  # rank 0 holds a batch whenever total > 0
    total_0, shape, dtype, device = meta[0]
    if total_0 != total:  # a bug, not bad input: say so instead of a size mismatch deep in the backend
        raise RuntimeError(f"rank {rank()} gathers {total} rows, rank 0 {total_0}: the processes diverged")
    device = local[0].device if local else device if device.type == "cpu" else _comm_device()
    wire = torch.uint8 if dtype == torch.bool else dtype  # gloo sends no bool
    padded = torch.zeros(max(counts), *shape, dtype=wire, device=_comm_device())
    if local:
        mine = torch.cat(local)
        padded[:len(mine)] = mine.to(wire)
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded)
    chunks = [list(p[:c].split(sizes[r::world])) for r, (p, c) in enumerate(zip(parts, counts))]
    ordered = [chunks[b % world][b // world] for b in range(len(sizes))]
    return torch.cat(ordered).to(device=device, dtype=dtype)
