"""The training loop: manifests → images (or cached frozen features) → recipe losses → checkpoint + evaluation.

`train` is :func:`setup` (data, model, objectives, optimisers, a checkpoint to resume from), then
:func:`train_one_epoch` until the run's epochs are done (a checkpoint after each), then the
held-out evaluation (:func:`evaluate_model`) and the run saved in the format of `run.py`. The
loop knows no loss by name: every term of a recipe is an objective of `objectives.py`.
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
from xmodal.training.evaluate import KS, RERANK_TOP_N, evaluate_report, format_metrics, ranks_in_scores, recall_summary, reranked_scores
from xmodal.manifest import ManifestRow, read_manifest
from xmodal.training.models import FRAGMENT_OUTPUTS, DualEncoder, needs_fragments, served_outputs
from xmodal.training.objectives import EpochStart, LossContext, Step, build_objectives, term_key
from xmodal.training.recipes import recipe_config, stage_at, stage_plan
from xmodal.training.splits import split_rows
from xmodal.training.run import CHECKPOINT_FILE, TOKENIZER_FILE, save_run
from xmodal.training.tokenizer import PAD_ID, load_tokenizer, train_wordlevel_tokenizer

# Small batches: a frozen backbone's feature pass is faster per image at 16 than at 64 on a CPU.
FEATURE_BATCH = 16
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


def adversary_parameters(objectives: nn.ModuleDict) -> list[nn.Parameter]:
    """The adversaries' parameters (CM-GANs' discriminators): stepped by their own optimiser."""
    return [p for objective in objectives.values() for p in objective.adversary_parameters()]


def parameter_groups(model: DualEncoder, objectives: nn.ModuleDict, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainable parameters: the text backbone's in their own group at lr × text_lr_scale, the rest at lr
    (the adversaries' are left to their own optimiser)."""
    text = [p for p in model.text.backbone.parameters() if p.requires_grad]
    skip = {id(p) for p in text} | {id(p) for p in adversary_parameters(objectives)}
    rest = [p for p in list(model.parameters()) + list(objectives.parameters()) if p.requires_grad and id(p) not in skip]
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


def category_labels(rows: Sequence[ManifestRow]) -> dict[str, torch.Tensor]:
    """Each row's group and subgroup as class ids (a row without one gets its own "none" class)."""
    labels = {}
    for name in ("group", "subgroup"):
        values = [getattr(row, name) or "" for row in rows]
        index = {value: i for i, value in enumerate(sorted(set(values)))}
        labels[name] = torch.tensor([index[value] for value in values])
    return labels


@dataclass
class Training:
    """A run being trained: the model, how it is fed, its objectives and optimisers, and its progress.

    Built by :func:`setup`, advanced an epoch at a time by :func:`train_one_epoch`; ``state`` is what
    a checkpoint records besides the weights (epoch, step, seconds trained, planned epochs, history).
    """

    config: dict[str, Any]
    run_dir: Path
    device: torch.device
    model: DualEncoder
    tokenizer: Tokenizer
    trainee: Trainee
    # The evaluated sets by name (training.splits.EVALUATED), those the data has.
    evaluation_sets: dict[str, ImageSet]
    labels: torch.Tensor  # each training row's instance (concept) id
    categories: dict[str, torch.Tensor]  # each training row's id of each kind of category
    objectives: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    adversary_optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: dict[str, int]  # total_steps, read by the scheduler's cosine: set once the budget fixes the epochs
    steps_per_epoch: int
    image_frozen: bool
    text_frozen: bool
    state: dict[str, Any]

    @property
    def concepts(self) -> int:
        return len({row.concept for row in self.trainee.images.rows})

    @property
    def target_epochs(self) -> int:
        """The epochs the run trains: the planned ones once the first epoch's time fixed them, until then the cap."""
        return self.state["planned_epochs"] or self.config["epochs"]

    def plan_epochs(self, epochs: int) -> None:
        """Fix the run's length: the cosine schedule and the stages span these epochs."""
        self.state["planned_epochs"] = epochs
        self.schedule["total_steps"] = epochs * self.steps_per_epoch


