"""Runs that survive faults (issue 11): mid-phase stop and resume to the uninterrupted numbers, a real SIGTERM,
damaged checkpoints, an unwritable run folder, and the numeric flag checks of every script."""
import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
from unittest import mock

import pytest
import torch

from conftest import ROOT
from common.checkpoints import load_state, prepare_out_dir, save_state
from common.errors import UserError
from common.flags import check_flags, flag_rule
from common.stop import Stopped, run_main

import lucir

# A tiny LUCIR protocol with every fault-relevant part: two phases, memory, a CBF stage after herding.
# Steps (smoke batch 32): phase 0 4 epochs x 2, phase 1 4 epochs x 4 (50 images + 50 exemplars), CBF 1 epoch x 4.
FLAGS = ["--smoke", "--device", "cpu", "--classes", "10", "--base-classes", "5", "--increment", "5",
         "--train-per-class", "10", "--epochs", "4", "--milestones", "2"]


def numbers(out_dir):
    """Everything numeric a run reports, per phase (wall times left out)."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    keep = ("cnn_acc", "nme_acc", "cnn_acc_per_task", "nme_acc_per_task", "sigma", "lambda", "memory_size")
    return [{k: r[k] for k in keep} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("faults") / "uninterrupted")
    lucir.main(FLAGS + ["--out-dir", out])
    return out


def test_stop_mid_phase_and_resume_gives_the_uninterrupted_numbers(reference, tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(Stopped) as stop:  # phase 1, epoch 2, after its 3rd step; epoch 1 ended with a checkpoint
        lucir.main(FLAGS + ["--out-dir", out, "--checkpoint-minutes", "0", "--stop-after-steps", "15"])
    assert stop.value.code == 143 and "phase 1, epoch 2 after step 3" in str(stop.value)
    assert "continue with: python" in str(stop.value) and "--resume" in str(stop.value)
    assert set(os.listdir(out)) == {"checkpoint.pt", "in_phase.pt", "in_phase.prev.pt", "metrics.jsonl"}

    # Damaged newest checkpoint: one line naming it, then the previous one (the end of epoch 1) is used.
    with open(os.path.join(out, "in_phase.pt"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(out, "in_phase.pt")) // 2)
    capsys.readouterr()
    with pytest.raises(Stopped) as stop:  # from epoch 2 step 1: 12 more steps of phase 1, then 2 of CBF
        lucir.main(FLAGS + ["--out-dir", out, "--resume", "--stop-after-steps", "14"])
    err = capsys.readouterr().err
    assert f"{os.path.join(out, 'in_phase.pt')} is damaged or unreadable" in err
    assert f"falling back to the previous checkpoint {os.path.join(out, 'in_phase.prev.pt')}" in err
    assert "phase 1 CBF, epoch 1 after step 2" in str(stop.value)

    lucir.main(FLAGS + ["--out-dir", out, "--resume"])  # main training restored whole, CBF from its step 3
    assert "phase 1: finished before the checkpoint, restored" in capsys.readouterr().out
    assert numbers(out) == numbers(reference)  # bit-identical on CPU
    ours, theirs = (json.load(open(os.path.join(d, "results.json"))) for d in (out, reference))
    for key in ("acc_matrix", "nme_acc_matrix", "avg_inc_acc", "nme_avg_inc_acc", "forgetting"):
        assert ours[key] == theirs[key], key
    assert not os.path.exists(os.path.join(out, "in_phase.pt"))  # dropped once the phase ended


def test_sigterm_finishes_the_step_checkpoints_and_resumes(reference, tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(torch.get_num_threads()), MKL_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "lucir.py", *FLAGS, "--out-dir", out], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the end of phase 0's first epoch: training is under way
        if "phase 0 epoch 1/4" in line:
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM: finishing the current step" in stderr and "stopped by SIGTERM in phase" in stderr
    assert f"continue with: python lucir.py {' '.join(FLAGS)} --out-dir {out} --resume" in stderr
    assert "Traceback" not in stderr and not os.path.exists(os.path.join(out, "results.json"))
    assert load_state(os.path.join(out, "in_phase.pt"))["stage"].startswith("phase ")  # weights_only load
    lucir.main(FLAGS + ["--out-dir", out, "--resume"])
    assert numbers(out) == numbers(reference)


def test_damaged_checkpoints_fall_back_or_say_none_is_usable(tmp_path, capsys):
    path = str(tmp_path / "checkpoint.pt")
    save_state(path, {"phase": 0, "rows": [1.5], "t": torch.arange(3)})
    save_state(path, {"phase": 1, "rows": [2.5], "t": torch.arange(4)})
    assert load_state(path)["phase"] == 1 and load_state(str(tmp_path / "checkpoint.prev.pt"))["phase"] == 0
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 not a whole file")
    assert load_state(path)["phase"] == 0
    assert capsys.readouterr().err.count("damaged or unreadable") == 1
    with open(str(tmp_path / "checkpoint.prev.pt"), "wb") as f:
        f.write(b"")
    with pytest.raises(UserError, match="no usable checkpoint"):
        load_state(path)
    torch.save({"phase": 2, "obj": argparse.Namespace(a=1)}, path)  # not tensors and plain types: refused
    with open(str(tmp_path / "checkpoint.prev.pt"), "wb"):
        pass
    with pytest.raises(UserError):
        load_state(path)


def test_unwritable_out_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to --out-dir"):
        prepare_out_dir(str(blocker / "run"), resume=False)
    with mock.patch("shutil.disk_usage", return_value=mock.Mock(free=10 << 20)):  # a nearly full disk
        with pytest.raises(UserError, match="only 10 MiB free"):
            prepare_out_dir(str(tmp_path / "run"), resume=False)
    with pytest.raises(SystemExit) as exit_:  # end to end: one line, exit 2, nothing trained
        run_main(lambda: lucir.main(FLAGS + ["--out-dir", str(blocker / "run")]))
    out = capsys.readouterr()
    assert exit_.value.code == 2 and out.err.startswith("error: cannot write to --out-dir") and \
        out.err.count("\n") == 1 and "phase" not in out.out


BAD = {"count": "0", "count0": "-1", "positive": "0", "nonneg": "-1", "prob": "1.5", "unit": "1"}


def numeric_flags(module):
    """(option string, attribute) of every int / float flag of a script's parser."""
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, *a, **k):
        parsers.append(self)
        return original(self, *a, **k)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", spy):
        module.parse_args(["--device", "cpu"])
    return [(a.option_strings[0], a.dest) for a in parsers[0]._actions if a.type in (int, float)]


