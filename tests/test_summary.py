"""common/summary.py pools seeds per setting, puts the paper's numbers beside ours, gives paired claims a
confidence interval, draws one plot per setting and regenerates the README's results block."""
import json
import sys
from unittest import mock

import pytest

from common.summary import main as summary_main


def write(path, seed, acc, dataset="cifar100"):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "method": "lucir", "finished": True, "device": "cpu", "date": "2026-11-26", "wall_s": 120.0,
        "command": f"python lucir.py --seed {seed}", "git_commit": "abc1234def", "class_order": list(range(100)),
        "args": {"dataset": dataset, "base_classes": 50, "increment": 10, "seed": seed},
        "acc_per_phase": [acc + 10, acc, acc - 10], "nme_acc_per_phase": [acc + 9, acc - 1, acc - 11],
        "avg_inc_acc": acc, "nme_avg_inc_acc": acc - 1, "last_acc": acc - 10, "nme_last_acc": acc - 11,
        "forgetting": 5.0, "nme_forgetting": 6.0}))


def write_pair(root, seed, bn, tbbn):
    root.mkdir(parents=True)
    arms = {"bn": {"avg_inc_acc": bn, "last_acc": 30.0, "forgetting": 20.0, "wall_s": 60.0},
            "tbbn": {"avg_inc_acc": tbbn, "last_acc": 31.0, "forgetting": 15.0, "wall_s": 120.0}}
    (root / "paired.json").write_text(json.dumps({
        "baseline": "bn", "arms": arms, "dataset": "cifar100", "seed": seed,
        "difference": {"tbbn": {k: arms["tbbn"][k] - arms["bn"][k] for k in arms["bn"]}}}))


def test_seeds_pool_into_one_row_with_the_paper_value(tmp_path):
    write(tmp_path / "lucir__cifar100_B50_Inc10__seed0", 0, 60.0)
    write(tmp_path / "lucir__cifar100_B50_Inc10__seed1", 1, 62.0)
    (tmp_path / "unfinished__seed2").mkdir()
    (tmp_path / "unfinished__seed2" / "results.json").write_text(json.dumps({"finished": False}))
    write(tmp_path / "laptop" / "seed0" / "arm", 0, 60.0)  # a seed folder inside the path
    write(tmp_path / "laptop" / "seed1" / "arm", 1, 60.0)
    groups = summary_main([str(tmp_path)])
    assert list(groups) == ["laptop/arm", "lucir__cifar100_B50_Inc10"] and len(groups["laptop/arm"]) == 2
    assert len(groups["lucir__cifar100_B50_Inc10"]) == 2
    row = [line for line in (tmp_path / "SUMMARY.md").read_text().splitlines() if line.startswith("| lucir")][0]
    # paper (Fig. 5 legend); avg CNN, NME; last CNN, NME; forgetting CNN, NME: mean ± sample std; 2.0 minutes
    assert "| 2 | 63.42 / 63.12 | 61.00 ± 1.41 | 60.00 ± 1.41 | 51.00 ± 1.41 | 50.00 ± 1.41 | 5.00 ± 0.00 | " \
           "6.00 ± 0.00 | 2.0 | cpu | 2026-11-26 | abc1234 | `python lucir.py --seed 1` |" in row
    assert "[0](lucir__cifar100_B50_Inc10__seed0/results.json)" in row


def test_paired_differences_get_a_t_interval_and_a_sign_verdict(tmp_path):
    for seed, (bn, tbbn) in enumerate([(50.0, 53.0), (52.0, 53.0)]):
        write_pair(tmp_path / f"tbbn-er-paired__cifar100_B10_Inc10__seed{seed}", seed, bn, tbbn)
    for seed, gain in enumerate([2.0, 3.0, 4.0]):  # seeds as sub-folders: grouped the same way
        write_pair(tmp_path / "tbbn-ssil-paired__cifar100_B10_Inc10" / f"seed{seed}", seed, 50.0, 50.0 + gain)
    summary_main([str(tmp_path)])
    rows = {line.split(" | ")[0][2:]: line for line in (tmp_path / "SUMMARY.md").read_text().splitlines()
            if "tbbn - bn" in line}
    # diffs 3, 1: mean 2, s = 1.414, t(0.975, 1) = 12.706 -> 2 ± 12.71
    assert "| 2 | 51.00 ± 1.41 | 53.00 ± 0.00 | +2.00 [-10.71, +14.71] | +1.00 [+1.00, +1.00] | " \
           "-5.00 [-5.00, -5.00] | - | no: CI includes 0 | 2.0 / 1.0 |" in rows["tbbn-er-paired__cifar100_B10_Inc10"]
    # diffs 2, 3, 4: mean 3, s = 1, t(0.975, 2) = 4.303 -> 3 ± 4.303 / sqrt(3) = 3 ± 2.48
    ssil = rows["tbbn-ssil-paired__cifar100_B10_Inc10"]
    assert "| 3 | 50.00 ± 0.00 | 53.00 ± 1.00 | +3.00 [+0.52, +5.48] |" in ssil and "| yes |" in ssil


def test_one_plot_per_setting_or_one_line_without_matplotlib(tmp_path):
    write(tmp_path / "lucir__cifar100_B50_Inc10__seed0", 0, 60.0)
    with mock.patch.dict(sys.modules, {"matplotlib": None}):  # import fails as when it is not installed
        summary_main([str(tmp_path)])
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "matplotlib is not installed" in text and not (tmp_path / "plots").exists()
    pytest.importorskip("matplotlib")
    summary_main([str(tmp_path)])
    png = tmp_path / "plots" / "lucir__cifar100_B50_Inc10.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![lucir__cifar100_B50_Inc10](plots/lucir__cifar100_B50_Inc10.png)" in (tmp_path / "SUMMARY.md").read_text()


def test_readme_block_is_regenerated_from_real_data_runs_only(tmp_path):
    results = tmp_path / "results"
    write(results / "lucir__cifar100_B50_Inc10__seed0", 0, 60.0)
    write(results / "smoke" / "lucir", 0, 10.0, dataset="synthetic")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- results:begin -->\nold table\n<!-- results:end -->\nafter\n")
    summary_main([str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# title\n<!-- results:begin -->\n| setting |") and text.endswith("<!-- results:end -->\n"
                                                                                         "after\n")
    assert "old table" not in text and "| lucir__cifar100_B50_Inc10 |" in text and "smoke" not in text
    assert "[0](results/lucir__cifar100_B50_Inc10__seed0/results.json)" in text