def setup(config: dict[str, Any], manifests: Sequence[str | Path], run_dir: Path, device: torch.device, resume: bool,
          progress: bool) -> Training:
    """Read the data, build the model, its objectives and optimisers, and restore the checkpoint if resuming."""
    torch.manual_seed(config["seed"])
    splits = split_rows((row for m in manifests for row in read_manifest(m)),
                        validation_style=config["validation_style"], unseen_concepts=config["unseen_concepts"])
    train_rows = splits.train
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
    model = DualEncoder(build_config).to(device)
    text_frozen = apply_text_freeze(model.text.backbone, config)

    image_frozen = config["freeze_image"]
    if image_frozen:
        model.image.backbone.requires_grad_(False)
        train_set = load_features(train_rows, config, model.image.backbone, "features train", device)
        evaluation_sets = {name: load_features(rows, config, model.image.backbone, f"features {name}", device)
                           for name, rows in splits.evaluated().items()}
    else:
        train_set = load_pixels(train_rows, config, "decode train")
        evaluation_sets = {name: load_pixels(rows, config, f"decode {name}") for name, rows in splits.evaluated().items()}
    captions: CaptionFeatures | CaptionStates | None = None
    train_captions = [c for row in train_set.rows for c in row.captions]
    if text_frozen and config["text_cache"] and not needs_fragments(config):
        started = time.monotonic()
        captions = caption_features(model.text.backbone, tokenizer, train_captions, device)
        if progress:
            print(f"text features cached for {len(captions.index)} captions in {time.monotonic() - started:.1f} s")
    elif getattr(model.text.backbone, "frozen_depth", 0) and config["text_cache"]:
        started = time.monotonic()
        captions = caption_states(model.text.backbone, tokenizer, train_captions, device)
        if progress:
            print(f"frozen text layers (the lower {model.text.backbone.frozen_depth}) cached for {len(captions.index)} "
                  f"captions ({captions.nbytes / 2**20:.0f} MiB) in {time.monotonic() - started:.1f} s")
    trainee = Trainee(model, train_set, device, tokenizer, captions)

    concepts = sorted({row.concept for row in train_set.rows})
    concept_index = {concept: i for i, concept in enumerate(concepts)}
    labels = torch.tensor([concept_index[row.concept] for row in train_set.rows])
    categories = category_labels(train_set.rows)
    objectives = build_objectives(LossContext(config, model, len(concepts),
                                              {name: int(values.max()) + 1 for name, values in categories.items()})).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, objectives, config), lr=config["lr"],
                                  weight_decay=config["weight_decay"])
    adversaries = adversary_parameters(objectives)
    # Discriminators train with Adam at the generators' rate, without decay or schedule (as GANs usually are).
    adversary_optimizer = torch.optim.Adam(adversaries, lr=config["lr"], betas=(0.5, 0.999)) if adversaries else None
    steps_per_epoch = max(1, len(concept_batches(train_set.rows, config["batch_size"], random.Random(0))))
    schedule = {"total_steps": config["epochs"] * steps_per_epoch}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, schedule["total_steps"]) / schedule["total_steps"]))
    )
    training = Training(config, run_dir, device, model, tokenizer, trainee, evaluation_sets, labels, categories, objectives,
                        optimizer, adversary_optimizer, scheduler, schedule, steps_per_epoch, image_frozen, text_frozen,
                        state={"epoch": 0, "step": 0, "elapsed": 0.0, "planned_epochs": None, "history": []})
    if checkpoint is not None:
        _restore_checkpoint(training, checkpoint)
        if progress:
            print(f"resuming {run_dir} after epoch {training.state['epoch']} ({training.state['elapsed']:.0f} s trained)")
    return training


