"""torch.compile on a CPU: ResNet-32 training step (SGD, CE), batch 128, 32 px, fp32, channels_last, one thread.
Eager and compiled blocks alternate so both see the same machine load; img/s = median over blocks."""
import sys, time, statistics, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, ".")  # run from the repository root
from common.models import create_backbone
torch.set_num_threads(1)
torch.manual_seed(0)

def make():
    net = nn.Sequential(create_backbone("resnet32"), nn.Linear(64, 100)).to(memory_format=torch.channels_last)
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 100, (128,))
eager, opt_e = make()
comp_net, opt_c = make()
comp = torch.compile(comp_net)

def step(net, opt):
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

t = time.time(); step(comp, opt_c); step(comp, opt_c); print(f"compile + 2 steps: {time.time() - t:.0f} s", flush=True)
step(eager, opt_e)
rates = {"eager": [], "compiled": []}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    for name, net, opt in (("eager", eager, opt_e), ("compiled", comp, opt_c)):
        t = time.time()
        for _ in range(4):
            step(net, opt)
        rates[name].append(4 * 128 / (time.time() - t))
e, c = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
print(f"eager {e:.1f} img/s, compiled {c:.1f} img/s, ratio {c / e:.2f}; blocks {rates}", flush=True)
