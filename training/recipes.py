"""Recipes: each a small config naming encoders, embedding levels, losses and schedule.

A run's config is a recipe with any overrides applied; it is saved beside the weights and
is all that export needs to rebuild the model. Loss terms name the level they apply to;
`stages` switch the set of terms part-way through a run (the dual-path method's stage I
and II), each stage taking a fraction of the run's epochs.
"""
from __future__ import annotations

import copy
from typing import Any

# ImageNet statistics: the pretrained towers were trained with them.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

BASE: dict[str, Any] = {
    "image_encoder": "efficientnet_lite0",
    "text_encoder": "glove_cnn",
    "levels": {"global": "pooled"},
    "fusion": {},
    "dim": 256,
    "head_layers": 2,
    "head_hidden": 1024,
    "head_dropout": 0.1,
    # "separate": each tower its own heads; "shared_top" (CM-GANs): each level's image and text
    # heads share their last layer.
    "heads": "separate",
    # A pair scorer over the backbones' fragments, trained beside the towers and served as the
    # second stage: {"kind": "cran" | "mcsm", ...its options}.
    "scorer": None,
    "image_size": 128,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
    "image_background": [255, 255, 255],
    "max_length": 32,
    # A frozen image backbone's features are computed once and cached (LiT-style); its
    # heads still train. Augmentation needs the backbone in the loop, so it is off then.
    "freeze_image": True,
    "augment": False,
    # The text backbone: "all" freezes it (only the heads train, LiT-style), "topK" trains its
    # top K layers (MiniLM), "none" trains all of it; "auto" is "all" for a pretrained backbone
    # (minilm) and "none" for one trained from scratch. A frozen one's features are computed
    # once per distinct caption (in memory) when `text_cache` is on, so a step runs only the heads.
    "text_freeze": "auto",
    "text_cache": True,
    # Multiplies the learning rate of the text backbone's trainable parameters (its own
    # optimiser group), e.g. 0.1 when fine-tuning pretrained layers; the heads keep `lr`.
    "text_lr_scale": 1.0,
    "batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "epochs": 200,  # a cap: the time budget usually ends the run first
    "minutes": 4.0,
    "losses": [{"loss": "infonce", "level": "global", "weight": 1.0}],
    "stages": [],
    "seed": 0,
    # The run's splits (training/splits.py): the trained style held out as the validation set
    # (a style only the Iconify data has; without it, choices fall back to the test set and
    # say so), and the share of concepts no style trains on (0: every concept trains; the
    # recipes benchmark holds some out to measure unseen concepts).
    "validation_style": "fluent-emoji-flat",
    "unseen_concepts": 0.0,
}

def infonce_warmup(*levels: str, fraction: float = 0.3) -> dict[str, Any]:
    """The stage that first learns the space with InfoNCE at each level, before a recipe's own losses."""
    return {"name": "warmup", "fraction": fraction,
            "losses": [{"loss": "infonce", "level": level, "weight": 1.0} for level in levels]}


