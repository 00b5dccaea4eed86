"""Compact torch definitions of insightface's recognizers (arcface_torch's backbones/iresnet.py and
backbones/mobilefacenet.py layouts), random weights, exported the way insightface's ONNX files are.

IResNet: conv3x3-BN-PReLU stem, four stages of IBasicBlock (BN-Conv-BN-PReLU-Conv(stride)-BN + a 1x1-conv-BN
downsample on the first block), then BN2d -> dropout -> flatten -> Linear(C*7*7, D) -> BatchNorm1d. IResNet-50 is
stages (3, 4, 14, 3), IResNet-100 (3, 13, 30, 3); `widths` below 64..512 keeps the depth at a fraction of the size.
MobileFaceNet: conv-BN-PReLU blocks, depthwise bottlenecks with residuals, GDC head (7x7 depthwise conv-BN,
flatten, bias-free Linear, BatchNorm1d).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

IRESNET50_STAGES = (3, 4, 14, 3)
IRESNET100_STAGES = (3, 13, 30, 3)
IRESNET_WIDTHS = (64, 128, 256, 512)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    def __init__(self, stages: tuple[int, ...], widths: tuple[int, ...] = IRESNET_WIDTHS, num_features: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        layers, inplanes = [], widths[0]
        for count, planes in zip(stages, widths):
            blocks = [IBasicBlock(inplanes, planes, 2)] + [IBasicBlock(planes, planes) for _ in range(count - 1)]
            layers.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(widths[-1] * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def conv_block(in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1,
               activation: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(out_c)]
    return nn.Sequential(*layers, nn.PReLU(out_c)) if activation else nn.Sequential(*layers)


class DepthWise(nn.Module):
    def __init__(self, in_c: int, out_c: int, groups: int, stride: int = 2, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            conv_block(in_c, groups),
            conv_block(groups, groups, 3, stride, 1, groups=groups),
            conv_block(groups, out_c, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


def residual(c: int, count: int, groups: int) -> nn.Sequential:
    return nn.Sequential(*(DepthWise(c, c, groups, stride=1, residual=True) for _ in range(count)))


class MobileFaceNet(nn.Module):
    def __init__(self, num_features: int = 512, blocks: tuple[int, ...] = (1, 4, 6, 2), scale: int = 2) -> None:
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.Sequential(
            conv_block(3, c1, 3, 2, 1),
            conv_block(c1, c1, 3, 1, 1, groups=64) if blocks[0] == 1 else residual(c1, blocks[0], 128),
            DepthWise(c1, c1, 128), residual(c1, blocks[1], 128),
            DepthWise(c1, c2, 256), residual(c2, blocks[2], 256),
            DepthWise(c2, c2, 512), residual(c2, blocks[3], 256),
        )
        self.conv_sep = conv_block(c2, 512)
        self.gdc = conv_block(512, 512, 7, groups=512, activation=False)
        self.linear = nn.Linear(512, num_features, bias=False)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gdc(self.conv_sep(self.layers(x)))
        return self.features(self.linear(x.view(x.size(0), -1)))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights, with BatchNorm affine parameters, running statistics and PReLU slopes away from their
    defaults so that BN and PReLU are really exercised (default init leaves BN an identity, PReLU a constant 0.25)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(0.5 * torch.rand(module.weight.shape, generator=g))
    return model.eval()


def export_like_insightface(model: nn.Module, path: Path) -> Path:
    """The export insightface's recognizers come from: static batch 1, input "input.1", opset 17."""
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, opset_version=17,
                      input_names=["input.1"], output_names=["output"])
    return path


# -------------------------------------------------------------------------- inputs and insightface's reference

REAL_PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


def real_crops(assets: Path, face_model: str) -> np.ndarray:
    """Aligned ArcFace crops (B, 112, 112, 3) uint8 RGB of the real photos in `assets/faces`, by the pack's own
    detector and alignment with the insightface pack `face_model` under `assets/insightface`."""
    from idadapter_core.face import align_reference, detect_face, load_face_analyzer, load_image

    analyzer = load_face_analyzer(assets / "insightface", face_model, "CPU", det_size=640)
    crops = []
    for name in REAL_PHOTOS:
        image = load_image(assets / "faces" / name)
        face = detect_face(analyzer, image, 0)
        assert not isinstance(face, str), face
        crops.append(align_reference(image, face, analyzer.arcface_size).arcface_crop)
    return np.stack(crops)


def random_crops(count: int, seed: int = 0, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def as_input(rgb_uint8: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) floats in [0, 1], what a decoded image gives."""
    return torch.from_numpy(rgb_uint8).permute(0, 3, 1, 2).float() / 255.0


def get_feat_rgb(recognizer, rgb_uint8: np.ndarray) -> np.ndarray:
    """insightface's embeddings, one crop at a time as its pipeline runs them (get_feat takes BGR)."""
    return np.concatenate([recognizer.get_feat(np.ascontiguousarray(crop[..., ::-1])) for crop in rgb_uint8])
