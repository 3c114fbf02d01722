"""LeRobot's image observation encoder for diffusion policies (DiffusionRgbEncoder): a center crop, a ResNet
backbone without its pooling and classifier (torchvision's resnet18 children up to layer4; BatchNorm replaced by
GroupNorm of num_features // 16 groups when `use_group_norm`), spatial soft-argmax keypoints (Finn et al. 2016,
as robomimic ports it) and a Linear + ReLU: an image [B, 3, H, W] in [0, 1] (normalized as the policy's stats
say) -> a feature vector of 2 x num_keypoints per image.

torchvision does not import beside this project's CPU torch (its PyPI build is a CUDA one), so the backbone is
written here with torchvision's module names, so LeRobot's weights load by name; tests/policies prove it equal
to LeRobot's own encoder (run in .venv-lerobot)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}  # BasicBlock counts per stage


def _norm(channels: int, group_norm: bool) -> nn.Module:
    return nn.GroupNorm(channels // 16, channels) if group_norm else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs with a projection shortcut where the shape changes."""

    def __init__(self, inp: int, out: int, stride: int, group_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = _norm(out, group_norm)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = _norm(out, group_norm)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), _norm(out, group_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + shortcut)


def backbone(name: str, group_norm: bool) -> nn.Sequential:
    """torchvision's resnet children without avgpool and fc: conv1, bn1, relu, maxpool, layer1..layer4."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), _norm(64, group_norm), nn.ReLU()]
    layers.append(nn.MaxPool2d(3, 2, 1))
    inp = 64
    for stage, count in enumerate(BACKBONES[name]):
        out = 64 * 2**stage
        stride = 2 if stage else 1  # the first block of every stage after the first halves the size
        blocks = [BasicBlock(inp, out, stride, group_norm)]
        blocks += [BasicBlock(out, out, 1, group_norm) for _ in range(count - 1)]
        layers.append(nn.Sequential(*blocks))
        inp = out
    return nn.Sequential(*layers)


class SpatialSoftmax(nn.Module):
    """Keypoints: a 1x1 conv to `keypoints` maps, a softmax over each map's positions, and the expected (x, y)
    of each on a [-1, 1] grid (LeRobot's port of robomimic's, with its numpy-built grid)."""

    def __init__(self, channels: int, height: int, width: int, keypoints: int) -> None:
        super().__init__()
        self.nets = nn.Conv2d(channels, keypoints, 1)
        self.keypoints, self.positions = keypoints, height * width
        xs: np.ndarray
        ys: np.ndarray
        xs, ys = np.meshgrid(np.linspace(-1.0, 1.0, width), np.linspace(-1.0, 1.0, height))
        grid = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)
        self.register_buffer("pos_grid", torch.from_numpy(grid).float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        attention = F.softmax(self.nets(features).reshape(-1, self.positions), dim=-1)
        return (attention @ self.pos_grid).view(-1, self.keypoints, 2)


class RgbEncoder(nn.Module):
    """[B, 3, H, W] -> [B, 2 * keypoints]: center crop (evaluation's), backbone, keypoints, Linear + ReLU."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        crop_shape: tuple[int, int] | None = (84, 84),
        vision_backbone: str = "resnet18",
        use_group_norm: bool = True,
        keypoints: int = 32,
    ) -> None:
        super().__init__()
        self.crop_shape = None if crop_shape is None else tuple(crop_shape)
        self.backbone = backbone(vision_backbone, use_group_norm)
        height, width = self.crop_shape or image_shape[1:]
        with torch.no_grad():
            channels, h, w = self.backbone(torch.zeros(1, image_shape[0], height, width)).shape[1:]
        self.pool = SpatialSoftmax(channels, h, w, keypoints)
        self.out = nn.Linear(2 * keypoints, 2 * keypoints)
        self.relu = nn.ReLU()

    def center_crop(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's CenterCrop for an image at least the crop's size: offsets round((size - crop) / 2)."""
        if self.crop_shape is None:
            return x
        (height, width), (ch, cw) = x.shape[-2:], self.crop_shape
        top, left = round((height - ch) / 2.0), round((width - cw) / 2.0)
        return x[..., top : top + ch, left : left + cw]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keypoints = self.pool(self.backbone(self.center_crop(x)))
        return self.relu(self.out(keypoints.flatten(1)))
