"""Encoders that map images and token ids into one L2-normalised embedding space.

A tower is a backbone (features at two depths: "pooled" at the top, "mid" lower down)
and one projection head per embedding level. Flat recipes have one level, `global`, on
the pooled features; hierarchical ones (MT-HCN) have `concept` (pooled) and `exterior`
(mid), and their exported `global` is the two fused, so one vector search scores the
weighted sum of both levels.

Each architecture is built from the run's config dict (saved with the checkpoint), so
export and evaluation rebuild exactly what was trained.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

Features = dict[str, torch.Tensor]


class SmallImageCNN(nn.Module):
    """A compact convolutional backbone for tests and from-scratch baselines."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        self.stages = nn.ModuleList()
        channels = 3
        for width in widths:
            self.stages.append(nn.Sequential(
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ))
            channels = width
        self.mid_stage = len(widths) - 2
        self.dims = {"pooled": widths[-1], "mid": widths[self.mid_stage], "fragments": widths[-1]}

    def forward(self, pixel_values: torch.Tensor) -> Features:
        x, mid = pixel_values, None
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index == self.mid_stage:
                mid = x.mean(dim=(2, 3))
        return {"pooled": x.mean(dim=(2, 3)), "mid": mid, "fragments": x.flatten(2).transpose(1, 2)}


class SmallTextCNN(nn.Module):
    """Word embeddings, residual 1-D convolutions, and a mean over the real (non-pad) tokens."""

    def __init__(self, vocab_size: int, width: int = 256, layers: int = 2, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, padding=1) for _ in range(layers))
        self.dims = {"pooled": width, "mid": width, "fragments": width}

    def forward(self, input_ids: torch.Tensor) -> Features:
        mask = (input_ids != self.pad_id).unsqueeze(-1).to(torch.float32)
        count = mask.sum(dim=1).clamp(min=1.0)
        x = self.embed(input_ids)
        mid = None
        for conv in self.convs:
            # Re-mask after each layer so padding never leaks into real positions.
            x = x + F.relu(conv(x.transpose(1, 2))).transpose(1, 2) * mask
            if mid is None:
                mid = (x * mask).sum(dim=1) / count
        return {"pooled": (x * mask).sum(dim=1) / count, "mid": mid, "fragments": x * mask, "fragment_mask": mask}


