"""Encoders to ONNX with dynamic axes, checked against PyTorch, and the model card that describes them."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from xmodal.card import ImagePreprocessing, ModelCard, TokenizerSpec, fingerprint_files
from xmodal.training.models import ServedTower, embedding_dims
from xmodal.training.tokenizer import PAD_ID, max_length, vocab_hash
from xmodal.training.train import EVAL_FILE, TOKENIZER_FILE, load_run

OPSET = 17
PARITY_TOLERANCE = 1e-4
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass
class ExportedModel:
    directory: Path
    card: ModelCard
    image_onnx: Path
    text_onnx: Path
    tokenizer_json: Path
    parity: dict[str, float]


def export_encoder(module: ServedTower, example: torch.Tensor, path: Path, input_name: str, dynamic: dict[int, str]) -> None:
    module.eval()
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=module.output_names,
        dynamic_axes={input_name: dynamic, **{name: {0: "batch"} for name in module.output_names}},
        opset_version=OPSET,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))


def max_abs_diff(module: ServedTower, path: Path, input_name: str, inputs: torch.Tensor) -> float:
    """The largest difference between ONNX Runtime and PyTorch over every output."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = [output.numpy() for output in module(inputs)]
    actual = session.run(module.output_names, {input_name: inputs.numpy()})
    return max(float(np.max(np.abs(a - e))) for a, e in zip(actual, expected))


def export_run(run_dir: str | Path, out_dir: str | Path, *, name: str | None = None, version: int = 1) -> ExportedModel:
    """Export a training run's encoders, assert parity with PyTorch, write the card beside them."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, tokenizer, config = load_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = config["image_size"]
    length = max_length(tokenizer)
    generator = torch.Generator().manual_seed(0)

    image_tower, text_tower = ServedTower(model.image, config), ServedTower(model.text, config)
    image_path, text_path = out_dir / IMAGE_ONNX, out_dir / TEXT_ONNX
    export_encoder(image_tower, torch.randn(2, 3, size, size), image_path, "pixel_values", {0: "batch"})
    export_encoder(
        text_tower, torch.ones(2, 5, dtype=torch.long), text_path, "input_ids", {0: "batch", 1: "sequence"}
    )

    # Parity on batch sizes and lengths other than the traced ones, with padding present.
    text_ids = torch.randint(1, config["vocab_size"], (7, length), generator=generator)
    text_ids[3:, length // 2 :] = PAD_ID
    parity = {
        "image_encoder": max_abs_diff(image_tower, image_path, "pixel_values", torch.randn(5, 3, size, size, generator=generator)),
        "text_encoder": max_abs_diff(text_tower, text_path, "input_ids", text_ids),
    }
    for encoder, diff in parity.items():
        if not diff <= PARITY_TOLERANCE:
            raise ParityError(f"{encoder}: ONNX Runtime differs from PyTorch by {diff:.2e} > {PARITY_TOLERANCE:.0e}")

    tokenizer_path = out_dir / TOKENIZER_FILE
    shutil.copyfile(run_dir / TOKENIZER_FILE, tokenizer_path)
    evaluation = json.loads((run_dir / EVAL_FILE).read_text()) if (run_dir / EVAL_FILE).exists() else {}
    card = ModelCard(
        name=name or f"xmodal-{config['recipe']}",
        version=version,
        fingerprint=fingerprint_files([image_path, text_path]),
        embeddings={name: {"dim": dim} for name, dim in embedding_dims(config).items()},
        metric="IP",
        image=ImagePreprocessing(
            size=size, mean=list(config["image_mean"]), std=list(config["image_std"]),
            background=list(config["image_background"]),
        ),
        tokenizer=TokenizerSpec(
            kind="wordlevel", file=TOKENIZER_FILE, vocab_hash=vocab_hash(tokenizer), max_length=length, pad_id=PAD_ID
        ),
        recipe=config["recipe"],
        training_data={
            key: evaluation[key] for key in ("train_styles", "train_images", "test_styles", "test_images") if key in evaluation
        },
        evaluation={"held_out": _without_curves(evaluation.get("test", {})), "onnx_parity_max_abs_diff": parity},
    )
    card.save(out_dir)
    return ExportedModel(out_dir, card, image_path, text_path, tokenizer_path, parity)


def _without_curves(report: dict) -> dict:
    """The card keeps the headline figures; the full Recall@K curves stay in the run's eval.json."""
    return {output: {k: v for k, v in metrics.items() if k != "curve"} for output, metrics in report.items()}
