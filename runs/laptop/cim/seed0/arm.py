"""Run one arm of `cim.py --paired` exactly as cim.run_paired / common.results.run_arms run it (same args, into
out_dir/<arm>/), so that the two arms of a seed can run side by side on two cores; `run_all.sh --laptop --only cim`
(the paired run with --resume) then finds both finished and writes paired.json.
Usage: python runs/laptop/cim/seed0/arm.py foster|foster_cim <cim.py flags, as the run_all.sh --laptop row>
(Written again on 2026-12-04 after the 2026-12-03 copy was lost with that session's disk; same logic.)"""
import argparse, os, sys
sys.path.insert(0, os.getcwd())
import cim
from common.stop import run_main
name, flags = sys.argv[1], sys.argv[2:]
args = cim.parse_args(flags)
overrides = {"foster": {"no_cim": True}, "foster_cim": {"no_cim": False}}[name]
arm = argparse.Namespace(**{**vars(args), **overrides, "paired": None, "out_dir": os.path.join(args.out_dir, name)})
run_main(lambda: cim.run(arm))
