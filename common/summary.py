"""Summarise finished runs: one row per setting (seeds pooled), paper vs ours, written to <results>/summary.md.

    python -m common.summary results

A setting is a run folder's path with its `seed<N>` part removed, so run_all.sh's folders
results/<method>__<dataset>_B<base>_Inc<inc>[__<variant>]__seed<N>[/<arm>] group across seeds. Paper numbers
come from each script's PAPER_RESULTS (only LUCIR has published numbers; the others show paired arms).
"""
import glob
import importlib
import json
import os
import re
import statistics
import sys


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def paper_row(method, args):
    try:
        table = getattr(importlib.import_module(method), "PAPER_RESULTS", {})
    except ImportError:
        return "-"
    paper = table.get((args["dataset"], args["base_classes"], args["increment"]))
    return f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "-"


def main(argv=None):
    root = (argv or sys.argv[1:] or ["results"])[0]
    groups = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)):
        with open(path) as f:
            r = json.load(f)
        if not r.get("finished"):
            continue
        setting = re.sub(r"_*seed\d+", "", os.path.relpath(os.path.dirname(path), root)).strip("_/")
        groups.setdefault(setting, []).append(r)
    lines = ["| setting | n | paper avg CNN / NME | ours avg CNN | ours avg NME | ours last CNN | forgetting | "
             "wall (min) | device | date | command |", "|" + "---|" * 11]
    for setting, runs in groups.items():
        first = runs[0]
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(first["args"].items())
                         if k in ("dataset", "base_classes", "increment"))
        lines.append(f"| {setting} | {len(runs)} | {paper_row(first['method'], first['args'])} | "
                     f"{mean_std([r['avg_inc_acc'] for r in runs])} | {mean_std([r.get('nme_avg_inc_acc') for r in runs])} | "
                     f"{mean_std([r['last_acc'] for r in runs])} | {mean_std([r['forgetting'] for r in runs])} | "
                     f"{statistics.mean(r['wall_s'] for r in runs) / 60:.1f} | {first['device']} | "
                     f"{first.get('date', '-')} | {first['method']}.py {flags} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(table)
    return groups


if __name__ == "__main__":
    main()
