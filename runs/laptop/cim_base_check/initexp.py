"""Issue 20 check: what slows cim.py's base phase? 25 classes x 100 laptop images, 32 px, 3 epochs cosine lr 0.1,
batch 128, wd 5e-4 (cim.run_stage, the step the base phase runs). Arms: backbone x fc init x bias."""
import math, re, sys, io, contextlib, json, time
import torch, torch.nn as nn
sys.path.insert(0, ".")  # run from the repository root
import cim
from common.data import load_protocol, indices_of
from common.models import to_channels_last

backbone, init, bias = sys.argv[1], sys.argv[2], sys.argv[3] == "bias"
flags = ["--dataset", "tinyimagenet", "--data-dir", "data", "--classes", "100", "--train-per-class", "100",
         "--image-size", "32", "--backbone", backbone, "--class-order-seed", "1993", "--base-classes", "25",
         "--increment", "25", "--memory-total", "2000", "--batch-size", "128", "--epochs", "3", "--no-cim",
         "--device", "cpu", "--workers", "0"]
args = cim.parse_args(flags)
device = torch.device("cpu")
data, splits, order = load_protocol(args, device)
idx = indices_of(data.train_y, 0, 25)
torch.manual_seed(0)
model = cim.build_model(args, 25)
if bias:  # PyCIL SimpleLinear: same init, zero bias
    fc = nn.Linear(64, 25); fc.weight.data.copy_(model.fc.weight); nn.init.zeros_(fc.bias); model.fc = fc
if init == "default":  # nn.Linear's default (bsce.py, LUCIR, FACIL)
    nn.init.kaiming_uniform_(model.fc.weight, a=math.sqrt(5))
model = to_channels_last(model, device)
n = len(idx)
ctx = {"prob": 0.0, "new_idx": idx, "new_mask": torch.ones(n, dtype=torch.bool),
       "box_table": torch.tensor(cim.FULL).repeat(n, 1)}
t = time.time()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    cim.run_stage(model, model, data, idx, ctx, args, device, epochs=3, label="phase 0", weight_decay=args.weight_decay,
                  params=[p for nm, p in model.named_parameters() if p.requires_grad and "ratl" not in nm])
accs = re.findall(r"train-acc (\S+)", buf.getvalue())
model.eval()
test = indices_of(data.test_y, 0, 25)
from common.batches import eval_batches
with torch.no_grad():
    hits = [(model(x)[0].argmax(1) == y).sum().item() for x, y in eval_batches(data, test, device)]
test_acc = round(100 * sum(hits) / len(test), 2)
print(json.dumps(dict(backbone=backbone, init=init, bias=bias, train_acc=accs, test_acc=test_acc,
                      wall=round(time.time() - t))), flush=True)
