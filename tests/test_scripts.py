"""Every method script exposes the same protocol and system flags, and a --help that explains each one."""
import importlib
import json

import pytest

SCRIPTS = ["lucir", "tbbn", "bsce"]                    # CIFAR-100 protocols with the 160-epoch schedule
ALL_SCRIPTS = SCRIPTS + ["cim", "genifer"]
SHARED = ["dataset", "data_dir", "classes", "train_per_class", "image_size", "backbone", "base_classes", "increment",
          "memory_per_class", "memory_total", "class_order_seed", "epochs", "batch_size", "lr", "milestones",
          "momentum", "weight_decay", "seed", "device", "no_amp", "no_graph", "workers", "out_dir", "resume",
          "stop_after", "checkpoint_minutes", "smoke", "class_list"]


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_shared_flags(name):
    args = importlib.import_module(name).parse_args(["--smoke", "--device", "cpu"])
    missing = [flag for flag in SHARED if not hasattr(args, flag)]
    assert not missing, missing
    assert args.dataset == "synthetic"


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_and_paper_defaults(name):
    module = importlib.import_module(name)
    args = module.parse_args(["--smoke", "--device", "cpu"])
    assert args.dataset == "synthetic" and args.class_order_seed == 1993
    defaults = module.parse_args(["--device", "cpu"])      # no flags: the paper's protocol on CIFAR-100
    assert defaults.dataset == "cifar100" and defaults.backbone == "resnet32"
    assert defaults.epochs == 160 and defaults.milestones == [80, 120] and defaults.lr == 0.1
    timing = module.parse_args(["--device", "cpu", "--dataset", "cifar100-synthetic"])  # CIFAR protocol, made-up data
    assert {k: v for k, v in vars(timing).items() if k not in ("dataset", "data_dir")} == \
        {k: v for k, v in vars(defaults).items() if k not in ("dataset", "data_dir")}


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_help_cites_sources(name, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--dataset", "--classes", "--base-classes", "--epochs", "--lr", "--milestones", "--seed", "--smoke",
                 "--checkpoint-minutes"):
        assert flag in out
    assert "official" in out or "Sec." in out


