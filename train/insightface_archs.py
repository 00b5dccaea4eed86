"""Compact torch definitions of insightface's detector and recognizers, random weights, exported the way insightface's
ONNX files are: what the tests and the benchmarks check the ONNX->torch converter and the face stages on, at the
published layouts (no real weights can be had offline).

IResNet (arcface_torch's backbones/iresnet.py): conv3x3-BN-PReLU stem, four stages of IBasicBlock
(BN-Conv-BN-PReLU-Conv(stride)-BN + a 1x1-conv-BN downsample on the first block), then BN2d -> dropout -> flatten ->
Linear(C*7*7, D) -> BatchNorm1d. IResNet-50 is stages (3, 4, 14, 3), IResNet-100 (3, 13, 30, 3) (glintr100,
antelopev2's); `widths` below 64..512 keeps the depth at a fraction of the size.
MobileFaceNet (backbones/mobilefacenet.py): conv-BN-PReLU blocks, depthwise bottlenecks with residuals, GDC head
(7x7 depthwise conv-BN, flatten, bias-free Linear, BatchNorm1d).
SCRFD-10G with keypoints (scrfd_10g_bnkps): ResNetV1e BasicBlock stages (3, 4, 2, 3) x [56, 88, 88, 224], deep stem,
PAFPN to 56 channels on strides 8/16/32, per-stride heads of 3 stacked 3x3 convs of 80 channels, 2 anchors, in
insightface's 9-output layout.
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


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        # ResNetV1e "avg_down" shortcut: average-pool, then 1x1 conv
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SCRFD10G(nn.Module):
    """insightface's scrfd_10g_bnkps: outputs scores x3, box distances x3, keypoints x3 (strides 8, 16, 32)."""

    strides = (8, 16, 32)

    def __init__(self, blocks=(3, 4, 2, 3), planes=(56, 88, 88, 224), base=56, neck=56, feat=80, anchors=2) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(3, base // 2, 2), conv_bn_relu(base // 2, base // 2),
                                  conv_bn_relu(base // 2, base), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], base
        for index, (count, cout) in enumerate(zip(blocks, planes)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(count))))
            cin = cout
        self.stages = nn.ModuleList(stages)
        levels = planes[1:]  # PAFPN start_level=1: strides 8, 16, 32
        self.lateral = nn.ModuleList(nn.Conv2d(c, neck, 1) for c in levels)
        self.fpn = nn.ModuleList(nn.Conv2d(neck, neck, 3, 1, 1) for _ in levels)
        self.downsample = nn.ModuleList(nn.Conv2d(neck, neck, 3, 2, 1) for _ in levels[1:])
        self.pafpn = nn.ModuleList(nn.Conv2d(neck, neck, 3, 1, 1) for _ in levels[1:])
        self.towers = nn.ModuleList(
            nn.Sequential(conv_bn_relu(neck, feat), conv_bn_relu(feat, feat), conv_bn_relu(feat, feat)) for _ in self.strides
        )
        self.cls = nn.ModuleList(nn.Conv2d(feat, anchors, 3, 1, 1) for _ in self.strides)
        self.reg = nn.ModuleList(nn.Conv2d(feat, anchors * 4, 3, 1, 1) for _ in self.strides)
        self.kps = nn.ModuleList(nn.Conv2d(feat, anchors * 10, 3, 1, 1) for _ in self.strides)
        for cls in self.cls:
            nn.init.constant_(cls.bias, -20.0)  # random weights: keep every anchor below the threshold

    def forward(self, image: torch.Tensor):
        x = self.stem(image)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        laterals = [conv(f) for conv, f in zip(self.lateral, features[1:])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + nn.functional.interpolate(laterals[i], size=laterals[i - 1].shape[2:])
        outs = [conv(f) for conv, f in zip(self.fpn, laterals)]
        for i in range(len(outs) - 1):
            outs[i + 1] = outs[i + 1] + self.downsample[i](outs[i])
        outs = [outs[0]] + [conv(f) for conv, f in zip(self.pafpn, outs[1:])]
        scores, boxes, keypoints = [], [], []
        for level, feature in enumerate(outs):
            tower = self.towers[level](feature)
            flat = lambda t, width: t.permute(0, 2, 3, 1).reshape(-1, width)
            scores.append(torch.sigmoid(flat(self.cls[level](tower), 1)))
            boxes.append(flat(self.reg[level](tower), 4))
            keypoints.append(flat(self.kps[level](tower), 10))
        return (*scores, *boxes, *keypoints)


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


def export_scrfd_like_insightface(model: SCRFD10G, path: Path) -> Path:
    """The export of insightface's SCRFD files: input "input" of any height and width, opset 17, the nine outputs
    score / bbox / kps per stride with as many rows as the image has anchors."""
    outputs = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in model.strides]
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, 640, 640),), str(path), input_names=["input"],
                      output_names=outputs, opset_version=17, dynamo=False,
                      dynamic_axes={"input": {2: "height", 3: "width"}, **{n: {0: f"{n}_rows"} for n in outputs}})
    return path


# -------------------------------------------------------------------------- inputs and insightface's reference

REAL_PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


def real_crops(assets: Path, face_model: str) -> np.ndarray:
    """Aligned ArcFace crops (B, 112, 112, 3) uint8 RGB of the real photos in `assets/faces`, by the pack's own
    detector and alignment with the insightface pack `face_model` under `assets/insightface`."""
    from idadapter_core.face import arcface_crop, load_face_analyzer, load_image

    analyzer = load_face_analyzer(assets / "insightface", face_model, "CPU", det_size=640)
    crops = []
    for name in REAL_PHOTOS:
        crop = arcface_crop(analyzer, load_image(assets / "faces" / name))
        assert not isinstance(crop, str), f"{name}: {crop}"
        crops.append(crop)
    return np.stack(crops)


def random_crops(count: int, seed: int = 0, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def as_input(rgb_uint8: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) floats in [0, 1], what a decoded image gives."""
    return torch.from_numpy(rgb_uint8).permute(0, 3, 1, 2).float() / 255.0


def get_feat_rgb(recognizer, rgb_uint8: np.ndarray) -> np.ndarray:
    """insightface's embeddings, one crop at a time as its pipeline runs them (get_feat takes BGR)."""
    return np.concatenate([recognizer.get_feat(np.ascontiguousarray(crop[..., ::-1])) for crop in rgb_uint8])
