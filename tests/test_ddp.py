"""torchrun on the CPU (gloo, 2 processes): one results.json; evaluation, herding, class means, batches and a
training step that equal the one-process ones; an error of rank 0 and a stop request of one rank reach all.

The 2-process part runs this file under `python -m torch.distributed.run --nproc_per_node 2` (the block at the
end): each rank saves what it computed, and the tests compare it with the same calls in this (single) process.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, colour_of, solid_image


def torchrun(*args, timeout=240):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# Small enough for seconds on one CPU core, large enough for 3 evaluation batches (1000, 1000, 400): rank 0 runs
# batches 0 and 2, rank 1 batch 1.
CLASSES, PER_CLASS = 6, 400


def fixed_model():
    torch.manual_seed(3)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten())
    head = nn.Linear(32, CLASSES)
    for p in backbone[1].parameters():  # BN in eval mode with non-trivial statistics
        nn.init.uniform_(p, 0.5, 1.5)
    backbone[1].running_mean.uniform_(-0.2, 0.2)
    return backbone.eval(), head.eval()


def computations(files_root):
    """What both sides compute: evaluation, herding, class means of a fixed model; one epoch's batches (on-device
    images and image files); one SGD step through CapturedStep on the global batch of 8."""
    from common import dist
    from common.batches import train_batches
    from common.data import load_dataset, synthetic
    from common.evaluation import evaluate
    from common.graph import CapturedStep
    from common.memory import class_means, select_exemplars

    cpu = torch.device("cpu")
    data = synthetic(CLASSES, train_per_class=PER_CLASS, test_per_class=PER_CLASS, size=8, seed=1)
    backbone, head = fixed_model()
    memory = select_exemplars(backbone, data, range(CLASSES), 5, cpu)
    means = class_means(backbone, data, memory, CLASSES, cpu, view="hflip")
    result = evaluate(lambda x: (head(backbone(x)), backbone(x)), data, [(0, 3), (3, CLASSES)], 1, cpu, means)
    torch.manual_seed(7)
    batches = list(train_batches(data, torch.arange(40), 8, cpu))
    linear = nn.Linear(3 * 8 * 8, CLASSES)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.5)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(linear(x.flatten(1)), y)
        loss.backward()
        optimizer.step()
        return loss.detach()
    captured = CapturedStep(step, cpu, optimizer=optimizer)
    for x, y in batches[:2]:
        captured(x, y)
    files = load_dataset("imagenet", str(files_root), cpu, image_size=16)  # the DataLoader path
    torch.manual_seed(5)
    file_batches = list(train_batches(files, torch.arange(len(files.train_y)), 8, cpu))
    return {"evaluate": result, "memory": memory, "means": means, "batches": batches, "file_batches": file_batches,
            "weights": linear.weight.detach().clone(), "eval_shard": len(dist.shard(torch.arange(2400), 1000))}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out, files = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("imagenet")
    for split, per_class in (("train", 6), ("val", 1)):  # solid colours: every crop of an image is the same
        for c in range(4):
            for i in range(per_class):
                solid_image(str(files / split / f"n{c:08d}" / f"{split}_{i}.JPEG"), colour_of(c), 8)
    proc = torchrun(os.path.join("tests", "test_ddp.py"), str(out), str(files))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], computations(files)


def test_evaluation_under_two_processes_equals_one_process(two_ranks):
    ranks, single = two_ranks
    assert [r["eval_shard"] for r in ranks] == [1400, 1000]  # both ranks ran a part
    for r in ranks:
        assert r["evaluate"] == single["evaluate"]  # exactly, on every rank
    assert 0 < single["evaluate"]["cnn_acc"] < 100 and single["evaluate"]["nme_acc"] > 0


def test_herding_and_class_means_under_two_processes_equal_one_process(two_ranks):
    ranks, single = two_ranks
    for r in ranks:
        assert sorted(r["memory"]) == sorted(single["memory"])
        for c, idx in single["memory"].items():
            assert torch.equal(r["memory"][c], idx), c  # same exemplars, same herding order
        assert torch.equal(r["means"], single["means"])


def test_batches_are_slices_of_the_global_batch_and_a_step_uses_its_mean_gradient(two_ranks):
    ranks, single = two_ranks
    for kind, steps in (("batches", 5), ("file_batches", 3)):
        assert len(ranks[0][kind]) == len(single[kind]) == steps
        for b, (x, y) in enumerate(single[kind]):
            assert ranks[0][kind][b][0].shape[0] == 4
            assert torch.equal(torch.cat([r[kind][b][0] for r in ranks]), x)  # same draws, same augmentation
            assert torch.equal(torch.cat([r[kind][b][1] for r in ranks]), y)
    for r in ranks:  # averaged gradients: the step of the global batch (up to rounding of the mean)
        torch.testing.assert_close(r["weights"], single["weights"], rtol=0, atol=1e-6)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])


def test_rank0_error_ends_every_rank(two_ranks):
    ranks, _ = two_ranks
    assert ranks[0]["error"] == ranks[1]["error"] and "cannot write to --out-dir" in ranks[0]["error"]


def test_a_stop_request_of_one_rank_stops_every_rank_after_the_same_step(two_ranks):
    ranks, _ = two_ranks  # rank 1 alone asked in step 1 (SIGTERM need not reach both ranks within one step)
    assert ranks[0]["votes"] == ranks[1]["votes"] == [False, False, True, False, False]


@pytest.mark.parametrize("outcome, code", [("finished", 0), ("bad input", 2), ("stopped", 143)])
def test_under_torchrun_run_main_ends_the_process_without_interpreter_teardown(monkeypatch, capsys, outcome, code):
    """The gloo teardown abort (common.dist.exit_now) is a race, seen in 5 of 132 loaded launches: a test
    cannot catch it each time, so this checks the wiring: under torchrun every way out of run_main ends in
    os._exit with the run's exit code, and a single process never does."""
    from common import dist, errors, stop

    def main():
        if outcome == "bad input":
            raise errors.UserError("bad flag")
        if outcome == "stopped":
            raise stop.Stopped(143, "stopped by SIGTERM")

    class Exited(Exception):
        pass

    def fake_exit(status):
        raise Exited(status)
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(dist, "launched", lambda: True)
    with pytest.raises(Exited) as ended:
        stop.run_main(main)
    assert ended.value.args == (code,)
    monkeypatch.setattr(dist, "launched", lambda: False)
    if code:
        with pytest.raises(SystemExit) as ended:
            stop.run_main(main)
        assert ended.value.code == code
    else:
        assert stop.run_main(main) is None  # returns: tests and callers go on


