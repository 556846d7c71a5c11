"""Every method script exposes the same protocol and system flags, and a --help that explains each one."""
import importlib

import pytest

from conftest import run_script

SCRIPTS = ["lucir", "tbbn", "bsce"]
SHARED = ["dataset", "data_dir", "backbone", "base_classes", "increment", "memory_per_class", "memory_total",
          "class_order_seed", "epochs", "batch_size", "lr", "milestones", "momentum", "weight_decay", "seed",
          "device", "no_amp", "no_graph", "workers", "out_dir", "resume", "stop_after", "smoke", "class_list"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_shared_flags_and_smoke_defaults(name):
    module = importlib.import_module(name)
    args = module.parse_args(["--smoke", "--device", "cpu"])
    missing = [flag for flag in SHARED if not hasattr(args, flag)]
    assert not missing, missing
    assert args.dataset == "synthetic" and args.class_order_seed == 1993
    defaults = module.parse_args(["--device", "cpu"])      # no flags: the paper's protocol on CIFAR-100
    assert defaults.dataset == "cifar100" and defaults.backbone == "resnet32"
    assert defaults.epochs == 160 and defaults.milestones == [80, 120] and defaults.lr == 0.1
    timing = module.parse_args(["--device", "cpu", "--dataset", "cifar100-synthetic"])  # CIFAR protocol, made-up data
    assert {k: v for k, v in vars(timing).items() if k not in ("dataset", "data_dir")} == \
        {k: v for k, v in vars(defaults).items() if k not in ("dataset", "data_dir")}


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_cites_sources(name):
    out = run_script(f"{name}.py", "--help")
    assert out.returncode == 0
    for flag in ("--dataset", "--base-classes", "--epochs", "--lr", "--milestones", "--seed", "--smoke"):
        assert flag in out.stdout
    assert "official" in out.stdout or "Sec." in out.stdout


def test_run_all_on_a_cpu_only_machine_runs_every_smoke_protocol(tmp_path):
    """The README's first command on a machine without a GPU: every script's smoke run, then the summary."""
    import os
    import subprocess
    from conftest import ROOT
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", RESULTS=str(tmp_path), OMP_NUM_THREADS="1",
               SMOKE_FLAGS="--epochs 1 --milestones 1")  # the full smoke runs are tested script by script
    out = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no GPU visible" in out.stdout
    table = (tmp_path / "smoke" / "summary.md").read_text()
    assert "| lucir |" in table and "tbbn - bn" in table and "bsce - ce" in table