def run_all(*args, **env):
    import os
    import subprocess
    from conftest import ROOT
    import sys
    # run_all.sh calls `python`: the interpreter running these tests comes first (e.g. a venv not activated)
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PATH=path, **env)
    return subprocess.run(["bash", "run_all.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_run_all_on_a_cpu_only_machine_runs_every_smoke_protocol(tmp_path):
    """The README's first command on a machine without a GPU: every script's smoke run, then the summary."""
    out = run_all("--only", "lucir,tbbn,bsce", RESULTS=str(tmp_path),
                  SMOKE_FLAGS="--epochs 1 --milestones 1")  # the full smoke runs are tested script by script
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "no GPU visible" in out.stdout and "rows: 3 ran, 0 skipped, 0 failed" in out.stdout
    table = (tmp_path / "smoke" / "SUMMARY.md").read_text()
    assert "| lucir |" in table and "| tbbn/tbbn |" in table and "| bsce/bsce |" in table
    assert "| tbbn - bn |" in table and "| bsce - ce |" in table
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "smoke" / "plots" / "tbbn.png").exists()  # both arms in one plot
    except ImportError:
        assert "matplotlib is not installed" in table
    again = run_all("--only", "lucir", RESULTS=str(tmp_path))
    assert again.returncode == 0 and "done lucir (finished earlier; only re-summarised)" in again.stdout


def test_run_all_skips_missing_data_and_scripts_with_one_line_and_runs_the_rest(tmp_path, cifar_dir):
    import os
    from conftest import ROOT
    tiny = ("--device cpu --classes 10 --base-classes 5 --increment 5 --epochs 1 --milestones 1 "
            "--memory-per-class 2 --cbf-epochs 1 --cbf-milestones 1 --workers 0")
    out = run_all("--full", "--only", "lucir,cim,genifer", "--seeds", "0", "--cifar", str(cifar_dir), "--tiny",
                  str(tmp_path / "none"), "--imagenet", str(tmp_path / "none"), RESULTS=str(tmp_path / "r"),
                  EXTRA_FLAGS=tiny)
    assert out.returncode == 1, out.stderr[-3000:]  # not every row ran
    lines = out.stdout.splitlines()
    assert f"skip lucir__tinyimagenet__seed0: Tiny-ImageNet-200 not found: unpack ../shared/data/" \
           f"tiny-imagenet-200/*.tar.gz (or http://cs231n.stanford.edu/tiny-imagenet-200.zip) into " \
           f"{tmp_path / 'none'}/ (--tiny DIR)" in lines
    assert sum(line.startswith("skip lucir__imagenet") and "ImageNet not found" in line for line in lines) == 4
    for script in ("cim", "genifer"):
        if not os.path.exists(os.path.join(ROOT, f"{script}.py")):
            assert lines.count(f"skip: {script}.py not in this checkout (its rows: none run)") == 1
    for row in ("lucir__cifar100_B50_Inc10__seed0", "lucir__cifar100_B50_Inc5__seed0"):
        assert (tmp_path / "r" / row / "results.json").exists()
    assert "| lucir__cifar100_B50_Inc10 |" in (tmp_path / "r" / "SUMMARY.md").read_text()


def test_run_all_laptop_rows_resume_and_summary(tmp_path, tiny_imagenet_dir):
    """`run_all.sh --laptop` on a tiny Tiny-ImageNet layout (EXTRA_FLAGS shrink the protocol): the BSCE rows of two
    seeds, a row stopped after its base phase and continued by the same command, and the summary's paired rows."""
    tiny = ("--device cpu --classes 3 --train-per-class 2 --image-size 8 --base-classes 2 --increment 1 "
            "--epochs 1 --milestones 1 --batch-size 4 --workers 0")
    common = ("--laptop", "--only", "bsce", "--tiny", str(tiny_imagenet_dir))
    stopped = run_all(*common, "--seeds", "0", RESULTS=str(tmp_path), EXTRA_FLAGS=tiny + " --stop-after 0")
    laptop = tmp_path / "laptop"
    assert (laptop / "bsce_loss" / "seed0" / "ce" / "checkpoint.pt").exists(), stopped.stderr[-2000:]
    assert not (laptop / "bsce_loss" / "seed0" / "paired.json").exists()
    out = run_all(*common, "--seeds", "0 1", RESULTS=str(tmp_path), EXTRA_FLAGS=tiny)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "rows: 4 ran, 0 skipped, 0 failed" in out.stdout
    assert "resumed after phase 0" in out.stdout                        # the stopped row continued
    for claim, arms in (("bsce_loss", ("ce", "bsce")), ("bsce_memfree", ("ce_nomem", "bsce_nomem"))):
        for seed in (0, 1):
            paired = json.loads((laptop / claim / f"seed{seed}" / "paired.json").read_text())
            assert set(paired["arms"]) == set(arms) and paired["seed"] == seed
            assert json.loads((laptop / claim / f"seed{seed}" / arms[1] / "results.json").read_text())[
                "args"]["memory_per_class"] == (0 if claim == "bsce_memfree" else 20)
    table = (laptop / "SUMMARY.md").read_text()
    assert "| bsce_loss | bsce - ce | 2 |" in table and "| bsce_memfree | bsce_nomem - ce_nomem | 2 |" in table
    again = run_all(*common, "--seeds", "0 1", RESULTS=str(tmp_path), EXTRA_FLAGS=tiny)
    assert again.stdout.count("finished earlier; only re-summarised") == 4


def test_run_all_laptop_has_the_cim_and_genifer_rows(tmp_path, tiny_imagenet_dir):
    """The CIM pair and Genifer's three pairs run from `run_all.sh --laptop` (shrunk by EXTRA_FLAGS) into the
    summary; a Genifer row counts as finished once each of its pair_<pair>/paired.json is written (no re-run)."""
    tiny = ("--device cpu --classes 3 --train-per-class 2 --image-size 8 --base-classes 2 --increment 1 "
            "--epochs 1 --milestones 1 --batch-size 4 --workers 0")
    common = ("--laptop", "--seeds", "0", "--tiny", str(tiny_imagenet_dir))
    cim = run_all(*common, "--only", "cim", RESULTS=str(tmp_path),
                  EXTRA_FLAGS=tiny + " --boost-epochs 1 --compress-epochs 1 --cam-interval 1")
    gan = " --g-channels 16 8 --d-width 8 --gan-epochs-first 1 --gan-epochs 1 --gan-batch-size 2 --latent-dim 8"
    genifer = run_all(*common, "--only", "genifer", RESULTS=str(tmp_path), EXTRA_FLAGS=tiny + gan)
    for out in (cim, genifer):
        assert out.returncode == 0 and "rows: 1 ran" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    laptop = tmp_path / "laptop"
    assert set(json.loads((laptop / "cim" / "seed0" / "paired.json").read_text())["arms"]) == {"foster", "foster_cim"}
    for pair in ("finetune", "lwf", "image-replay"):
        arms = json.loads((laptop / "genifer" / "seed0" / f"pair_{pair}" / "paired.json").read_text())["arms"]
        assert set(arms) == {"genifer", pair.replace("-", "_")}
    assert (laptop / "genifer" / "seed0" / "genifer" / "samples_task0.png").exists()  # the GAN after task 0
    table = (laptop / "SUMMARY.md").read_text()
    for row in ("| cim | foster_cim - foster | 1 |", "| genifer/pair_lwf | genifer - lwf | 1 |",
                "| genifer/pair_image-replay | genifer - image_replay | 1 |"):
        assert row in table
    again = run_all(*common, "--only", "genifer", RESULTS=str(tmp_path), EXTRA_FLAGS=tiny + gan)
    assert "done laptop/genifer/seed0 (finished earlier" in again.stdout and "+ python" not in again.stdout
