"""Encoders that map images and token ids into one L2-normalised embedding space.

Each architecture is built from a small config dict (saved with the checkpoint), so export
and evaluation rebuild exactly what was trained.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SmallImageCNN(nn.Module):
    """A compact convolutional tower for tests and the skeleton: stride-2 conv blocks, global average pool."""

    def __init__(self, dim: int, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.features(pixel_values).mean(dim=(2, 3))
        return F.normalize(self.head(pooled), dim=-1)


class SmallTextCNN(nn.Module):
    """Word embeddings, residual 1-D convolutions, and a mean over the real (non-pad) tokens."""

    def __init__(self, vocab_size: int, dim: int, width: int = 256, layers: int = 2, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, padding=1) for _ in range(layers))
        self.head = nn.Linear(width, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).unsqueeze(-1).to(torch.float32)
        x = self.embed(input_ids)
        for conv in self.convs:
            # Re-mask after each layer so padding never leaks into real positions.
            x = x + F.relu(conv(x.transpose(1, 2))).transpose(1, 2) * mask
        pooled = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.head(pooled), dim=-1)


IMAGE_ENCODERS = {"small_cnn": SmallImageCNN}
TEXT_ENCODERS = {"small_text_cnn": SmallTextCNN}


def build_image_encoder(config: dict[str, Any]) -> nn.Module:
    kind = config["image_encoder"]
    if kind not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image encoder {kind!r}; known: {sorted(IMAGE_ENCODERS)}")
    return IMAGE_ENCODERS[kind](dim=config["dim"])


def build_text_encoder(config: dict[str, Any]) -> nn.Module:
    kind = config["text_encoder"]
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {kind!r}; known: {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[kind](vocab_size=config["vocab_size"], dim=config["dim"])


class DualEncoder(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.image = build_image_encoder(config)
        self.text = build_text_encoder(config)
