"""The CMU OpenPose body network (COCO-18): VGG front end + two-branch, six-stage CPM.

Parameter names follow the PyTorch port's `body_pose_model.pth` (pytorch-openpose): flat keys such as
`conv1_1.weight`, `conv5_5_CPM_L1.weight`, `Mconv7_stage6_L2.weight`, so the published file loads
with no renaming. Branch L1 predicts the 38 part-affinity-field channels (19 limbs x (x, y)),
branch L2 the 19 part heatmaps (18 keypoints + background). Cao et al., CVPR 2017.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_HEATMAPS = 19  # 18 COCO keypoints + background
NUM_PAFS = 38  # 19 limbs x (x, y)
NUM_STAGES = 6

# Front end: (name, in, out); a 2x2 max-pool follows the names in _POOL_AFTER. All 3x3, padding 1.
FRONT_END: tuple[tuple[str, int, int], ...] = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3_CPM", 512, 256), ("conv4_4_CPM", 256, 128),
)  # fmt: skip
_POOL_AFTER = {"conv1_2", "conv2_2", "conv3_4"}
FEATURE_CHANNELS = 128  # output of conv4_4_CPM, fed to every stage


def stage_layers(stage: int, branch: int) -> tuple[tuple[str, int, int, int], ...]:
    """(name, in, out, kernel) of stage `stage` (1..6) of branch `branch` (1 = PAF, 2 = heatmap).

    Stage 1 reads the 128 features with three 3x3 convs; stages 2-6 read features + both previous
    predictions (128 + 38 + 19 = 185 channels) with five 7x7 convs. Each ends in two 1x1 convs.
    """
    out = NUM_PAFS if branch == 1 else NUM_HEATMAPS
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        specs = [(FEATURE_CHANNELS, 128, 3), (128, 128, 3), (128, 128, 3), (128, 512, 1), (512, out, 1)]
    else:
        names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
        first = FEATURE_CHANNELS + NUM_PAFS + NUM_HEATMAPS
        specs = [(first, 128, 7)] + [(128, 128, 7)] * 4 + [(128, 128, 1), (128, out, 1)]
    return tuple((name, cin, cout, k) for name, (cin, cout, k) in zip(names, specs, strict=True))


class BodyPoseNet(nn.Module):
    """OpenPose body network: image (B, 3, H, W) preprocessed as BGR/256 - 0.5 -> (pafs, heatmaps).

    Outputs are at stride 8: pafs (B, 38, H/8, W/8), heatmaps (B, 19, H/8, W/8), from stage 6.
    Every conv is followed by ReLU except the last 1x1 conv of each stage (the predictions).
    """

    def __init__(self) -> None:
        super().__init__()
        for name, cin, cout in FRONT_END:
            self.add_module(name, nn.Conv2d(cin, cout, 3, padding=1))
        for stage in range(1, NUM_STAGES + 1):
            for branch in (1, 2):
                for name, cin, cout, k in stage_layers(stage, branch):
                    self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for name, _, _ in FRONT_END:
            x = torch.relu(getattr(self, name)(x))
            if name in _POOL_AFTER:
                x = nn.functional.max_pool2d(x, 2, 2)
        return x

    def branch(self, stage: int, branch: int, x: torch.Tensor) -> torch.Tensor:
        layers = stage_layers(stage, branch)
        for index, (name, _, _, _) in enumerate(layers):
            x = getattr(self, name)(x)
            if index < len(layers) - 1:
                x = torch.relu(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        stage_input = features
        for stage in range(1, NUM_STAGES + 1):
            pafs, heatmaps = self.branch(stage, 1, stage_input), self.branch(stage, 2, stage_input)
            stage_input = torch.cat([pafs, heatmaps, features], dim=1)  # the port's concat order
        return pafs, heatmaps
