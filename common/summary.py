"""Summarise finished runs into <results>/SUMMARY.md: paper vs ours per setting, paired claims, plots.

    python -m common.summary results                       # writes results/SUMMARY.md (+ results/plots/*.png)
    python -m common.summary results --readme README.md    # also rewrites README's results block

A setting is a run folder's path without its `seed<N>` part, so seeds pool (the columns: README, after
`bash run_all.sh`). Plots need matplotlib (requirements-plots.txt). The README block between the markers gets the
tables of the runs on real data.
"""
import argparse
import glob
import importlib
import json
import math
import os
import re
import statistics
import time

from scipy import stats

README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def mean_ci(values):
    """(mean, low, high) with the 95% Student-t interval over seeds; low = high = None for fewer than 2 values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None, None
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def fmt_ci(values):
    mean, low, high = mean_ci(values)
    if mean is None:
        return "-"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]" if low is not None else f"{mean:+.2f} (1 seed, no CI)"


def sign_verdict(values):
    mean, low, high = mean_ci(values)
    if low is None:
        return "n/a (needs 2+ seeds)" if mean is not None else "-"
    return "yes" if low > 0 else "no: opposite sign" if high < 0 else "no: CI includes 0"


def paper_row(method, args):
    try:
        table = getattr(importlib.import_module(method), "PAPER_RESULTS", {})
    except ImportError:
        return "-"
    paper = table.get((args.get("dataset"), args.get("base_classes"), args.get("increment")))
    return f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "-"


def setting_of(folder, root):
    """The folder's path under `root` without its seed: `x__seed0/arm` and `x/seed0/arm` -> `x/arm`."""
    parts = [re.sub(r"_*seed\d+$", "", p) for p in os.path.relpath(folder, root).split(os.sep)]
    return "/".join(p for p in parts if p and p != ".") or "."


def collect(root):
    """Finished runs grouped by setting, and paired.json files grouped by setting; each run keeps its path."""
    runs, paired = {}, {}
    for name, groups in (("results.json", runs), ("paired.json", paired)):
        for path in sorted(glob.glob(os.path.join(root, "**", name), recursive=True)):
            with open(path) as f:
                r = json.load(f)
            if name == "paired.json" or r.get("finished"):
                groups.setdefault(setting_of(os.path.dirname(path), root), []).append({**r, "_path": path})
    return runs, paired


def links(paths, base):
    return " ".join(f"[{i}]({os.path.relpath(p, base)})" for i, p in enumerate(paths))


def command_of(r):
    if r.get("command"):
        return r["command"]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(r["args"].items())
                     if k in ("dataset", "base_classes", "increment"))  # a run made before "command" was saved
    return f"python {r['method']}.py {flags} ... (every flag: args in results.json)"


def tables(runs, paired, link_base):
    lines = ["| setting | n | paper avg CNN / NME | avg inc CNN | avg inc NME | last CNN | last NME | forgetting CNN | "
             "forgetting NME | wall (min) | device | date | commit | command | results |", "|" + "---|" * 15]
    for setting, rs in runs.items():
        first = rs[-1]
        lines.append(f"| {setting} | {len(rs)} | {paper_row(first['method'], first['args'])} | "
                     + " | ".join(mean_std([r.get(k) for r in rs]) for k in (
                         "avg_inc_acc", "nme_avg_inc_acc", "last_acc", "nme_last_acc", "forgetting", "nme_forgetting"))
                     + f" | {statistics.mean(r['wall_s'] for r in rs) / 60:.1f} | {first.get('device', '-')} | "
                     f"{first.get('date', '-')} | {(first.get('git_commit') or '-')[:7]} | `{command_of(first)}` | "
                     f"{links([r['_path'] for r in rs], link_base)} |")
    if paired:
        lines += ["", "Paired claims: arm - baseline on the same seed, data and class order; mean [95% CI over "
                  "seeds, Student t]; reproduced in sign = the CI of Δ avg inc (CNN) lies above 0.", "",
                  "| paired setting | arm - baseline | n | baseline avg inc CNN | arm avg inc CNN | Δ avg inc CNN | "
                  "Δ last CNN | Δ forgetting CNN | Δ avg inc NME | reproduced in sign | wall arm / baseline (min) | "
                  "paired |", "|" + "---|" * 12]
    for setting, ps in paired.items():
        for arm in ps[0]["difference"]:
            base = ps[0].get("versus", {}).get(arm, ps[0]["baseline"])  # a ladder: the rung below
            d = [p["difference"].get(arm, {}) for p in ps]
            walls = [(p["arms"][arm].get("wall_s") or 0, p["arms"][base].get("wall_s") or 0) for p in ps]
            lines.append(
                f"| {setting} | {arm} - {base} | {len(ps)} | "
                f"{mean_std([p['arms'][base].get('avg_inc_acc') for p in ps])} | "
                f"{mean_std([p['arms'][arm].get('avg_inc_acc') for p in ps])} | "
                + " | ".join(fmt_ci([x.get(k) for x in d]) for k in ("avg_inc_acc", "last_acc", "forgetting",
                                                                      "nme_avg_inc_acc"))
                + f" | {sign_verdict([x.get('avg_inc_acc') for x in d])} | "
                f"{statistics.mean(w[0] for w in walls) / 60:.1f} / {statistics.mean(w[1] for w in walls) / 60:.1f} | "
                f"{links([p['_path'] for p in ps], link_base)} |")
    return lines


