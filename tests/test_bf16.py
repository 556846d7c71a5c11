"""bf16 autocast on a CPU (issue 18): where it is used (a CPU where bf16 is faster), the training step's loss stays
within a stated tolerance of fp32 on a fixed batch, and BatchNorm's parameters and running statistics stay fp32.
The emulation on other CPUs is slow but exact enough to check the numbers, so the test runs on any CPU."""

import pytest
import torch

import bsce
import common.device


def one_step(monkeypatch, native_bf16: bool, amp: bool):
    monkeypatch.setattr(common.device, "cpu_bf16_is_faster", lambda: native_bf16)
    flags = ["--smoke", "--device", "cpu", "--loss", "ce"] + ([] if amp else ["--no-amp"])
    args = bsce.parse_args(flags)
    torch.manual_seed(0)
    model = bsce.build_model(args, torch.device("cpu"))
    model.classifier.add_classes(10)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    step = bsce.make_step(model, None, optimizer, torch.full((10,), 5), 0, 0.0, args, torch.device("cpu"))
    loss = step(x, y)[0].item()
    return loss, model


def test_cpu_bf16_step_is_close_to_fp32_and_batchnorm_stays_fp32(monkeypatch):
    fp32_loss, fp32_model = one_step(monkeypatch, native_bf16=True, amp=False)
    bf16_loss, bf16_model = one_step(monkeypatch, native_bf16=True, amp=True)
    assert bf16_loss != fp32_loss                              # autocast really ran bf16 on the CPU
    assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2)     # tolerance: 2 % of the loss (bf16 has 8 bits)
    bns = [(n, m) for n, m in bf16_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    reference = dict(fp32_model.named_modules())
    for name, bn in bns:
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            assert t.dtype == torch.float32, name
        assert torch.allclose(bn.running_mean, reference[name].running_mean, atol=2e-2, rtol=2e-2), name


def test_cpu_without_native_bf16_runs_fp32(monkeypatch):
    """An AVX2 CPU emulates bf16 about 10x slower than fp32 (README "Speed"): autocast stays off there, bit for bit."""
    fp32_loss, _ = one_step(monkeypatch, native_bf16=False, amp=False)
    default_loss, _ = one_step(monkeypatch, native_bf16=False, amp=True)
    assert default_loss == fp32_loss


@pytest.mark.parametrize("vendor, avx512_bf16, amx, faster", [
    ("AuthenticAMD", True, False, True),    # AMD EPYC with AVX512-BF16: 1.63x (issue 18)
    ("GenuineIntel", True, False, False),   # Intel Xeon with AVX512-BF16, no AMX: 0.72-0.88x (README "Speed")
    ("GenuineIntel", True, True, True),     # AMX tiles
    ("AuthenticAMD", False, False, False),  # AVX2 only: emulated, 0.1x
])
def test_cpu_default_is_bf16_only_where_measured_faster(monkeypatch, vendor, avx512_bf16, amx, faster):
    monkeypatch.setattr(common.device, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    common.device.cpu_bf16_is_faster.cache_clear()
    try:
        assert common.device.amp_used(torch.device("cpu"), True) == faster
        assert not common.device.amp_used(torch.device("cpu"), False)  # --no-amp
    finally:
        common.device.cpu_bf16_is_faster.cache_clear()
