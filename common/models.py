"""Backbones: the CIFAR ResNet-32 registered with timm, every other one through timm. A backbone maps images to
features of size `backbone.num_features` (no classifier: heads belong to the methods)."""
import timm
import torch
import torch.nn as nn
from timm.models import register_model

from common.errors import UserError


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, last_relu=True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu, self.last_relu = nn.ReLU(inplace=True), last_relu
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)) \
            if stride != 1 or in_planes != planes else None  # 1x1 conv shortcut, as LUCIR's modified_resnet_cifar.py

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out) if self.last_relu else out


class CifarResNet(nn.Module):
    """ResNet-6n+2 for 32x32 inputs (He et al. 2016, Sec. 4.2): 16/32/64 channels, n blocks a stage."""

    def __init__(self, depth=32, num_classes=0, last_relu=True, **_):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = [nn.Sequential(*(BasicBlock(planes if b else in_planes, planes, 2 if b == 0 and i > 0 else 1,
                                             last_relu=last_relu or (i, b) != (2, n - 1)) for b in range(n)))
                  for i, (in_planes, planes) in enumerate(((16, 16), (16, 32), (32, 64)))]
        self.layer1, self.layer2, self.layer3 = stages
        self.pool, self.num_features = nn.AdaptiveAvgPool2d(1), 64
        self.fc = nn.Linear(64, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        """The last feature maps (N, 64, H/4, W/4), before pooling (as timm models' forward_features)."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x):
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


@register_model
def resnet32(pretrained=False, **kwargs):
    """CIFAR ResNet-32 (0.46M parameters with a 100-way head); `last_relu=False` as in LUCIR."""
    return CifarResNet(32, **kwargs)


def create_backbone(name: str, last_relu: bool = True, small_input: bool = False) -> nn.Module:
    """A feature extractor (`num_classes=0`). `small_input` swaps a ResNet's 7x7/2 stem and max-pool for a 3x3/1
    conv, the usual change for 32 and 64 px inputs; `last_relu=False` drops the ReLU after the last block."""
    if name == "resnet32":
        return timm.create_model("resnet32", num_classes=0, last_relu=last_relu)
    try:  # zero_init_last=False: every BN starts at gamma 1 as in torchvision/LUCIR/FACIL (timm zeroes the last)
        model = timm.create_model(name, pretrained=False, num_classes=0, zero_init_last=False)
    except TypeError:  # a timm model without that argument
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError:
        raise UserError(f"unknown --backbone {name!r}: resnet32 or a timm model name such as resnet18") from None
    if small_input and hasattr(model, "conv1") and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    if not last_relu:
        blocks = [m for m in model.modules() if hasattr(m, "act2") or hasattr(m, "act3")]
        if not blocks:
            raise UserError(f"--backbone {name}: cannot remove the last ReLU of this model")
        block = blocks[-1]
        setattr(block, "act3" if hasattr(block, "act3") else "act2", nn.Identity())
    return model


def stage_features(backbone: nn.Module, x: torch.Tensor, layer: str = "layer3", stop: bool = False):
    """(feature map after `layer`, pooled features of the last stage) of a timm ResNet or the CIFAR ResNet above,
    run stage by stage (e.g. Genifer's discriminator judges the layer3 maps); `stop`: (map, None), no later stage."""
    b, fmap = backbone, None
    x = getattr(b, "maxpool", nn.Identity())(getattr(b, "act1", getattr(b, "relu", None))(b.bn1(b.conv1(x))))
    for name in [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(b, n)]:
        x = getattr(b, name)(x)
        fmap = x if name == layer else fmap
        if stop and name == layer:
            return x, None
    return fmap, x.mean((2, 3))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def to_channels_last(model: nn.Module, device: torch.device) -> nn.Module:
    return model.to(device=device, memory_format=torch.channels_last)
