"""Run one arm of `lucir.py --paired ablation` exactly as common.results.run_arms does (same args, shared base), so
two arms of one seed can run side by side; the paired run's --resume then finds them finished."""
import argparse, os, sys
import lucir
from common.stop import run_main
name, flags = sys.argv[1], sys.argv[2:]
args = lucir.parse_args(flags)
overrides = dict(lucir.LADDER)[name]
arm = argparse.Namespace(**{**vars(args), **overrides, "paired": None, "out_dir": os.path.join(args.out_dir, name)})
run_main(lambda: lucir.run(arm, shared_base=os.path.join(args.out_dir, "base_phase.pt")))
