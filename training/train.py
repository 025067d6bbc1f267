"""The training loop: manifests → images (or cached frozen features) → recipe losses → checkpoint + evaluation.

A run directory holds everything export needs: `model.safetensors` (weights only, a safe
format), `config.json` (the recipe with overrides), `tokenizer.json`, `eval.json`, and
while training `checkpoint.pt` (weights, optimiser and schedule after the last finished
epoch; a killed run resumes from it).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from xmodal import settings
from xmodal.preprocessing import decode_image, image_to_array
from xmodal.text_preprocessing import pad_ids
from xmodal.training.evaluate import evaluate_report, format_metrics
from xmodal.training.manifest import ManifestRow, read_manifest
from xmodal.training.models import FRAGMENT_OUTPUTS, DualEncoder, needs_fragments, served_outputs
from xmodal.training.recipes import recipe_config, stage_at, stage_plan
from xmodal.training.tokenizer import PAD_ID, load_tokenizer, train_wordlevel_tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EVAL_FILE = "eval.json"
CHECKPOINT_FILE = "checkpoint.pt"
FEATURE_BATCH = 16  # measured: EfficientNet-Lite0 at 128 px runs 2–2.5× faster per image at 16 than at 64 on 2 cores
CAPTION_BATCH = 256
# Text backbones that start from pretrained weights: `text_freeze: auto` freezes them.
PRETRAINED_TEXT_ENCODERS = {"minilm"}


@dataclass
class ImageSet:
    """The rows whose images decoded, with either their pixels or their frozen-backbone features."""

    rows: list[ManifestRow]
    pixels: torch.Tensor | None = None  # [N, 3, S, S] when the backbone trains
    features: dict[str, torch.Tensor] | None = None  # backbone outputs when it is frozen
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)


def decode_rows(rows: Sequence[ManifestRow], config: dict[str, Any], desc: str) -> Iterable[tuple[ManifestRow, np.ndarray | None, str]]:
    """Each row with its preprocessed image, or None and the reason it could not be read."""
    for row in tqdm(rows, desc=desc, unit="img", leave=False, mininterval=1.0):
        try:
            image = decode_image(Path(row.image).read_bytes())
        except (OSError, ValueError) as exc:
            yield row, None, str(exc)
            continue
        yield row, image_to_array(image, config["image_size"], config["image_mean"], config["image_std"],
                                  config["image_background"]), ""


def load_pixels(rows: Sequence[ManifestRow], config: dict[str, Any], desc: str) -> ImageSet:
    """Decode every image once; an unreadable image is skipped and recorded, never fatal."""
    images = ImageSet(rows=[])
    arrays = []
    for row, array, reason in decode_rows(rows, config, desc):
        if array is None:
            images.skipped.append((str(row.image), reason))
        else:
            arrays.append(array)
            images.rows.append(row)
    if not arrays:
        raise ValueError(f"no decodable images among {len(rows)} rows")
    images.pixels = torch.from_numpy(np.stack(arrays))
    return images


def feature_cache_path(rows: Sequence[ManifestRow], config: dict[str, Any]) -> Path:
    """Keyed by the backbone, the preprocessing, whether patches are kept, and every image's path, size and mtime."""
    digest = hashlib.sha256()
    keys = ("image_encoder", "image_size", "image_mean", "image_std", "image_background")
    key = {k: config[k] for k in keys}
    if needs_fragments(config):
        key["fragments"] = True  # (caches without patches keep their names)
    digest.update(json.dumps(key, sort_keys=True).encode())
    for row in rows:
        try:
            stat = Path(row.image).stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # a missing image is skipped later; it still shapes the key
            size = mtime = -1
        digest.update(f"{row.image}|{size}|{mtime}\n".encode())
    return settings.data_dir() / "cache" / "features" / f"{config['image_encoder']}-{digest.hexdigest()[:20]}.safetensors"


