"""Shared code of the five CIL scripts. Core (a reader can copy it; it imports only itself, errors and dist):
data       datasets, class order, phase splits, subsets
batches    on-device augmentation, batch iterators (tensors or a DataLoader)
memory     herding, budgets, reduction, NME class means
models     CIFAR ResNet-32 (registered with timm), timm backbones, small-input stem
evaluation CNN / NME accuracy, per-task accuracy, average incremental, last, forgetting
errors     UserError, the one error type (core and harness)
dist       torchrun: process group, gradient averaging, sharded evaluation, rank-0 writes (core and harness)
Harness (the run lifecycle around a method):
flags      parser, system flags, per-dataset defaults, numeric flag rules
device     device, bf16 autocast, seeding, RNG state
checkpoints  run folder, phase-end checkpoints, resume
stage      a training stage's loop: in-phase checkpoints, clean stop after a step, loss check, progress line
stop       run_main: one-line errors and exit codes, SIGTERM / Ctrl-C
results    results.json, environment, paired arms and paired.json
graph      CapturedStep: a plain step function as a CUDA graph (eager on CPU)
bench, summary  eager vs captured benchmark; paper-vs-ours table (command-line tools)
No base classes, no registries of methods, no callbacks; scripts import names explicitly.
"""
