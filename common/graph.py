"""Turn a plain training-step function into a captured CUDA graph (eager on CPU or with --no-graph).

    step = CapturedStep(train_step, device, enabled=not args.no_graph, optimizer=optimizer)
    stats += step(x, y)  # static buffers, overwritten by the next call: use them now

The step stays plain PyTorch (zero_grad(set_to_none=True), forward, loss, backward, optimiser step) returning a few
detached tensors, with fixed input shapes and no host sync (no `.item()`, `nonzero()`, data-dependent shapes).
On CUDA the first `warmup` calls run eagerly on a side stream (real steps that let cuDNN and the optimiser
allocate), the next captures, later ones copy the inputs into static buffers and replay; a new learning rate (a
milestone) re-captures; captured equals eager (tests/test_graph.py, on CUDA). Make a new CapturedStep when the
model, optimiser or active classes change (each phase). Under torchrun the gradient all_reduce (common.dist
.sync_gradients) is captured too (not run on a GPU here). A failed capture prints one line, and every
CapturedStep of the process then runs eagerly (`graph_used` False).
"""
import torch

from common import dist

_capture_failed = []  # the first capture error of this process, if any


def graph_used(enabled: bool, device: torch.device) -> bool:
    """Whether training steps ran as captured CUDA graphs: asked for, on CUDA, and no capture failed."""
    return enabled and device.type == "cuda" and not _capture_failed


class CapturedStep:
    def __init__(self, step_fn, device: torch.device, enabled: bool = True, optimizer=None, warmup: int = 3):
        self.step_fn, self.optimizer = step_fn, optimizer
        dist.sync_gradients(optimizer)  # torchrun: gradients averaged over the ranks before optimizer.step()
        self.enabled = graph_used(enabled, device)
        self.warmup_left = warmup
        self.graph = self.static_inputs = self.static_outputs = self.graph_lrs = None

    def _lrs(self):
        return tuple(float(g["lr"]) for g in self.optimizer.param_groups) if self.optimizer is not None else ()

    def __call__(self, *inputs):
        if not self.enabled or _capture_failed:
            return self.step_fn(*inputs)
        if self.graph is not None and self._lrs() != self.graph_lrs:
            self.graph = None  # learning rate changed: the old graph holds the old value
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step_fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            try:
                self._capture(inputs)
            except Exception as e:  # nothing ran during the failed capture: run this step eagerly, and all later
                _capture_failed.append(repr(e))
                self.enabled, self.graph = False, None
                print(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                      "); training continues eagerly", flush=True)
                return self.step_fn(*inputs)
        else:
            for static, x in zip(self.static_inputs, inputs):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_outputs

    def _capture(self, inputs):
        self.static_inputs = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_outputs = self.step_fn(*self.static_inputs)
        self.graph, self.graph_lrs = graph, self._lrs()