@torch.no_grad()
def load_features(rows: Sequence[ManifestRow], config: dict[str, Any], backbone: nn.Module, desc: str,
                  device: torch.device) -> ImageSet:
    """Frozen-backbone features for every decodable image, computed once and cached on disk.

    Patches ("fragments") are kept only for the recipes that read them, in float16: 16 per image
    at 128 px, they are 16× the size of everything else.
    """
    cache = feature_cache_path(rows, config)
    keep_fragments = needs_fragments(config)
    if cache.exists():
        stored = load_file(str(cache))
        kept = set(stored.pop("_kept").tolist())
        images = ImageSet(rows=[row for i, row in enumerate(rows) if i in kept], features=stored)
        images.skipped = [(str(row.image), "not decodable (cached)") for i, row in enumerate(rows) if i not in kept]
        return images
    backbone.eval()
    images, chunks, batch, kept = ImageSet(rows=[]), [], [], []

    def flush() -> None:
        outputs = backbone(torch.from_numpy(np.stack(batch)).to(device))
        if keep_fragments:
            outputs["fragments"] = outputs["fragments"].half()
        chunks.append({name: value.cpu() for name, value in outputs.items()
                       if name not in FRAGMENT_OUTPUTS or (keep_fragments and name == "fragments")})
        batch.clear()

    for index, (row, array, reason) in enumerate(decode_rows(rows, config, desc)):
        if array is None:
            images.skipped.append((str(row.image), reason))
            continue
        batch.append(array)
        images.rows.append(row)
        kept.append(index)
        if len(batch) == FEATURE_BATCH:
            flush()
    if batch:
        flush()
    if not chunks:
        raise ValueError(f"no decodable images among {len(rows)} rows")
    images.features = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    save_file({**images.features, "_kept": torch.tensor(kept)}, str(tmp))
    tmp.replace(cache)
    return images


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids padded with PAD_ID to the batch's longest caption."""
    return torch.from_numpy(pad_ids([encoding.ids for encoding in tokenizer.encode_batch(list(texts))], PAD_ID))


def make_tokenizer(config: dict[str, Any], rows: Sequence[ManifestRow]) -> Tokenizer:
    """MiniLM's own WordPiece tokenizer (padding off, truncation at max_length), else a word-level one learnt from the captions."""
    if config["text_encoder"] == "minilm":
        from xmodal.training.bert import minilm_tokenizer

        return minilm_tokenizer(config["max_length"])
    return train_wordlevel_tokenizer((c for row in rows for c in row.captions), max_length=config["max_length"])


def apply_text_freeze(backbone: nn.Module, config: dict[str, Any]) -> bool:
    """Freeze the text backbone as `text_freeze` says; True when none of it trains."""
    freeze = config["text_freeze"]
    if freeze == "auto":
        freeze = "all" if config["text_encoder"] in PRETRAINED_TEXT_ENCODERS else "none"
    if hasattr(backbone, "set_trainable_layers"):
        from xmodal.training.bert import trainable_layers_for

        backbone.set_trainable_layers(trainable_layers_for(freeze, backbone.num_layers))
    elif freeze == "all":
        backbone.requires_grad_(False)
    elif freeze != "none":
        raise ValueError(f"text_freeze {freeze!r}: the {config['text_encoder']} text encoder has no layers to "
                         "freeze one by one; use 'all' or 'none'")
    return not any(parameter.requires_grad for parameter in backbone.parameters())


@dataclass
class CaptionFeatures:
    """A frozen text backbone's features for every distinct training caption, computed once and kept in memory."""

    index: dict[str, int]
    features: dict[str, torch.Tensor]

    def lookup(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = torch.tensor([self.index[caption] for caption in captions], device=next(iter(self.features.values())).device)
        return {name: value[rows] for name, value in self.features.items()}

    def backbone_outputs(self, backbone: nn.Module, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.lookup(captions)


@dataclass
class CaptionStates:
    """A partly trained text backbone's frozen lower layers, run once per distinct caption: their
    token states packed end to end without padding (``offsets[i]:offsets[i+1]`` is caption i),
    so a step runs only the trainable top layers. In memory; its size is reported."""

    index: dict[str, int]
    tokens: torch.Tensor
    offsets: list[int]
    mid: torch.Tensor | None

    def lookup(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [self.index[caption] for caption in captions]
        spans = [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in rows]
        states = torch.nn.utils.rnn.pad_sequence(spans, batch_first=True)
        lengths = torch.tensor([len(span) for span in spans], device=states.device)
        mask = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]).to(torch.float32)
        prefix = {"states": states, "mask": mask[..., None]}
        if self.mid is not None:
            prefix["mid"] = self.mid[rows]
        return prefix

    def backbone_outputs(self, backbone: nn.Module, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return backbone.forward_from(self.lookup(captions))

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + (self.mid.nbytes if self.mid is not None else 0)


@torch.no_grad()
def caption_features(backbone: nn.Module, tokenizer: Tokenizer, captions: Iterable[str], device: torch.device,
                     batch_size: int = CAPTION_BATCH) -> CaptionFeatures:
    """Run the (frozen) text backbone once over each distinct caption, shortest first so batches carry little padding."""
    unique = sorted(set(captions))
    lengths = [len(encoding.ids) for encoding in tokenizer.encode_batch(unique)]
    unique = [caption for _, caption in sorted(zip(lengths, unique))]
    backbone.eval()
    chunks = [backbone(tokenize(tokenizer, unique[i : i + batch_size]).to(device)) for i in range(0, len(unique), batch_size)]
    features = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0] if name not in FRAGMENT_OUTPUTS}
    return CaptionFeatures({caption: i for i, caption in enumerate(unique)}, features)


