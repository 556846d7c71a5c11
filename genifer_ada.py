"""ADA (Karras et al. 2020, "Training generative adversarial networks with limited data"; NVlabs/stylegan2-ada-pytorch
training/augment.py) in torch, for genifer.py's discriminator: every 'bgc' op with ADA's strengths and order, applied
per sample with probability p (a device buffer: no host sync, one static graph), differentiable in the images."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ADA_OPS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac",
           "brightness", "contrast", "lumaflip", "hue", "saturation")  # official: every StyleGAN2-ADA 'bgc' op


def _gate(value, identity, p):
    """Per sample: `value` with probability p, else the identity value (no host sync)."""
    keep = torch.rand(value.shape[0], device=value.device) < p
    return torch.where(keep.view(-1, *[1] * (value.dim() - 1)), value, identity)


def _affine(n, device, sx=1.0, sy=1.0, tx=0.0, ty=0.0, angle=0.0):
    """Batched 3x3 matrices: rotation by `angle` after scaling by (sx, sy), then translation (tx, ty)."""
    sx, sy, tx, ty, angle = (v if torch.is_tensor(v) else torch.zeros(n, device=device) + v
                             for v in (sx, sy, tx, ty, angle))  # scalars by kernels: capturable
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return torch.stack([sx * cos, -sy * sin, tx, sx * sin, sy * cos, ty, zero, zero, zero + 1], 1).view(n, 3, 3)


def geometric_matrix(n, p, ops, size, device):
    """ADA's inverse geometric transform (output -> input coordinates in [-1, 1]), composed in ADA's order with
    its strengths: flip, k*90 deg, integer shift <= 0.125 W, scale 2^N(0, 0.2), rotation U(-pi, pi) with
    p_rot = 1 - sqrt(1 - p) twice around anisotropy 2^N(0, 0.2), fractional shift N(0, 0.125 W)."""
    def rand(*shape): return torch.rand(n, *shape, device=device)
    def randn(*shape): return torch.randn(n, *shape, device=device)
    def shift(t): return _affine(n, device, tx=-2 * t[:, 0], ty=-2 * t[:, 1])  # shifts in widths -> [-1, 1]

    def stretch(aniso):  # 2^N(0, 0.2): isotropic scale, or anisotropy
        s = _gate(2 ** (randn() * 0.2), 1.0, p)
        return _affine(n, device, sx=1 / s, sy=s if aniso else 1 / s)
    mat, p_rot = torch.eye(3, device=device).repeat(n, 1, 1), 1 - (1 - torch.as_tensor(p, device=device)).sqrt()
    make = {"xflip": lambda: _affine(n, device, sx=1 - 2 * _gate((rand() < 0.5).float(), 0.0, p)),
            "rotate90": lambda: _affine(n, device, angle=-math.pi / 2 * _gate((rand() * 4).floor(), 0.0, p)),
            "xint": lambda: shift(torch.round(_gate((rand(2) * 2 - 1) * 0.125, 0.0, p) * size) / size),
            "scale": lambda: stretch(False), "aniso": lambda: stretch(True),
            "rotate": lambda: _affine(n, device, angle=-_gate((rand() * 2 - 1) * math.pi, 0.0, p_rot)),
            "xfrac": lambda: shift(_gate(randn(2) * 0.125, 0.0, p))}
    for op in ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "rotate", "xfrac"):  # ADA's order
        if op in ops:
            mat = mat @ make[op]()
    return mat


def warp(x, mat):
    """Sample x at mat @ (output coordinates): bilinear, reflection at the border (ours; ADA pads by reflection)."""
    grid = F.affine_grid(mat[:, :2, :].to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour_matrix(n, p, ops, device):
    """ADA's colour transform (4x4, homogeneous RGB), in ADA's order: brightness + N(0, 0.2), contrast
    x 2^N(0, 0.5), luma flip, hue rotation U(-pi, pi) about the luma axis, saturation 2^N(0, 1) off the axis."""
    eye, a = torch.eye(4, device=device), 3 ** -0.5
    v = torch.full((4,), a, device=device)
    v[3] = 0  # the luma axis (fills only: no host-to-device copy inside a captured graph)
    vv, mat = torch.outer(v, v), eye.repeat(n, 1, 1)
    if "brightness" in ops:  # the first op: a translation of the identity
        mat[:, :3, 3] = _gate(torch.randn(n, device=device) * 0.2, 0.0, p)[:, None]
    if "contrast" in ops:
        c = _gate(2 ** (torch.randn(n, device=device) * 0.5), 1.0, p)
        mat = torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], 1)) @ mat
    if "lumaflip" in ops:
        i = _gate(torch.randint(0, 2, (n,), device=device).float(), 0.0, p)
        mat = (eye - 2 * vv * i[:, None, None]) @ mat
    if "hue" in ops:  # Rodrigues: cos t I + sin t [v]x + (1 - cos t) v v^T on the RGB block
        t = _gate((torch.rand(n, device=device) * 2 - 1) * math.pi, 0.0, p)[:, None, None]
        cross = torch.zeros(4, 4, device=device)
        cross[0, 2] = cross[1, 0] = cross[2, 1] = a
        cross[0, 1] = cross[1, 2] = cross[2, 0] = -a
        rot = t.cos() * eye + t.sin() * cross + (1 - t.cos()) * vv
        rot[:, 3, 3] = 1
        mat = rot @ mat
    if "saturation" in ops:
        s = _gate(2 ** torch.randn(n, device=device), 1.0, p)
        mat = (vv + (eye - vv) * s[:, None, None]) @ mat
    return mat


class AdaptiveAugment(nn.Module):
    """ADA (Karras et al. 2020) in torch: every op applied per sample with probability p (a device buffer, so no
    host sync and one static graph); differentiable in the images. p follows E[sign D(real)] toward the target."""
    def __init__(self, ops=ADA_OPS):
        super().__init__()
        self.ops = tuple(ops)
        self.register_buffer("p", torch.zeros(()))

    def forward(self, x):
        if any(op in self.ops for op in ADA_OPS[:7]):
            x = warp(x, geometric_matrix(len(x), self.p, self.ops, x.shape[-1], x.device))
        if any(op in self.ops for op in ADA_OPS[7:]):
            c = colour_matrix(len(x), self.p, self.ops, x.device).to(x.dtype)
            x = torch.einsum("nij,njhw->nihw", c[:, :3, :3], x) + c[:, :3, 3, None, None]
        return x

    @torch.no_grad()
    def adjust(self, mean_sign, target, interval, ksteps, p_max):
        """Official update_ada: p += sign(r_t - target) * interval / (ksteps * 1000), clipped to [0, p_max]."""
        self.p.copy_((self.p + torch.sign(mean_sign - target) * interval / (ksteps * 1000)).clamp(0, p_max))