RECIPES: dict[str, dict[str, Any]] = {
    "infonce": {},
    # Hardest negatives from freshly initialised heads collapse every pair to one point (the
    # loss sticks at 2 × margin). Of the warm-ups tried on held-out OpenMoji (none, VSE0 - the
    # sum over all negatives, VSE++'s own fallback - for part of the run, at two learning
    # rates, and InfoNCE), InfoNCE did best; those runs are not kept as results, and
    # docs/results.md shows what this recipe reaches. So the heads first learn the space with
    # InfoNCE, then the hardest negative sharpens it (margin 0.2, as VSE++).
    "vsepp": {
        "stages": [
            infonce_warmup("global"),
            {"name": "hardest", "fraction": 0.7, "losses": [
                {"loss": "vsepp", "level": "global", "weight": 1.0, "margin": 0.2}]},
        ],
        "losses": [],
    },
    # Zheng et al.: stage I learns with the instance loss alone (image CNN frozen);
    # stage II adds the ranking loss.
    "dualpath": {
        "stages": [
            {"name": "I", "fraction": 0.5, "losses": [{"loss": "instance", "level": "global", "weight": 1.0}]},
            {"name": "II", "fraction": 0.5, "losses": [
                {"loss": "instance", "level": "global", "weight": 1.0},
                {"loss": "vsepp", "level": "global", "weight": 1.0, "margin": 0.2},
            ]},
        ],
        "losses": [],
    },
    # MT-HCN: exterior (mid-level, fine-grained) and concept (top, abstract) levels; the
    # pairs are clustered by their exterior embeddings each epoch and the concept level
    # learns to classify them (SSC); HBTR ranks at both levels; the served score fuses them.
    # Its ranking terms use the hardest negative too, so it warms up like vsepp, at both levels.
    # After the warm-up HBTR's centroid term at margin 0.1 hardly ever fires (the negatives' mean
    # similarity is near 0); benchmarks/recipes.py's hbtr_wide measures a margin of 0.5 on the
    # global level (docs/results.md).
    "mthcn": {
        "levels": {"concept": "pooled", "exterior": "mid"},
        "fusion": {"concept": 0.5, "exterior": 0.5},
        "stages": [
            infonce_warmup("concept", "exterior"),
            {"name": "main", "fraction": 0.7, "losses": [
                {"loss": "hbtr", "level": "concept", "weight": 1.0, "margin": 0.2, "centroid_margin": 0.1},
                {"loss": "hbtr", "level": "exterior", "weight": 1.0, "margin": 0.2, "centroid_margin": 0.1},
                {"loss": "ssc", "level": "concept", "cluster_level": "exterior", "weight": 0.5, "clusters": 64},
            ]},
        ],
        "losses": [],
    },
    # CCL: an instance level (the pooled features) and a fragment level (patches and tokens, each
    # projected, then averaged), fused; at each level the inter-modality pairwise loss and the
    # intra-modality category losses (emoji group, subgroup), balanced adaptively. From fresh heads
    # these terms alone barely moved in 6 epochs on the emoji set (rsum 1.8 after 2 epochs, 5.6
    # after 6, loss 27 → 25.5), so, as vsepp and mthcn, it first learns the space with InfoNCE.
    "ccl": {
        "levels": {"instance": "pooled", "fragment": "fragments"},
        "fusion": {"instance": 0.5, "fragment": 0.5},
        "stages": [
            infonce_warmup("instance", "fragment"),
            {"name": "main", "fraction": 0.7, "losses": [
                {"loss": "ccl", "level": "instance", "weight": 1.0, "margin": 1.0, "categories": ["group", "subgroup"]},
                {"loss": "ccl", "level": "fragment", "weight": 1.0, "margin": 1.0, "categories": ["group", "subgroup"]},
            ]},
        ],
        "losses": [],
    },
    # CM-GANs: heads whose last layer is shared by the modalities (the generators' encoders); the
    # decoders, the intra-modality discriminators (original vs reconstructed feature) and the
    # inter-modality discriminator (which modality) train alternately with them; InfoNCE is the
    # pair loss on the common representation.
    "cmgans": {
        "heads": "shared_top",
        "head_dropout": 0.1,
        "losses": [
            {"loss": "infonce", "level": "global", "weight": 1.0},
            {"loss": "cmgan", "level": "global", "weight": 1.0, "reconstruction_weight": 1.0,
             "intra_weight": 0.1, "inter_weight": 0.1},
        ],
    },
    # CRAN and MCSM score pairs: the towers are the first stage (InfoNCE on `global`), the scorer
    # over patches and tokens the second, trained together on the same batches, each match ranked
    # against the 7 candidates the first stage ranks highest in each direction (ScorerLoss).
    "cran": {
        "scorer": {"kind": "cran", "dim": 128, "relation_hidden": 64, "smooth": 9.0},
        "losses": [
            {"loss": "infonce", "level": "global", "weight": 1.0},
            {"loss": "scorer", "level": "global", "weight": 1.0, "levels": ["fused", "local", "relation"], "negatives": 7},
        ],
    },
    "mcsm": {
        "scorer": {"kind": "mcsm", "dim": 128, "hidden": 256},
        "losses": [
            {"loss": "infonce", "level": "global", "weight": 1.0},
            {"loss": "scorer", "level": "global", "weight": 1.0, "levels": ["fused", "image_space", "text_space"],
             "negatives": 7},
        ],
    },
    # The walking skeleton's model: small towers from scratch at 64 px, trained end to end
    # with augmentation. Fast; the tests use it.
    "infonce_small": {
        "image_encoder": "small_cnn",
        "text_encoder": "small_text_cnn",
        "head_layers": 1,
        "head_dropout": 0.0,
        "image_size": 64,
        "freeze_image": False,
        "augment": True,
        "batch_size": 128,
        "lr": 2e-3,
        "epochs": 40,
    },
}


# Settings a text encoder brings unless the recipe or the caller set them: MiniLM reads
# sentences, so it keeps twice the label-length budget of the word-level encoders.
TEXT_ENCODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "minilm": {"max_length": 64},
}


def recipe_config(name: str, **overrides: Any) -> dict[str, Any]:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    config = copy.deepcopy(BASE)
    config.update(copy.deepcopy(RECIPES[name]))
    config["recipe"] = name
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"recipe {name!r} has no setting(s) {sorted(unknown)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    config.update(given)
    for key, value in TEXT_ENCODER_DEFAULTS.get(config["text_encoder"], {}).items():
        if key not in given and key not in RECIPES[name]:
            config[key] = value
    return config


def stage_plan(config: dict[str, Any], epochs: int) -> list[tuple[int, dict[str, Any]]]:
    """(first epoch, stage) for each stage; a recipe without stages is one stage of its losses."""
    stages = config["stages"] or [{"name": "main", "fraction": 1.0, "losses": config["losses"]}]
    total = sum(stage["fraction"] for stage in stages)
    plan, start, cumulative = [], 0, 0.0
    for stage in stages:
        plan.append((start, stage))
        cumulative += stage["fraction"]
        start = round(epochs * cumulative / total)
    return plan


def stage_at(plan: list[tuple[int, dict[str, Any]]], epoch: int) -> dict[str, Any]:
    current = plan[0][1]
    for first_epoch, stage in plan:
        if epoch >= first_epoch:
            current = stage
    return current
