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


def test_paired_differences_pool_across_seeds(tmp_path):
    for seed, (bn, tbbn) in enumerate([(50.0, 53.0), (52.0, 53.0)]):
        root = tmp_path / f"tbbn-er-paired__cifar100_B10_Inc10__seed{seed}"
        root.mkdir()
        arms = {"bn": {"avg_inc_acc": bn, "last_acc": 30.0, "forgetting": 20.0, "wall_s": 60.0},
                "tbbn": {"avg_inc_acc": tbbn, "last_acc": 31.0, "forgetting": 15.0, "wall_s": 120.0}}
        (root / "paired.json").write_text(json.dumps({
            "baseline": "bn", "arms": arms,
            "difference": {"tbbn": {k: arms["tbbn"][k] - arms["bn"][k] for k in arms["bn"]}}}))
    summary_main([str(tmp_path)])
    table = (tmp_path / "summary.md").read_text()
    row = [line for line in table.splitlines() if "tbbn - bn" in line][0]
    assert "| 2 | 2.00 ± 1.41 | 1.00 ± 0.00 | -5.00 ± 0.00 | 2.0 / 1.0 |" in row
