"""Run one arm of `genifer.py --paired ...` exactly as genifer.run_paired does (same args, out_dir/<arm name>/), so
an arm can run on its own core; then, from the arms' results.json, write each pair_<pair>/paired.json as run_paired
would. Usage: python runs/laptop/genifer/seed0/arm.py <genifer|image-replay|finetune|lwf> <genifer.py flags>
       python runs/laptop/genifer/seed0/arm.py --write-pairs <genifer.py flags>"""
import argparse, json, os, sys
sys.path.insert(0, os.getcwd())
import genifer
from common.results import write_paired
from common.stop import run_main
pair, flags = sys.argv[1], sys.argv[2:]
args = genifer.parse_args(flags)
if pair == "--write-pairs":
    for p in args.paired:
        name = genifer.arm_name(argparse.Namespace(**{**genifer.GENIFER, **genifer.PAIRS[p]}))
        arms = {n: json.load(open(os.path.join(args.out_dir, n, "results.json"))) for n in (name, "genifer")}
        os.makedirs(os.path.join(args.out_dir, f"pair_{p}"), exist_ok=True)
        write_paired(os.path.join(args.out_dir, f"pair_{p}"), arms, name, extra_metrics=("generator_bytes",),
                     paired=p, dataset=args.dataset, seed=args.seed)
else:
    overrides = {**genifer.GENIFER, **genifer.PAIRS.get(pair, {})}  # "genifer": the Genifer arm itself
    name = genifer.arm_name(argparse.Namespace(**overrides))
    arm = argparse.Namespace(**{**vars(args), **overrides, "paired": None, "out_dir": os.path.join(args.out_dir, name)})
    # as run_paired: finetune and lwf start from Genifer's task 0, image-replay from its task-0 classifier
    run_main(lambda: genifer.run(arm, os.path.join(args.out_dir, "task0.pt")))
