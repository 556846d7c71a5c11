"""common/summary.py pools seeds per setting and puts the paper's numbers beside ours."""
import json


from common.summary import main as summary_main


def write(path, seed, acc):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "method": "lucir", "finished": True, "device": "cpu", "date": "2026-11-26", "wall_s": 120.0,
        "args": {"dataset": "cifar100", "base_classes": 50, "increment": 10, "seed": seed},
        "avg_inc_acc": acc, "nme_avg_inc_acc": acc - 1, "last_acc": acc - 10, "forgetting": 5.0}))


def test_seeds_pool_into_one_row_with_the_paper_value(tmp_path):
    write(tmp_path / "lucir__cifar100_B50_Inc10__seed0", 0, 60.0)
    write(tmp_path / "lucir__cifar100_B50_Inc10__seed1", 1, 62.0)
    (tmp_path / "unfinished__seed2").mkdir()
    (tmp_path / "unfinished__seed2" / "results.json").write_text(json.dumps({"finished": False}))
    groups = summary_main([str(tmp_path)])
    assert list(groups) == ["lucir__cifar100_B50_Inc10"] and len(groups["lucir__cifar100_B50_Inc10"]) == 2
    table = (tmp_path / "summary.md").read_text()
    assert "| 63.42 / 63.12 |" in table                     # paper, Fig. 5 legend
    assert "| 61.00 ± 1.41 |" in table                      # mean ± sample std of 60 and 62
    assert "not" not in table and "2.0" in table            # wall time in minutes
