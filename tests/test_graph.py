"""common/graph.py and the benchmark: captured == eager on CUDA, eager fallback on CPU, bench table on CPU."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.bench import main as bench_main
from common.graph import CapturedStep


def make_training(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return model, optimizer, step


def run(device, graph, steps=8):
    model, optimizer, step = make_training(device)
    runner = CapturedStep(step, device, enabled=graph, optimizer=optimizer, warmup=2)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [5], 0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g).to(device)
        y = torch.randint(0, 5, (4,), generator=g).to(device)
        losses.append(runner(x, y).clone())
        scheduler.step()  # lr changes after step 5: the graph must be re-captured
    return torch.stack(losses).cpu(), [p.detach().cpu() for p in model.parameters()], runner


def test_cpu_falls_back_to_eager():
    losses, params, runner = run(torch.device("cpu"), graph=True)
    assert not runner.enabled and runner.graph is None
    eager_losses, eager_params, _ = run(torch.device("cpu"), graph=False)
    assert torch.equal(losses, eager_losses)
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; none is visible")
def test_captured_equals_eager_on_cuda():
    device = torch.device("cuda")
    losses, params, runner = run(device, graph=True)
    assert runner.graph is not None
    eager_losses, eager_params, _ = run(device, graph=False)
    assert torch.allclose(losses, eager_losses, rtol=1e-4, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(params, eager_params))


def test_bench_runs_on_cpu_and_prints_its_table(capsys):
    rows = bench_main(["--scripts", "lucir", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "eager img/s" in out and "lucir" in out
    assert rows[0][0] == "lucir" and rows[0][1] == 8 and rows[0][2] > 0 and rows[0][3] > 0
    assert bench_main(["--scripts", "lucir", "--steps", "1", "--warmup", "0", "--batch-size", "8", "--device",
                       "cpu"])[0][2] > 0  # no warm-up step: timed all the same
    with pytest.raises(SystemExit) as stop:  # argparse's one-line error, exit 2
        bench_main(["--steps", "0", "--device", "cpu"])
    assert stop.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err


def test_failed_capture_falls_back_to_eager_once(monkeypatch, capsys):
    """A capture that raises (an op that cannot be captured, an old driver) prints one line, runs that step and
    every later one eagerly, in every CapturedStep of the process, and graph_used() reports False."""
    import common.graph as graph
    monkeypatch.setattr(graph, "_capture_failed", [])
    device = torch.device("cpu")
    model, optimizer, step = make_training(device)
    runner = CapturedStep(step, device, optimizer=optimizer, warmup=0)
    runner.enabled = True  # pretend to be on CUDA, with a capture that fails

    def failing_capture(inputs):
        raise RuntimeError("operation not permitted when stream is capturing\ndetails")
    monkeypatch.setattr(runner, "_capture", failing_capture)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    loss = runner(x, y)
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "capture failed" in out and "eagerly" in out
    assert not runner.enabled and runner(x, y) is not None and capsys.readouterr().out == ""
    assert graph.graph_used(True, torch.device("cuda")) is False
    other = CapturedStep(step, torch.device("cuda"), enabled=True)
    assert not other.enabled