def classes_seen(r):
    """Classes seen after each phase (the x axis): from the class order and the split flags."""
    args, n = r["args"], len(r["acc_per_phase"])
    total = len(r.get("class_order") or []) or args["base_classes"] + args["increment"] * (n - 1)
    return [min(args["base_classes"] + args["increment"] * i, total) for i in range(n)]


def plot(runs, root):
    """One accuracy-vs-classes PNG per setting (the arms of a pair share one); returns the markdown lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["Plots: matplotlib is not installed (`pip install -r requirements-plots.txt`), so only the tables."]
    groups = {}
    for setting, rs in runs.items():
        for r in rs:
            folder = os.path.dirname(r["_path"])
            is_arm = os.path.exists(os.path.join(os.path.dirname(folder), "paired.json"))
            key = setting_of(os.path.dirname(folder), root) if is_arm else setting
            groups.setdefault(key, []).append((os.path.basename(folder) if is_arm else r["method"], r))
    lines, colours = [], {}
    os.makedirs(os.path.join(root, "plots"), exist_ok=True)
    for key, members in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, r in members:
            colour = colours.setdefault((key, arm), f"C{len([k for k in colours if k[0] == key])}")
            seed = r["args"].get("seed")
            ax.plot(classes_seen(r), r["acc_per_phase"], "o-", color=colour, alpha=0.8, label=f"{arm} seed {seed} CNN")
            if r.get("nme_acc_per_phase"):
                ax.plot(classes_seen(r), r["nme_acc_per_phase"], "s--", color=colour, alpha=0.5,
                        label=f"{arm} seed {seed} NME")
        ax.set(xlabel="classes seen", ylabel="top-1 accuracy (%)", title=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", key) + ".png"
        fig.savefig(os.path.join(root, "plots", name), dpi=100, bbox_inches="tight")
        plt.close(fig)
        lines.append(f"![{key}](plots/{name})")
    return lines


def write_readme(readme, runs, paired):
    """Replace the text between the README's two marker comments by the tables of the runs on real data."""
    with open(readme) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"error: {readme} has no {README_BEGIN} ... {README_END} block")
    real = {s: [r for r in rs if r["args"].get("dataset") != "synthetic"] for s, rs in runs.items()}
    real = {s: rs for s, rs in real.items() if rs}
    real_paired = {s: ps for s, ps in paired.items() if ps[0].get("dataset") != "synthetic"}
    body = tables(real, real_paired, os.path.dirname(os.path.abspath(readme))) if real else \
        ["No runs made yet: `bash run_all.sh` on a GPU, then `python -m common.summary results --readme README.md`."]
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with open(readme, "w") as f:
        f.write(head + README_BEGIN + "\n" + "\n".join(body) + "\n" + README_END + tail)


def main(argv=None):
    p = argparse.ArgumentParser(description="Summarise finished runs into <root>/SUMMARY.md")
    p.add_argument("root", nargs="?", default="results", help="folder searched for results.json / paired.json")
    p.add_argument("--readme", default=None, help="also rewrite this README's results block (between the markers)")
    args = p.parse_args(argv)
    runs, paired = collect(args.root)
    lines = ["# Results summary", "", f"Generated by `python -m common.summary {args.root}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')} from {sum(map(len, runs.values()))} finished runs. Accuracies: "
             "top-1 %, mean ± std over seeds; average incremental accuracy includes the base phase.", ""]
    lines += tables(runs, paired, args.root) + [""] + plot(runs, args.root)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(args.root, "SUMMARY.md"), "w") as f:
        f.write(text)
    if args.readme:
        write_readme(args.readme, runs, paired)
    return runs


if __name__ == "__main__":
    main()
