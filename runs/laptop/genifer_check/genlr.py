"""Genifer laptop row, task 1 only, from the row's task-0 file: does the classifier learn the new classes?
usage: python genlr.py TAG [extra genifer flags...]  (run from a worktree with data/)"""
import copy, json, os, sys, time
import torch
sys.path.insert(0, os.getcwd())
HERE = os.path.dirname(os.path.abspath(__file__))
import genifer
from common.data import load_protocol, indices_of
from common.evaluation import evaluate
tag, extra = sys.argv[1], sys.argv[2:]
ROW = ("--dataset tinyimagenet --data-dir data --classes 50 --train-per-class 100 --image-size 32 --backbone resnet32 "
       "--class-order-seed 1993 --base-classes 25 --increment 5 --epochs 12 --milestones 4 7 10 --inc-lr 1e-3 "
       "--g-channels 256 128 64 32 --d-width 64 --gan-epochs-first 8 --gan-epochs 14 --seed 0").split()
args = genifer.parse_args(ROW + extra + ["--out-dir", os.path.join(HERE, tag)])
os.makedirs(args.out_dir, exist_ok=True)
device = torch.device("cpu"); torch.manual_seed(0)
data, splits, order = load_protocol(args, device)
mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.mean, data.std))
bounds = ((0 - mean) / std, (1 - mean) / std)
model = genifer.build_model(args, data, device)
gan = None if args.arm in ("finetune", "lwf") else genifer.build_gan(args, data, model, device)
ck = torch.load("results/laptop/genifer/seed0/task0.pt", map_location="cpu", weights_only=True)
model.add_classes(splits[0][1]); model.load_state_dict(ck["model"])
if gan:
    for k in genifer.GAN_PARTS: gan[k].load_state_dict(ck["gan"][k])
first, total = splits[1]
old_model = copy.deepcopy(model).requires_grad_(False)
prev_g = copy.deepcopy(gan["g_ema"]).eval() if gan else None
model.add_classes(total - first)
t0 = time.time()
genifer.train_classifier(model, old_model, prev_g, data, indices_of(data.train_y, first, total), first, bounds, args,
                         device, f"{tag} task 1")
model.eval()
r = evaluate(lambda x: model(x)[:2], data, splits, 1, device, None, 0)
out = {"tag": tag, "extra": extra, "cnn_acc": r["cnn_acc"], "per_task": r["cnn_acc_per_task"], "s": time.time() - t0}
print(json.dumps(out)); open(os.path.join(HERE, "results.jsonl"), "a").write(json.dumps(out) + "\n")