def train_one_epoch(training: Training, bar: tqdm) -> None:
    """One pass over the training concepts with the current stage's objectives; ``training.state`` records it."""
    config, model, trainee, state = training.config, training.model, training.trainee, training.state
    epoch = state["epoch"]
    started = time.monotonic()
    stage = stage_at(stage_plan(config, training.target_epochs), epoch)
    objectives = [training.objectives[term_key(term)] for term in stage["losses"]]
    rng = random.Random(config["seed"] * 100_003 + epoch)
    generator = torch.Generator().manual_seed(config["seed"] * 100_003 + epoch)
    for objective in objectives:
        objective.start_epoch(EpochStart(trainee, epoch, config["seed"], training.optimizer))
    model.train()
    if training.image_frozen:
        model.image.backbone.eval()  # frozen BatchNorm statistics stay the pretrained ones
    if training.text_frozen:
        model.text.backbone.eval()  # no dropout in a frozen text backbone
    losses_seen = []
    rows = trainee.images.rows
    for batch in concept_batches(rows, config["batch_size"], rng):
        index = torch.tensor(batch)
        image_features = trainee.image_features(batch, generator if config["augment"] else None)
        text_features = trainee.text_features([rng.choice(rows[i].captions) for i in batch])
        step = Step(image_features, text_features, model.image.project(image_features), model.text.project(text_features),
                    index, training.labels[index].to(training.device),
                    {name: values[index].to(training.device) for name, values in training.categories.items()},
                    model.scorer)
        loss = torch.zeros((), device=training.device)
        for objective in objectives:
            loss = loss + objective.weight * objective(step)
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.optimizer.step()
        training.scheduler.step()
        if training.adversary_optimizer is not None:
            # The adversaries' turn, on what the generators just produced.
            training.adversary_optimizer.zero_grad(set_to_none=True)
            adversary_loss = torch.zeros((), device=training.device)
            for objective in objectives:
                value = objective.adversary_loss(step)
                if value is not None:
                    adversary_loss = adversary_loss + value
            if adversary_loss.requires_grad:
                adversary_loss.backward()
                training.adversary_optimizer.step()
        state["step"] += 1
        losses_seen.append(loss.item())
        bar.update(len(batch))
        bar.set_postfix(epoch=epoch + 1, stage=stage["name"], loss=f"{np.mean(losses_seen[-20:]):.3f}")
    state["elapsed"] += time.monotonic() - started
    state["epoch"] += 1
    state["history"].append({"epoch": epoch + 1, "stage": stage["name"], "loss": float(np.mean(losses_seen))})


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
    training = setup(config, manifests, run_dir, device_, resume, progress)
    state = training.state

    budget = 60.0 * config["minutes"]
    bar = tqdm(total=None, desc=f"train {recipe}", unit="pair", disable=not progress, mininterval=1.0)
    while state["epoch"] < training.target_epochs:
        train_one_epoch(training, bar)
        if state["planned_epochs"] is None:
            # The budget sets the number of epochs once the first one has been timed, so
            # the cosine schedule and the stages span the run that will actually happen.
            training.plan_epochs(int(min(config["epochs"], max(1, budget // max(state["elapsed"], 1e-6)))))
            bar.total = state["planned_epochs"] * training.concepts  # one pair per concept per epoch
        _save_checkpoint(training)
    bar.close()

    report = training_report(training)
    for name, images in training.evaluation_sets.items():
        # The recall plot is the selection set's: the one a reader of the run compares runs on.
        plot = run_dir if name == next(iter(training.evaluation_sets)) else None
        report[name] = evaluate_model(training.model, training.tokenizer, Trainee(training.model, images, device_),
                                      run_dir=plot)
    save_run(run_dir, training.model, training.tokenizer, report)
    if progress:
        print(f"trained {state['epoch']} epochs, {state['step']} steps in {state['elapsed']:.0f} s; final loss {report['final_loss']:.3f}")
        for name in training.evaluation_sets:
            held_out = report["evaluated"][name]
            print(f"{name}: {held_out['styles']} ({held_out['images']} images, {held_out['concepts']} concepts):")
            print(format_metrics(report[name]["global"]))
    return report


def training_report(training: Training) -> dict[str, Any]:
    """What the run did (before its held-out evaluation is added): the run's `eval.json`."""
    state, train_set, captions = training.state, training.trainee.images, training.trainee.captions
    evaluated = training.evaluation_sets
    report: dict[str, Any] = {
        "recipe": training.config["recipe"],
        "config": {k: v for k, v in training.config.items() if not k.startswith("_")},
        "epochs": state["epoch"],
        "steps": state["step"],
        "train_seconds": round(state["elapsed"], 1),
        "final_loss": state["history"][-1]["loss"] if state["history"] else None,
        "history": state["history"],
        "train_images": len(train_set.rows),
        "train_concepts": training.concepts,
        "skipped_images": train_set.skipped + [skip for images in evaluated.values() for skip in images.skipped],
        "train_styles": sorted({row.style for row in train_set.rows}),
        "text_backbone_frozen": training.text_frozen,
        "cached_captions": len(captions.index) if captions is not None else 0,
    }
    # Each evaluated set: its styles, images and concepts (training.splits).
    report["evaluated"] = {name: {"styles": sorted({row.style for row in images.rows}), "images": len(images.rows),
                                  "concepts": len({row.concept for row in images.rows})}
                           for name, images in evaluated.items()}
    if "test" in evaluated:
        report["test_styles"] = report["evaluated"]["test"]["styles"]
        report["test_images"] = report["evaluated"]["test"]["images"]
    return report


# 2: the loss terms' parameters under objectives.py's modules (1 held the loss modules themselves)
CHECKPOINT_FORMAT = 2


def _save_checkpoint(training: Training) -> None:
    tmp = training.run_dir / (CHECKPOINT_FILE + ".tmp")
    checkpoint = {
        "model": training.model.state_dict(), "losses": training.objectives.state_dict(),
        "optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
        "state": json.dumps(training.state), "config": _config_fingerprint(training.config),
        "format": CHECKPOINT_FORMAT,
    }
    if training.adversary_optimizer is not None:
        checkpoint["adversary_optimizer"] = training.adversary_optimizer.state_dict()
    torch.save(checkpoint, tmp)
    training.tokenizer.save(str(training.run_dir / TOKENIZER_FILE))
    tmp.replace(training.run_dir / CHECKPOINT_FILE)


def _restore_checkpoint(training: Training, checkpoint: dict) -> None:
    training.model.load_state_dict(checkpoint["model"])
    training.objectives.load_state_dict(checkpoint["losses"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    if training.adversary_optimizer is not None:
        training.adversary_optimizer.load_state_dict(checkpoint["adversary_optimizer"])
    training.state.update(json.loads(checkpoint["state"]))
    if training.state["planned_epochs"]:
        training.plan_epochs(training.state["planned_epochs"])
    training.scheduler.load_state_dict(checkpoint["scheduler"])


def _config_fingerprint(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_") and k != "vocab_size"}, sort_keys=True)


def _load_checkpoint(run_dir: Path, config: dict[str, Any]) -> dict | None:
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("config") != _config_fingerprint(config):
        raise ValueError(f"{path} was written by a run with another configuration; delete it or use another --run")
    if checkpoint.get("format", 1) != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was written by an earlier xmodal (checkpoint format {checkpoint.get('format', 1)}, "
                         f"this one reads {CHECKPOINT_FORMAT}): finish that run with the xmodal that started it, "
                         "or delete the checkpoint to train from the start")
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


@torch.no_grad()
def evaluate_rerank(trainee: Trainee, tokenizer: Tokenizer, texts: list[str], image_global: np.ndarray, text_global: np.ndarray,
                    image_keys: list[str], text_keys: list[str], top_n: int = RERANK_TOP_N, chunk: int = 4096) -> dict:
    """Both directions' first stage (the `global` search) with its top N re-ranked by the model's scorer."""
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