@pytest.mark.parametrize("name", ["lucir", "tbbn", "bsce", "cim", "genifer"])
def test_every_numeric_flag_has_a_rule_and_a_bad_value_gets_one_line(name):
    if not os.path.exists(os.path.join(ROOT, f"{name}.py")):
        pytest.skip(f"{name}.py not in this checkout")
    module = importlib.import_module(name)
    flags = numeric_flags(module)
    assert ("--lr", "lr") in flags and ("--batch-size", "batch_size") in flags
    for option, dest in flags:
        rule = flag_rule(dest)
        assert rule is not None, f"{name}.py {option} has no rule in common.flags.FLAG_RULES"
        if rule == "milestones":
            epochs_option = option[:-len("milestones")] + "epochs"
            bad = ["--device", "cpu", epochs_option, "3", option, "4"]
        else:
            bad = ["--device", "cpu", option, BAD[rule]]
        with pytest.raises(UserError) as error:
            module.parse_args(bad)
        assert option in str(error.value) and "\n" not in str(error.value), (option, str(error.value))
    for value in ("nan", "inf"):
        with pytest.raises(UserError, match="--lr .* is not a finite number"):
            module.parse_args(["--device", "cpu", "--lr", value])
    with pytest.raises(UserError, match="--batch-size 0 must be"):  # not hidden by --smoke's own batch size
        module.parse_args(["--smoke", "--batch-size", "0"])


def test_flag_rules_by_hand():
    ok = argparse.Namespace(epochs=3, milestones=[1, 3], cbf_epochs=1, cbf_milestones=[1], lr=0.1, momentum=0.0,
                            weight_decay=0.0, replay_fraction=1.0, memory_total=None, seed=0, smoke=True)
    check_flags(ok)
    with pytest.raises(UserError, match=r"^--cbf-milestones 2 must lie in 1..1 \(the epochs\); --momentum 1.0 must "
                                        r"be a number in \[0, 1\)$"):
        check_flags(argparse.Namespace(**{**vars(ok), "cbf_milestones": [2], "momentum": 1.0}))
    with pytest.raises(UserError, match="--replay-fraction -0.1 must be a probability"):
        check_flags(argparse.Namespace(**{**vars(ok), "replay_fraction": -0.1}))
    with pytest.raises(SystemExit) as exit_:  # the example: --batch-size 0 used to loop forever
        run_main(lambda: lucir.main(["--device", "cpu", "--batch-size", "0"]))
    assert exit_.value.code == 2


def test_ctrl_c_exits_130_with_the_resume_command(monkeypatch, capsys):
    import common.stop
    monkeypatch.setattr(sys, "argv", ["lucir.py", "--smoke", "--stop-after-steps", "3"])
    common.stop._STOP_SIGNALS.append(signal.SIGINT)  # what the handler records on Ctrl-C

    def stopped_main():
        raise common.stop._stopped("in phase 0, epoch 1 after step 3; checkpoint x/in_phase.pt")
    with pytest.raises(SystemExit) as exit_:
        run_main(stopped_main)
    assert exit_.value.code == 130 and not common.stop._STOP_SIGNALS
    assert capsys.readouterr().err == "stopped by SIGINT in phase 0, epoch 1 after step 3; checkpoint " \
                                      "x/in_phase.pt\ncontinue with: python lucir.py --smoke --resume\n"


def test_a_signal_outside_any_stage_loop_stops_at_once(monkeypatch):
    """A script (or a part of one) whose training does not run through Stage cannot stop after a step: no wait."""
    import common.stop
    monkeypatch.setattr(common.stop, "_STAGES_USED", [])
    with pytest.raises(Stopped) as stop:
        common.stop._request_stop(signal.SIGTERM, None)
    assert stop.value.code == 143 and "the last checkpoint in the run folder is kept" in str(stop.value)
    assert not common.stop._STOP_SIGNALS


def test_a_stage_without_a_run_folder_never_writes_a_checkpoint():
    """Unit tests drive a Stage with no --out-dir; the periodic checkpoint (here due at every epoch) must then be
    skipped, not crash on a missing folder (the suite's tenth minute once did exactly that)."""
    from common.stage import Stage
    model = torch.nn.Linear(2, 2)
    args = argparse.Namespace(out_dir=None, checkpoint_minutes=0.0)
    stage = Stage(args, "unit", model, None, None, epochs=3)
    assert list(stage.epochs()) == [0, 1, 2]