@torch.no_grad()
def caption_states(backbone: nn.Module, tokenizer: Tokenizer, captions: Iterable[str], device: torch.device,
                   batch_size: int = CAPTION_BATCH) -> CaptionStates:
    """Run the frozen lower layers of a partly trained backbone (``frozen_prefix``) once over each distinct caption."""
    unique = sorted(set(captions))
    backbone.eval()
    tokens, mids, offsets = [], [], [0]
    for i in range(0, len(unique), batch_size):
        prefix = backbone.frozen_prefix(tokenize(tokenizer, unique[i : i + batch_size]).to(device))
        for states, mask in zip(prefix["states"], prefix["mask"]):
            length = int(mask.sum())
            tokens.append(states[:length].clone())
            offsets.append(offsets[-1] + length)
        if "mid" in prefix:
            mids.append(prefix["mid"])
    return CaptionStates({caption: i for i, caption in enumerate(unique)}, torch.cat(tokens), offsets,
                         torch.cat(mids) if mids else None)


def discriminator_parameters(loss_modules: nn.Module) -> list[nn.Parameter]:
    """The adversaries' parameters (CM-GANs' discriminators): stepped by their own optimiser."""
    return [p for module in loss_modules.values() if hasattr(module, "discriminator_parameters")
            for p in module.discriminator_parameters()]