def test_lucir_smoke_under_torchrun_writes_one_results_json(tmp_path):
    flags = ["--smoke", "--device", "cpu", "--epochs", "1", "--milestones", "1", "--classes", "10",
             "--base-classes", "5", "--increment", "5", "--train-per-class", "16"]
    proc = torchrun("lucir.py", *flags, "--out-dir", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert glob.glob(str(tmp_path / "**" / "results.json"), recursive=True) == [str(tmp_path / "two" /
                                                                                     "results.json")]
    assert proc.stdout.count("results: ") == 1 and proc.stdout.count("average incremental accuracy") == 1
    two = json.load(open(tmp_path / "two" / "results.json"))
    import lucir
    lucir.main(flags + ["--out-dir", str(tmp_path / "one")])
    one = json.load(open(tmp_path / "one" / "results.json"))
    assert set(two) == set(one) and two["finished"] and (two["processes"], one["processes"]) == (2, 1)
    assert two["command"].startswith("torchrun --nproc_per_node=2 lucir.py --smoke")
    assert len(two["acc_per_phase"]) == len(one["acc_per_phase"]) == 2
    assert len(open(tmp_path / "two" / "metrics.jsonl").read().splitlines()) == 2


if __name__ == "__main__":  # one rank of the 2-process run: python -m torch.distributed.run ... test_ddp.py OUT
    from common import dist
    from common.checkpoints import prepare_out_dir
    from common.errors import UserError
    dist.init(torch.device("cpu"))
    saved = computations(sys.argv[2])
    blocker = os.path.join(sys.argv[1], "a_file")
    open(blocker, "w").close() if dist.is_main() else None
    try:  # rank 0 cannot create the folder (its parent is a file); rank 1 must get the same error, not hang
        prepare_out_dir(os.path.join(blocker, "run"), False)
        saved["error"] = None
    except UserError as e:
        saved["error"] = str(e)
    vote = dist.StopVote()
    saved["votes"] = [vote(dist.rank() == 1 and step == 1) for step in range(4)] + [vote.last()]
    torch.save(saved, os.path.join(sys.argv[1], f"rank{dist.rank()}.pt"))
    dist.close(wait=True)
    dist.exit_now(0)  # as common.stop.run_main: no interpreter teardown under torchrun (see exit_now)