class Head(nn.Module):
    """Projection into the shared space: linear, or a 2-layer MLP with a linear skip."""

    def __init__(self, in_dim: int, dim: int, layers: int = 1, hidden: int = 1024, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(in_dim, dim)
        self.mlp = (
            nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
            if layers >= 2 else None
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features)
        if self.mlp is not None:
            out = out + self.mlp(features)
        return F.normalize(out, dim=-1)


# Backbone outputs that hold one vector per fragment (image patch, token) rather than one per item.
FRAGMENT_OUTPUTS = ("fragments", "fragment_mask")


def needs_fragments(config: dict[str, Any]) -> bool:
    """Whether a recipe reads the backbones' fragments: a level built on them, or a pair scorer."""
    return "fragments" in config["levels"].values() or bool(config.get("scorer"))


def fragment_mask(features: Features) -> torch.Tensor:
    """``[B, P, 1]``: 1 for real fragments; an image's patches are all real (no mask given)."""
    if "fragment_mask" in features:
        return features["fragment_mask"]
    fragments = features["fragments"]
    return fragments.new_ones(fragments.shape[0], fragments.shape[1], 1)


class Tower(nn.Module):
    """A backbone and one head per embedding level; `project` lets cached features skip the backbone.

    A level on "fragments" (CCL's fine-grained level) projects each patch or token with its head
    and takes the mean over the real ones.
    """

    def __init__(self, backbone: nn.Module, levels: dict[str, str], dim: int, head_layers: int, head_hidden: int,
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.levels = dict(levels)
        self.heads = nn.ModuleDict({
            level: Head(backbone.dims[feature], dim, head_layers, head_hidden, dropout)
            for level, feature in levels.items()
        })

    def project(self, features: Features) -> dict[str, torch.Tensor]:
        out = {}
        for level, feature in self.levels.items():
            if feature == "fragments":
                mask = fragment_mask(features)
                pooled = (self.heads[level](features[feature]) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                out[level] = F.normalize(pooled, dim=-1)
            else:
                out[level] = self.heads[level](features[feature])
        return out

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.project(self.backbone(inputs))


def fuse_levels(embeddings: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """One unit vector whose dot product is the weighted sum of the levels' dot products.

    Concatenating sqrt(w)·e for normalised weights w (summing to 1) keeps the result unit
    length: <fused(a), fused(b)> = Σ w_level <a_level, b_level>.
    """
    total = sum(weights.values())
    return torch.cat([math.sqrt(weights[level] / total) * embeddings[level] for level in sorted(weights)], dim=-1)


def _efficientnet(config: dict[str, Any]) -> nn.Module:
    from xmodal.training.efficientnet import EfficientNetLite0Backbone

    return EfficientNetLite0Backbone(pretrained=config.get("pretrained", True))


def _glove_cnn(config: dict[str, Any]) -> nn.Module:
    from xmodal.training.text_encoders import DualPathTextCNN

    return DualPathTextCNN(config["vocab_size"], embedding_init=config.get("_embedding_init"))


def _small_transformer(config: dict[str, Any]) -> nn.Module:
    from xmodal.training.text_encoders import SmallTransformerText

    return SmallTransformerText(config["vocab_size"], max_length=config["max_length"])


def _minilm(config: dict[str, Any]) -> nn.Module:
    from xmodal.training.bert import MiniLMBackbone

    # Freezing (the recipe's text_freeze) is applied by the trainer; a loaded run needs no weights from the package.
    return MiniLMBackbone(pretrained=config.get("pretrained", True))


IMAGE_BACKBONES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "small_cnn": lambda config: SmallImageCNN(),
    "efficientnet_lite0": _efficientnet,
}
TEXT_BACKBONES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "small_text_cnn": lambda config: SmallTextCNN(config["vocab_size"]),
    "glove_cnn": _glove_cnn,
    "small_transformer": _small_transformer,
    "minilm": _minilm,
}


def _build(registry: dict[str, Callable], kind: str, what: str, config: dict[str, Any]) -> nn.Module:
    if kind not in registry:
        raise ValueError(f"unknown {what} {kind!r}; known: {sorted(registry)}")
    return registry[kind](config)


def embedding_dims(config: dict[str, Any]) -> dict[str, int]:
    """The served outputs and their widths: `global` first, then each level of a hierarchical model."""
    fusion = config.get("fusion") or {}
    if not fusion:
        return {"global": config["dim"]}
    return {"global": config["dim"] * len(fusion), **{level: config["dim"] for level in sorted(fusion)}}


def served_outputs(embeddings: dict[str, torch.Tensor], fusion: dict[str, float]) -> dict[str, torch.Tensor]:
    """Level embeddings → the served outputs (a hierarchical model adds the fused `global`)."""
    if not fusion:
        return {"global": embeddings["global"]}
    return {"global": fuse_levels(embeddings, fusion), **{level: embeddings[level] for level in sorted(fusion)}}


class SharedTopPath(nn.Module):
    """One modality's path through a level's :class:`~xmodal.training.adversarial.SharedTopHeads`, L2-normalised.

    The heads are owned (registered) by the :class:`DualEncoder`, not by this module, so their
    weights are saved once; each tower reaches them through this path, and a tower exported on
    its own still carries the shared layer.
    """

    def __init__(self, heads: nn.Module, modality: str):
        super().__init__()
        object.__setattr__(self, "shared_heads", heads)  # not a submodule: the DualEncoder owns it
        self.encode = heads.encode_image if modality == "image" else heads.encode_text

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encode(features), dim=-1)


class DualEncoder(nn.Module):
    """Two towers into one space; with `heads: shared_top` (CM-GANs) each level's heads share their
    last layer across the modalities; with a `scorer` (CRAN, MCSM) a pair scorer over the
    backbones' fragments re-ranks what the towers retrieve."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = {key: value for key, value in config.items() if not key.startswith("_")}
        levels = config["levels"]
        head = dict(dim=config["dim"], head_layers=config["head_layers"], head_hidden=config["head_hidden"],
                    dropout=config.get("head_dropout", 0.0))
        self.image = Tower(_build(IMAGE_BACKBONES, config["image_encoder"], "image encoder", config), levels, **head)
        self.text = Tower(_build(TEXT_BACKBONES, config["text_encoder"], "text encoder", config), levels, **head)
        self.fusion = dict(config.get("fusion") or {})
        if config.get("heads", "separate") == "shared_top":
            from xmodal.training.adversarial import SharedTopHeads

            self.shared_heads = nn.ModuleDict({
                level: SharedTopHeads(self.image.backbone.dims[feature], self.text.backbone.dims[feature], config["dim"],
                                      hidden=config["head_hidden"], dropout=config.get("head_dropout", 0.0))
                for level, feature in levels.items()
            })
            for level, heads in self.shared_heads.items():
                self.image.heads[level] = SharedTopPath(heads, "image")
                self.text.heads[level] = SharedTopPath(heads, "text")
        self.scorer = None
        if config.get("scorer"):
            from xmodal.training.finegrained import build_scorer

            options = dict(config["scorer"])
            self.scorer = build_scorer(options.pop("kind"), self.image.backbone.dims["fragments"],
                                       self.text.backbone.dims["fragments"], **options)


class ServedTower(nn.Module):
    """A tower as served: input tensor → the card's outputs as a tuple, `global` first."""

    def __init__(self, tower: Tower, config: dict[str, Any]):
        super().__init__()
        self.tower = tower
        # Shared heads (CM-GANs) belong to the DualEncoder; registered here too, so an exported
        # tower traces their weights as its own parameters.
        self.shared_heads = nn.ModuleList(head.shared_heads for head in tower.heads.values() if isinstance(head, SharedTopPath))
        self.fusion = dict(config.get("fusion") or {})
        self.output_names = list(embedding_dims(config))

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = served_outputs(self.tower(inputs), self.fusion)
        return tuple(outputs[name] for name in self.output_names)
