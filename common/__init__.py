"""Thin shared plumbing for the five CIL scripts: data, memory, backbones, evaluation, runs, CUDA graphs.

Each module is readable on its own. Nothing here knows about any method: no base classes, no registries of
methods, no callbacks. The scripts import names explicitly, e.g. `from common.data import load_dataset`.
"""