def parameter_groups(model: DualEncoder, loss_modules: nn.Module, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainable parameters: the text backbone's in their own group at lr × text_lr_scale, the rest at lr
    (the discriminators' are left to their own optimiser)."""
    text = [p for p in model.text.backbone.parameters() if p.requires_grad]
    skip = {id(p) for p in text} | {id(p) for p in discriminator_parameters(loss_modules)}
    rest = [p for p in list(model.parameters()) + list(loss_modules.parameters()) if p.requires_grad and id(p) not in skip]
    groups = [{"params": rest}]
    if text:
        groups.append({"params": text, "lr": config["lr"] * config["text_lr_scale"]})
    return groups


def random_affine(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild random zoom and shift; styles differ in framing and stroke, not orientation (no flips: arrows)."""
    n = pixels.shape[0]
    scale = torch.empty(n).uniform_(0.8, 1.05, generator=generator)
    shift = torch.empty(n, 2).uniform_(-0.1, 0.1, generator=generator)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)


def concept_batches(rows: Sequence[ManifestRow], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches, each concept at most once per batch (else its twin in another style is a false negative)."""
    by_concept: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_concept.setdefault(row.concept, []).append(index)
    concepts = list(by_concept)
    rng.shuffle(concepts)
    picks = [rng.choice(by_concept[c]) for c in concepts]
    return [picks[i : i + batch_size] for i in range(0, len(picks), batch_size) if len(picks[i : i + batch_size]) > 1]


class Trainee:
    """The model plus the way each side is fed: pixels through the backbone or cached image features;
    token ids through the text backbone or cached caption features."""

    def __init__(self, model: DualEncoder, images: ImageSet, device: torch.device, tokenizer: Tokenizer | None = None,
                 captions: CaptionFeatures | None = None):
        self.model, self.images, self.device = model, images, device
        self.tokenizer, self.captions = tokenizer, captions

    def text_embeddings(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.model.text.project(self.text_features(texts))

    def text_features(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The text backbone's outputs: from the caption cache, or computed from token ids."""
        if self.captions is not None:
            return self.captions.backbone_outputs(self.model.text.backbone, texts)
        return self.model.text.backbone(tokenize(self.tokenizer, texts).to(self.device))

    def image_embeddings(self, indices: Sequence[int] | slice, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.model.image.project(self.image_features(indices, generator))

    def image_features(self, indices: Sequence[int] | slice, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The image backbone's outputs: cached (float16 patches widened back) or computed from pixels."""
        if self.images.features is not None:
            return {k: v[indices].to(self.device, torch.float32) for k, v in self.images.features.items()}
        pixels = self.images.pixels[indices]
        if generator is not None:
            pixels = random_affine(pixels, generator)
        return self.model.image.backbone(pixels.to(self.device))


def build_loss_modules(config: dict[str, Any], num_classes: int, model: DualEncoder | None = None,
                       category_sizes: dict[str, int] | None = None) -> nn.ModuleDict:
    """One module per distinct loss term of any stage, keyed by its position in `all_terms`.

    `model` gives the feature widths CM-GANs reconstructs; `category_sizes` the number of labels of
    each kind of category (CCL).
    """
    from xmodal.training import losses

    modules = nn.ModuleDict()
    for key, term in all_terms(config).items():
        kind = term["loss"]
        if kind == "infonce":
            modules[key] = losses.InfoNCELoss()
        elif kind == "vsepp":
            modules[key] = losses.VSEPPLoss(margin=term.get("margin", 0.2), hardest=term.get("hardest", True))
        elif kind == "hbtr":
            modules[key] = losses.HBTRLoss(margin=term.get("margin", 0.2), centroid_margin=term.get("centroid_margin", 0.1))
        elif kind == "instance":
            modules[key] = losses.InstanceLoss(config["dim"], num_classes)
        elif kind == "ssc":
            modules[key] = losses.SSCLoss(config["dim"], term["clusters"])
        elif kind == "ccl":
            sizes = category_sizes or {}
            modules[key] = losses.CCLLoss(config["dim"], {name: sizes[name] for name in term["categories"]},
                                          margin=term.get("margin", 1.0))
        elif kind == "scorer":
            if model is None or model.scorer is None:
                raise ValueError(f"recipe {config['recipe']!r}: a 'scorer' loss needs the recipe's `scorer`")
            modules[key] = losses.ScorerLoss(tuple(term.get("levels", ("fused",))), negatives=term.get("negatives", 15))
        elif kind == "cmgan":
            from xmodal.training.adversarial import CMGAN

            feature = config["levels"][term["level"]]
            modules[key] = CMGAN(model.image.backbone.dims[feature], model.text.backbone.dims[feature], config["dim"],
                                 hidden=config["head_hidden"],
                                 **{k: term[k] for k in ("reconstruction_weight", "intra_weight", "inter_weight") if k in term})
        else:
            raise ValueError(f"unknown loss {kind!r} in recipe {config['recipe']!r}")
    return modules


def category_labels(rows: Sequence[ManifestRow]) -> dict[str, torch.Tensor]:
    """Each row's group and subgroup as class ids (a row without one gets its own "none" class)."""
    labels = {}
    for name in ("group", "subgroup"):
        values = [getattr(row, name) or "" for row in rows]
        index = {value: i for i, value in enumerate(sorted(set(values)))}
        labels[name] = torch.tensor([index[value] for value in values])
    return labels


def term_key(term: dict[str, Any]) -> str:
    return "_".join(str(term[k]) for k in ("loss", "level")) + "_" + hashlib.sha1(json.dumps(term, sort_keys=True).encode()).hexdigest()[:6]


def all_terms(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    terms = list(config["losses"]) + [term for stage in config["stages"] for term in stage["losses"]]
    return {term_key(term): term for term in terms}


@torch.no_grad()
def cluster_pairs(trainee: Trainee, tokenizer: Tokenizer, level: str, clusters: int, seed: int) -> torch.Tensor:
    """k-means over each pair's exterior embedding (image and label caption averaged): the SSC pseudo-labels."""
    from xmodal.training.clustering import kmeans

    model = trainee.model
    model.eval()
    rows = trainee.images.rows
    image = torch.cat([trainee.image_embeddings(slice(i, i + 512))[level] for i in range(0, len(rows), 512)])
    text = torch.cat([trainee.text_embeddings([r.captions[0] for r in rows[i:i + 512]])[level]
                      for i in range(0, len(rows), 512)])
    _, assignments = kmeans(F.normalize(image + text, dim=-1).cpu(), min(clusters, len(rows)), seed=seed)
    model.train()
    return assignments


def train(
    manifests: str | Path | Sequence[str | Path],
    run_dir: str | Path,
    *,
    recipe: str = "infonce",
    device: str = "cpu",
    progress: bool = True,
    resume: bool = True,
    **overrides: Any,
) -> dict:
    """Train a recipe on the manifests' train splits, evaluate on their test splits, save the run."""
    config = recipe_config(recipe, **overrides)
    manifests = [manifests] if isinstance(manifests, (str, Path)) else list(manifests)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device_ = torch.device(device)
    if device_.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    torch.manual_seed(config["seed"])

    train_rows = [row for m in manifests for row in read_manifest(m, split="train")]
    test_rows = [row for m in manifests for row in read_manifest(m, split="test")]
    if not train_rows:
        raise ValueError(f"{', '.join(map(str, manifests))}: no rows in the train split")

    checkpoint = _load_checkpoint(run_dir, config) if resume else None
    if checkpoint is not None:
        tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    else:
        tokenizer = make_tokenizer(config, train_rows)
    config["vocab_size"] = tokenizer.get_vocab_size()
    build_config = dict(config)
    if config["text_encoder"] == "glove_cnn" and checkpoint is None:
        from xmodal.training.glove import glove_embedding_matrix

        build_config["_embedding_init"], coverage = glove_embedding_matrix(tokenizer.get_vocab())
        if progress:
            print(f"GloVe covers {100 * coverage:.1f}% of the {config['vocab_size']} caption words")
    model = DualEncoder(build_config).to(device_)
    text_frozen = apply_text_freeze(model.text.backbone, config)

    frozen = config["freeze_image"]
    if frozen:
        model.image.backbone.requires_grad_(False)
        train_set = load_features(train_rows, config, model.image.backbone, "features train", device_)
        test_set = load_features(test_rows, config, model.image.backbone, "features test", device_) if test_rows else None
    else:
        train_set = load_pixels(train_rows, config, "decode train")
        test_set = load_pixels(test_rows, config, "decode test") if test_rows else None
    captions: CaptionFeatures | CaptionStates | None = None
    train_captions = [c for row in train_set.rows for c in row.captions]
    if text_frozen and config["text_cache"] and not needs_fragments(config):
        started = time.monotonic()
        captions = caption_features(model.text.backbone, tokenizer, train_captions, device_)
        if progress:
            print(f"text features cached for {len(captions.index)} captions in {time.monotonic() - started:.1f} s")
    elif getattr(model.text.backbone, "frozen_depth", 0) and config["text_cache"]:
        started = time.monotonic()
        captions = caption_states(model.text.backbone, tokenizer, train_captions, device_)
        if progress:
            print(f"frozen text layers (the lower {model.text.backbone.frozen_depth}) cached for {len(captions.index)} "
                  f"captions ({captions.nbytes / 2**20:.0f} MiB) in {time.monotonic() - started:.1f} s")
    trainee = Trainee(model, train_set, device_, tokenizer, captions)

    concepts = sorted({row.concept for row in train_set.rows})
    concept_index = {concept: i for i, concept in enumerate(concepts)}
    labels = torch.tensor([concept_index[row.concept] for row in train_set.rows])
    categories = category_labels(train_set.rows)
    loss_modules = build_loss_modules(config, len(concepts), model,
                                      {name: int(values.max()) + 1 for name, values in categories.items()}).to(device_)
    optimizer = torch.optim.AdamW(parameter_groups(model, loss_modules, config), lr=config["lr"],
                                  weight_decay=config["weight_decay"])
    adversaries = discriminator_parameters(loss_modules)
    # Discriminators train with Adam at the generators' rate, without decay or schedule (as GANs usually are).
    adversary_optimizer = torch.optim.Adam(adversaries, lr=config["lr"], betas=(0.5, 0.999)) if adversaries else None
    steps_per_epoch = max(1, len(concept_batches(train_set.rows, config["batch_size"], random.Random(0))))
    schedule = {"total_steps": config["epochs"] * steps_per_epoch}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, schedule["total_steps"]) / schedule["total_steps"]))
    )

    state = {"epoch": 0, "step": 0, "elapsed": 0.0, "planned_epochs": None, "history": []}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        loss_modules.load_state_dict(checkpoint["losses"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if adversary_optimizer is not None:
            adversary_optimizer.load_state_dict(checkpoint["adversary_optimizer"])
        state.update(json.loads(checkpoint["state"]))
        if state["planned_epochs"]:
            schedule["total_steps"] = state["planned_epochs"] * steps_per_epoch
        scheduler.load_state_dict(checkpoint["scheduler"])
        if progress:
            print(f"resuming {run_dir} after epoch {state['epoch']} ({state['elapsed']:.0f} s trained)")

    budget = 60.0 * config["minutes"]
    bar = tqdm(total=None, desc=f"train {recipe}", unit="pair", disable=not progress, mininterval=1.0)
    clusters = None
    while state["epoch"] < (state["planned_epochs"] or config["epochs"]):
        epoch = state["epoch"]
        started = time.monotonic()
        stage = stage_at(stage_plan(config, state["planned_epochs"] or config["epochs"]), epoch)
        terms = {term_key(t): t for t in stage["losses"]}
        rng = random.Random(config["seed"] * 100_003 + epoch)
        generator = torch.Generator().manual_seed(config["seed"] * 100_003 + epoch)
        for key, term in terms.items():
            if term["loss"] == "ssc":
                clusters = cluster_pairs(trainee, tokenizer, term["cluster_level"], term["clusters"], config["seed"] + epoch)
                # Cluster ids mean nothing across re-clusterings: a fresh classifier, fresh Adam moments.
                loss_modules[key].reset_classifier(term["clusters"])
                for parameter in loss_modules[key].parameters():
                    optimizer.state.pop(parameter, None)
        model.train()
        if frozen:
            model.image.backbone.eval()  # frozen BatchNorm statistics stay the pretrained ones
        if text_frozen:
            model.text.backbone.eval()  # no dropout in a frozen text backbone
        losses_seen = []
        for batch in concept_batches(train_set.rows, config["batch_size"], rng):
            index = torch.tensor(batch)
            image_features = trainee.image_features(batch, generator if config["augment"] else None)
            text_features = trainee.text_features([rng.choice(train_set.rows[i].captions) for i in batch])
            image, text = model.image.project(image_features), model.text.project(text_features)
            loss = torch.zeros((), device=device_)
            for key, term in terms.items():
                level, kind = term["level"], term["loss"]
                if kind == "instance":
                    value = loss_modules[key](image[level], text[level], labels[index].to(device_))
                elif kind == "ssc":
                    value = loss_modules[key](image[level], text[level], clusters[index].to(device_))
                elif kind == "ccl":
                    value = loss_modules[key](image[level], text[level], {n: v[index].to(device_) for n, v in categories.items()})
                elif kind == "scorer":
                    value = loss_modules[key](model.scorer, model.scorer.image_side(image_features),
                                              model.scorer.text_side(text_features), image[level] @ text[level].t())
                elif kind == "cmgan":
                    feature = config["levels"][level]
                    value = loss_modules[key].generator_loss(image_features[feature], text_features[feature],
                                                             image[level], text[level])["total"]
                else:
                    value = loss_modules[key](image[level], text[level])
                loss = loss + term["weight"] * value
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if adversary_optimizer is not None:
                # The adversaries' turn, on what the generators just produced (detached inside the loss).
                adversary_optimizer.zero_grad(set_to_none=True)
                adversary_loss = torch.zeros((), device=device_)
                for key, term in terms.items():
                    if term["loss"] == "cmgan":
                        feature = config["levels"][term["level"]]
                        adversary_loss = adversary_loss + loss_modules[key].discriminator_loss(
                            image_features[feature], text_features[feature], image[term["level"]], text[term["level"]])["total"]
                if adversary_loss.requires_grad:
                    adversary_loss.backward()
                    adversary_optimizer.step()
            state["step"] += 1
            losses_seen.append(loss.item())
            bar.update(len(batch))
            bar.set_postfix(epoch=epoch + 1, stage=stage["name"], loss=f"{np.mean(losses_seen[-20:]):.3f}")
        state["elapsed"] += time.monotonic() - started
        state["epoch"] += 1
        state["history"].append({"epoch": epoch + 1, "stage": stage["name"], "loss": float(np.mean(losses_seen))})
        if state["planned_epochs"] is None:
            # The budget sets the number of epochs once the first one has been timed, so
            # the cosine schedule and the stages span the run that will actually happen.
            state["planned_epochs"] = int(min(config["epochs"], max(1, budget // max(state["elapsed"], 1e-6))))
            schedule["total_steps"] = state["planned_epochs"] * steps_per_epoch
            bar.total = state["planned_epochs"] * len(concepts)  # one pair per concept per epoch
        _save_checkpoint(run_dir, model, loss_modules, optimizer, scheduler, state, config, tokenizer, adversary_optimizer)
    bar.close()

    report: dict[str, Any] = {
        "recipe": recipe,
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
        "epochs": state["epoch"],
        "steps": state["step"],
        "train_seconds": round(state["elapsed"], 1),
        "final_loss": state["history"][-1]["loss"] if state["history"] else None,
        "history": state["history"],
        "train_images": len(train_set.rows),
        "train_concepts": len(concepts),
        "skipped_images": train_set.skipped + (test_set.skipped if test_set else []),
        "train_styles": sorted({row.style for row in train_set.rows}),
        "text_backbone_frozen": text_frozen,
        "cached_captions": len(captions.index) if captions is not None else 0,
    }
    if test_set is not None:
        report["test_styles"] = sorted({row.style for row in test_set.rows})
        report["test_images"] = len(test_set.rows)
        report["test"] = evaluate_model(model, tokenizer, Trainee(model, test_set, device_), run_dir=run_dir)

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / WEIGHTS_FILE))
    (run_dir / CONFIG_FILE).write_text(json.dumps(model.config, indent=2) + "\n")
    tokenizer.save(str(run_dir / TOKENIZER_FILE))
    (run_dir / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    if progress:
        print(f"trained {state['epoch']} epochs, {state['step']} steps in {state['elapsed']:.0f} s; final loss {report['final_loss']:.3f}")
        if "test" in report:
            print(f"held-out {report['test_styles']} ({report['test_images']} images):")
            print(format_metrics(report["test"]["global"]))
    return report


def _save_checkpoint(run_dir: Path, model, loss_modules, optimizer, scheduler, state, config, tokenizer,
                     adversary_optimizer=None) -> None:
    tmp = run_dir / (CHECKPOINT_FILE + ".tmp")
    checkpoint = {
        "model": model.state_dict(), "losses": loss_modules.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "state": json.dumps(state), "config": _config_fingerprint(config),
    }
    if adversary_optimizer is not None:
        checkpoint["adversary_optimizer"] = adversary_optimizer.state_dict()
    torch.save(checkpoint, tmp)
    tokenizer.save(str(run_dir / TOKENIZER_FILE))
    tmp.replace(run_dir / CHECKPOINT_FILE)


def _config_fingerprint(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_") and k != "vocab_size"}, sort_keys=True)


def _load_checkpoint(run_dir: Path, config: dict[str, Any]) -> dict | None:
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("config") != _config_fingerprint(config):
        raise ValueError(f"{path} was written by a run with another configuration; delete it or use another --run")
    return checkpoint


@torch.no_grad()
def embed_texts(model: DualEncoder, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 512,
                device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """The served outputs (`global`, and each level of a hierarchical model) for texts."""
    model.eval()
    chunks = [served_outputs(model.text(tokenize(tokenizer, texts[i:i + batch_size]).to(device)), model.fusion)
              for i in range(0, len(texts), batch_size)]
    return {name: torch.cat([c[name] for c in chunks]).cpu().numpy() for name in chunks[0]}


@torch.no_grad()
def embed_image_set(trainee: Trainee, batch_size: int = 256) -> dict[str, np.ndarray]:
    trainee.model.eval()
    n = len(trainee.images.rows)
    chunks = [served_outputs(trainee.image_embeddings(slice(i, i + batch_size)), trainee.model.fusion)
              for i in range(0, n, batch_size)]
    return {name: torch.cat([c[name] for c in chunks]).cpu().numpy() for name in chunks[0]}


def evaluate_model(model: DualEncoder, tokenizer: Tokenizer, trainee: Trainee, run_dir: Path | None = None) -> dict:
    """Each image against the label captions (captions[0]) of the same set; a concept's label is its match.

    Every served output is evaluated (the fused `global` and, for hierarchical models, each level).
    """
    rows = trainee.images.rows
    labels = {row.concept: row.captions[0] for row in rows}
    categories = {row.concept: row.subgroup or row.group for row in rows}
    text_keys = list(labels)
    image_emb = embed_image_set(trainee)
    text_emb = embed_texts(model, tokenizer, [labels[k] for k in text_keys], device=trainee.device)
    report = evaluate_report(
        image_emb, text_emb, [row.concept for row in rows], text_keys,
        image_categories=[categories[row.concept] for row in rows], text_categories=[categories[k] for k in text_keys],
        plot_path=run_dir / "recall.png" if run_dir else None,
    )
    if model.scorer is not None:
        report[f"rerank@{RERANK_TOP_N}"] = evaluate_rerank(trainee, tokenizer, [labels[k] for k in text_keys], image_emb["global"],
                                                           text_emb["global"], [row.concept for row in rows], text_keys)
    return report


# How many first-stage candidates the scorer re-ranks in evaluation (and, by default, in search).
RERANK_TOP_N = 20


@torch.no_grad()
def evaluate_rerank(trainee: Trainee, tokenizer: Tokenizer, texts: list[str], image_global: np.ndarray, text_global: np.ndarray,
                    image_keys: list[str], text_keys: list[str], top_n: int = RERANK_TOP_N, chunk: int = 4096) -> dict:
    """Both directions' first stage (the `global` search) with its top N re-ranked by the model's scorer."""
    from xmodal.training.evaluate import KS, ranks_in_scores, recall_summary, reranked_scores

    model = trainee.model
    model.eval()
    scorer = model.scorer
    n = len(trainee.images.rows)
    image_side = [scorer.image_side(trainee.image_features(slice(i, i + 256))) for i in range(0, n, 256)]
    image_side = {k: torch.cat([part[k] for part in image_side]) for k in image_side[0]}
    text_side = [scorer.text_side(model.text.backbone(tokenize(tokenizer, texts[i:i + 256]).to(trainee.device)))
                 for i in range(0, len(texts), 256)]
    text_side = {k: torch.cat(_pad_tokens([part[k] for part in text_side]) if k in TOKEN_KEYS else [part[k] for part in text_side])
                 for k in text_side[0]}

    first = image_global @ text_global.T  # image i against text t

    def rescore(image_rows: np.ndarray, text_rows: np.ndarray) -> np.ndarray:
        images, texts_ = image_rows.reshape(-1), text_rows.reshape(-1)
        first_scores = torch.from_numpy(first[images, texts_]).to(trainee.device)
        images, texts_ = torch.from_numpy(images), torch.from_numpy(texts_)
        scores = [scorer.score({k: v[images[i:i + chunk]] for k, v in image_side.items()},
                               {k: v[texts_[i:i + chunk]] for k, v in text_side.items()},
                               first_scores[i:i + chunk], pairwise=True)["fused"]
                  for i in range(0, len(images), chunk)]
        return torch.cat(scores).cpu().numpy().reshape(image_rows.shape)

    i2t = reranked_scores(first, top_n, lambda rows, cols: rescore(rows, cols))
    t2i = reranked_scores(first.T, top_n, lambda rows, cols: rescore(cols, rows))
    image_key_ids, text_key_ids = np.array(image_keys), np.array(text_keys)
    i2t_ranks = ranks_in_scores(i2t, image_key_ids[:, None] == text_key_ids[None, :])
    t2i_ranks = ranks_in_scores(t2i, text_key_ids[:, None] == image_key_ids[None, :])
    i2t_summary, t2i_summary = recall_summary(i2t_ranks), recall_summary(t2i_ranks)
    return {"image_to_text": i2t_summary, "text_to_image": t2i_summary, "top_n": top_n,
            "rsum": float(sum(i2t_summary[f"R@{k}"] + t2i_summary[f"R@{k}"] for k in KS))}


# A scorer's per-token outputs ([B, L, ...]): chunks of texts padded to different lengths are
# zero-padded to one before they are joined.
TOKEN_KEYS = ("fragments", "mask")


def _pad_tokens(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    length = max(chunk.shape[1] for chunk in chunks)
    return [F.pad(chunk, (0, 0) * (chunk.dim() - 2) + (0, length - chunk.shape[1])) for chunk in chunks]


def load_run(run_dir: str | Path) -> tuple[DualEncoder, Tokenizer, dict[str, Any]]:
    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a training run: no {WEIGHTS_FILE}")
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    model = DualEncoder({**config, "pretrained": False})
    model.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
    model.eval()
    return model, load_tokenizer(run_dir / TOKENIZER_FILE), config
