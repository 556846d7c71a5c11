"""Summarise finished runs: one row per setting (seeds pooled), paper vs ours, written to <results>/summary.md.

    python -m common.summary results

A setting is a run folder's path with its `seed<N>` part removed, so run_all.sh's folders
results/<method>__<dataset>_B<base>_Inc<inc>[__<variant>]__seed<N>[/<arm>] group across seeds. Paper numbers
come from each script's PAPER_RESULTS (only LUCIR has published numbers). Paired claims (TBBN, BSCE) get a second
table from their paired.json files: each arm minus the baseline arm, per seed, pooled as mean ± std.
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
                     f"{mean_std([r['avg_inc_acc'] for r in runs])} | "
                     f"{mean_std([r.get('nme_avg_inc_acc') for r in runs])} | "
                     f"{mean_std([r['last_acc'] for r in runs])} | {mean_std([r['forgetting'] for r in runs])} | "
                     f"{statistics.mean(r['wall_s'] for r in runs) / 60:.1f} | {first['device']} | "
                     f"{first.get('date', '-')} | {first['method']}.py {flags} |")
    paired = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "paired.json"), recursive=True)):
        with open(path) as f:
            p = json.load(f)
        setting = re.sub(r"_*seed\d+", "", os.path.relpath(os.path.dirname(path), root)).strip("_/")
        paired.setdefault(setting, []).append(p)
    if paired:
        lines += ["", "| paired setting | arm - baseline | n | Δ avg inc (CNN) | Δ last | Δ forgetting | "
                  "wall arm / baseline (min) |", "|" + "---|" * 7]
    for setting, runs in paired.items():
        base = runs[0]["baseline"]
        for arm in runs[0]["difference"]:
            d = [r["difference"][arm] for r in runs]
            walls = [(r["arms"][arm]["wall_s"] / 60, r["arms"][base]["wall_s"] / 60) for r in runs]
            lines.append(f"| {setting} | {arm} - {base} | {len(runs)} | "
                         f"{mean_std([x.get('avg_inc_acc') for x in d])} | "
                         f"{mean_std([x.get('last_acc') for x in d])} | {mean_std([x.get('forgetting') for x in d])} | "
                         f"{statistics.mean(w[0] for w in walls):.1f} / {statistics.mean(w[1] for w in walls):.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(table)
    return groups


if __name__ == "__main__":
    main()
