"""Recipes: each a small config naming encoders, loss, preprocessing and schedule.

A run's config is the recipe with any overrides applied; it is saved beside the weights
and is all that export needs to rebuild the model.
"""
from __future__ import annotations

import copy
from typing import Any

# ImageNet statistics: kept even for from-scratch towers so pretrained towers can slot in.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

RECIPES: dict[str, dict[str, Any]] = {
    "infonce": {
        "recipe": "infonce",
        "loss": "infonce",
        "image_encoder": "small_cnn",
        "text_encoder": "small_text_cnn",
        "dim": 256,
        "image_size": 64,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "image_background": [255, 255, 255],
        "max_length": 32,
        "batch_size": 128,
        "lr": 2e-3,
        "weight_decay": 1e-4,
        "epochs": 40,
        "minutes": 4.0,
        "augment": True,
        "seed": 0,
    },
}


def recipe_config(name: str, **overrides: Any) -> dict[str, Any]:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    config = copy.deepcopy(RECIPES[name])
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"recipe {name!r} has no setting(s) {sorted(unknown)}")
    config.update({key: value for key, value in overrides.items() if value is not None})
    return config
