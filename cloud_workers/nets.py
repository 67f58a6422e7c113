"""Reference CNN architectures (torch) for the edge and cloud tiers, registered by key.

Both nets take float32 [N, 1, 28, 28] = uint8 pixels / 255 (0 = background)
and return float32 logits [N, 10]. They are built only from Conv2d, ReLU,
MaxPool2d, Flatten, Linear (and Dropout, which is the identity at inference),
so the exported ONNX graph holds only Conv, Relu, MaxPool, Flatten and Gemm:
no normalisation, BatchNorm or Softmax nodes, as the quantizer requires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

INPUT_SHAPE = (1, 28, 28)  # [C, H, W] of one image
NUM_CLASSES = 10


class EdgeCNN(nn.Module):
    """Small 2 conv + 2 FC net for the edge tier (~80k parameters).

    x: float32 [N, 1, 28, 28] in [0, 1] -> logits float32 [N, 10].
    """

    def __init__(self, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, kernel_size=5),  # 28 -> 24
            nn.ReLU(),
            nn.MaxPool2d(2),  # 24 -> 12
            nn.Conv2d(width, 2 * width, kernel_size=5),  # 12 -> 8
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x):  # noqa: D102 - documented on the class
        return self.classifier(self.features(x))


class CloudCNN(nn.Module):
    """Larger 4 conv + 2 FC net for the cloud tier (~330k parameters).

    x: float32 [N, 1, 28, 28] in [0, 1] -> logits float32 [N, 10].
    """

    def __init__(self, dropout: float = 0.4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3),  # 28 -> 26
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3),  # 26 -> 24
            nn.ReLU(),
            nn.MaxPool2d(2),  # 24 -> 12
            nn.Conv2d(32, 64, kernel_size=3),  # 12 -> 10
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3),  # 10 -> 8
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 256),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(256, NUM_CLASSES),
        )

    def forward(self, x):  # noqa: D102 - documented on the class
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class NetSpec:
    """A registered architecture: constructor and exported ONNX file name."""

    key: str
    factory: type
    onnx_name: str


NETS: dict[str, NetSpec] = {
    "edge": NetSpec("edge", EdgeCNN, "edge_cnn.onnx"),
    "cloud": NetSpec("cloud", CloudCNN, "cloud_cnn.onnx"),
}


def build_net(key: str) -> nn.Module:
    """Construct the registered net `key` ("edge" or "cloud") with fresh weights."""
    if key not in NETS:
        raise ValueError(f"unknown net {key!r}, expected one of {sorted(NETS)}")
    return NETS[key].factory()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters in `model`."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
