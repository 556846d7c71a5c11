"""Write <root>/paired.json of `tbbn.py --paired bn tbbn` from its two arms' results.json, as tbbn.main writes it,
for arms that ran on their own, one a core: python tbbn.py <the run_all.sh --laptop row's flags without --paired>
--norm bn|tbbn --out-dir <root>/<norm> (run_arms gives each arm exactly these settings; there is no shared base).
Usage: python runs/laptop/tbbn_er/write_paired.py results/laptop/tbbn_er/seed1"""
import json, os, sys
sys.path.insert(0, os.getcwd())
from common.results import write_paired
root = sys.argv[1]
arms = {norm: json.load(open(os.path.join(root, norm, "results.json"))) for norm in ("bn", "tbbn")}
args = arms["bn"]["args"]
assert all(arms["tbbn"]["args"][k] == v for k, v in args.items() if k not in ("norm", "out_dir", "resume")), \
    "the arms ran with other settings"
write_paired(root, arms, "bn", host=args["host"], dataset=args["dataset"], seed=args["seed"])
