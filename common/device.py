"""Device, bf16 autocast, seeding and the RNG state a checkpoint holds."""
import functools
import random

import numpy as np
import torch

from common import dist
from common.errors import UserError


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors and plain types (so a checkpoint loads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_device(args) -> torch.device:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no GPU is visible; pass --device cpu (or --smoke)")
    device = torch.device(args.device)
    if dist.launched():  # torchrun: one process a GPU (cuda:LOCAL_RANK), or CPU processes with gloo
        device = dist.init(device)
        world = dist.world_size()  # --batch-size (every *-batch-size) stays the global batch: N must divide it
        bad = [f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
               if k.endswith("batch_size") and isinstance(v, int) and v % world]
        if bad:
            raise UserError(f"{', '.join(bad)} must be divisible by the {world} processes of torchrun (the batch "
                            "size is the global batch)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


@functools.cache  # asked once: autocast() is entered in every training step
def cpu_bf16_is_faster() -> bool:
    """Whether bf16 autocast speeds up a ResNet-32 training step on this CPU, as measured (README "Speed"): AMX
    tiles (bf16 matrix units): yes; AVX512-BF16 on an AMD EPYC (issue 18): 1.63x, yes; AVX512-BF16 on an Intel Xeon
    without AMX (2026-12-04): 0.72-0.88x, no; no native bf16 (AVX2): emulated, 0.1x, no."""
    # a torch without one of these probes (older releases) counts as a CPU without that feature
    has = {f: getattr(torch.cpu, f"_is_{f}_supported", lambda: False)() for f in ("amx_tile", "avx512_bf16")}
    return has["amx_tile"] or (has["avx512_bf16"] and cpu_vendor() == "AuthenticAMD")


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...) from /proc/cpuinfo; "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def amp_used(device: torch.device, enabled: bool) -> bool:
    """Whether `autocast` runs bf16: asked for (not --no-amp), on CUDA or on a CPU where bf16 is faster."""
    return enabled and (device.type == "cuda" or (device.type == "cpu" and cpu_bf16_is_faster()))


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where `amp_used` (BN stays fp32 under autocast). cache_enabled=False so it can be captured."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_used(device, enabled), cache_enabled=False)
