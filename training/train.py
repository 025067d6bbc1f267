"""The training loop: manifest → cached image tensors → contrastive training → checkpoint + evaluation.

A run directory holds everything export needs: `model.safetensors` (weights only, a safe
format), `config.json` (the recipe with overrides), `tokenizer.json`, `eval.json`.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from xmodal.preprocessing import decode_image, image_to_array
from xmodal.training.evaluate import evaluate_retrieval, format_metrics
from xmodal.training.losses import InfoNCELoss
from xmodal.training.manifest import ManifestRow, read_manifest
from xmodal.training.models import DualEncoder
from xmodal.training.recipes import recipe_config
from xmodal.training.tokenizer import PAD_ID, load_tokenizer, train_wordlevel_tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EVAL_FILE = "eval.json"


@dataclass
class ImageSet:
    """Decoded, normalised images held in memory, with the rows they came from."""

    pixels: torch.Tensor  # [N, 3, S, S] float32
    rows: list[ManifestRow]
    skipped: list[tuple[str, str]]  # (image path, reason)


def load_images(rows: Sequence[ManifestRow], config: dict[str, Any], *, desc: str = "decode") -> ImageSet:
    """Decode every row's image once; an unreadable image is skipped and recorded, never fatal."""
    arrays, kept, skipped = [], [], []
    for row in tqdm(rows, desc=desc, unit="img", leave=False):
        try:
            image = decode_image(Path(row.image).read_bytes())
        except (OSError, ValueError) as exc:
            skipped.append((str(row.image), str(exc)))
            continue
        arrays.append(
            image_to_array(
                image, config["image_size"], config["image_mean"], config["image_std"], config["image_background"]
            )
        )
        kept.append(row)
    if not arrays:
        raise ValueError(f"no decodable images among {len(rows)} rows")
    return ImageSet(torch.from_numpy(np.stack(arrays)), kept, skipped)


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids padded with PAD_ID to the batch's longest caption."""
    encodings = tokenizer.encode_batch(list(texts))
    length = max(1, max(len(e.ids) for e in encodings))
    ids = torch.full((len(encodings), length), PAD_ID, dtype=torch.long)
    for i, encoding in enumerate(encodings):
        ids[i, : len(encoding.ids)] = torch.tensor(encoding.ids, dtype=torch.long)
    return ids


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


@torch.no_grad()
def embed_images(model: DualEncoder, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model.image(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]).numpy()


@torch.no_grad()
def embed_texts(model: DualEncoder, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
    model.eval()
    return torch.cat(
        [model.text(tokenize(tokenizer, texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    ).numpy()


def evaluate_model(model: DualEncoder, tokenizer: Tokenizer, images: ImageSet) -> dict:
    """Each image against the label captions (captions[0]) of the same set; a concept's label is its match."""
    image_emb = embed_images(model, images.pixels)
    keys = [row.concept for row in images.rows]
    labels = {row.concept: row.captions[0] for row in images.rows}
    text_keys = list(labels)
    text_emb = embed_texts(model, tokenizer, [labels[k] for k in text_keys])
    return evaluate_retrieval(image_emb, text_emb, keys, text_keys)


def train(
    manifest: str | Path,
    run_dir: str | Path,
    *,
    recipe: str = "infonce",
    progress: bool = True,
    **overrides: Any,
) -> dict:
    """Train a recipe on the manifest's train split, evaluate on its test split, save the run."""
    config = recipe_config(recipe, **overrides)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config["seed"])
    rng = random.Random(config["seed"])
    generator = torch.Generator().manual_seed(config["seed"])

    train_rows = read_manifest(manifest, split="train")
    test_rows = read_manifest(manifest, split="test")
    if not train_rows:
        raise ValueError(f"{manifest} has no rows in the train split")
    train_set = load_images(train_rows, config, desc="decode train")
    test_set = load_images(test_rows, config, desc="decode test") if test_rows else None

    tokenizer = train_wordlevel_tokenizer(
        (caption for row in train_set.rows for caption in row.captions), max_length=config["max_length"]
    )
    config["vocab_size"] = tokenizer.get_vocab_size()
    model = DualEncoder(config)
    loss_fn = InfoNCELoss()
    optimizer = torch.optim.AdamW(
        list(model.parameters()) + list(loss_fn.parameters()), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    steps_per_epoch = max(1, len(concept_batches(train_set.rows, config["batch_size"], random.Random(0))))
    total_steps = config["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )

    deadline = time.monotonic() + 60.0 * config["minutes"]
    started = time.monotonic()
    bar = tqdm(total=total_steps, desc=f"train {recipe}", unit="step", disable=not progress)
    step, losses = 0, []
    for _epoch in range(config["epochs"]):
        model.train()
        for batch in concept_batches(train_set.rows, config["batch_size"], rng):
            pixels = train_set.pixels[batch]
            if config["augment"]:
                pixels = random_affine(pixels, generator)
            captions = [rng.choice(train_set.rows[i].captions) for i in batch]
            loss = loss_fn(model.image(pixels), model.text(tokenize(tokenizer, captions)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", T=f"{1 / loss_fn.logit_scale.exp().item():.3f}")
        if time.monotonic() > deadline:
            break
    bar.close()
    train_seconds = time.monotonic() - started

    report: dict[str, Any] = {
        "recipe": recipe,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "train_images": len(train_set.rows),
        "skipped_images": train_set.skipped + (test_set.skipped if test_set else []),
        "train_styles": sorted({row.style for row in train_set.rows}),
    }
    if test_set is not None:
        report["test_styles"] = sorted({row.style for row in test_set.rows})
        report["test_images"] = len(test_set.rows)
        report["test"] = evaluate_model(model, tokenizer, test_set)

    save_file(model.state_dict(), str(run_dir / WEIGHTS_FILE))
    (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(run_dir / TOKENIZER_FILE))
    (run_dir / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if progress:
        print(f"trained {step} steps in {train_seconds:.0f} s; final loss {report['final_loss']:.3f}")
        if "test" in report:
            print(f"held-out {report['test_styles']} ({report['test_images']} images):")
            print(format_metrics(report["test"]))
    return report


def load_run(run_dir: str | Path) -> tuple[DualEncoder, Tokenizer, dict[str, Any]]:
    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a training run: no {WEIGHTS_FILE}")
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    model = DualEncoder(config)
    model.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
    model.eval()
    return model, load_tokenizer(run_dir / TOKENIZER_FILE), config
