"""A tiny real stack for the indexer and client tests: torch encoders exported to ONNX, a
WordLevel tokenizer, a Triton model repository, a few PNG images and their manifest.

Not a test module; test_indexer.py and test_client.py import it (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Iterator

from xmodal.card import ImagePreprocessing, ModelCard, TokenizerSpec, fingerprint_files

SIZE = 16
DIM = 8
MAX_LENGTH = 6
WORDS = ["a", "red", "green", "blue", "heart", "face", "smiling", "cat", "dog", "star", "with", "eyes"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "purple": (150, 40, 180), "black": (10, 10, 10)}


def export_encoders(directory: Path) -> tuple[Path, Path]:
    """Untrained but deterministic image and text encoders -> ONNX (global, L2-normalised)."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class ImageEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.head = nn.Linear(64, DIM)

        def forward(self, pixel_values):
            features = self.pool(torch.tanh(self.conv(pixel_values))).flatten(1)
            return nn.functional.normalize(self.head(features), dim=-1)

    class TextEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(len(WORDS) + 2, 16, padding_idx=0)
            self.head = nn.Linear(16, DIM)

        def forward(self, input_ids):
            mask = (input_ids != 0).unsqueeze(-1).float()
            pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return nn.functional.normalize(self.head(pooled), dim=-1)

    image_path, text_path = directory / "image.onnx", directory / "text.onnx"
    batch = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            ImageEncoder().eval(), (torch.randn(2, 3, SIZE, SIZE),), str(image_path), dynamo=False,
            input_names=["pixel_values"], output_names=["global"],
            dynamic_axes={"pixel_values": batch, "global": batch})
        torch.onnx.export(
            TextEncoder().eval(), (torch.tensor([[2, 3, 0], [4, 5, 6]]),), str(text_path), dynamo=False,
            input_names=["input_ids"], output_names=["global"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "global": batch})
    return image_path, text_path


def write_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.save(str(path))
    return path


def make_card(fingerprint: str, name: str = "tiny") -> ModelCard:
    return ModelCard(
        name=name, version=1, fingerprint=fingerprint, embeddings={"global": {"dim": DIM}}, metric="IP",
        image=ImagePreprocessing(size=SIZE, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
        tokenizer=TokenizerSpec(kind="wordlevel", file="tokenizer.json", vocab_hash="test", max_length=MAX_LENGTH),
        recipe="test")


def build_repository(directory: Path, *, max_batch_size: int = 8) -> tuple[ModelCard, Path]:
    from xmodal.export.repository import write_model_repository

    image_onnx, text_onnx = export_encoders(directory)
    tokenizer_json = write_tokenizer(directory / "tokenizer.json")
    card = make_card(fingerprint_files([image_onnx, text_onnx]))
    repository = write_model_repository(
        directory / "model_repository", card, image_onnx=image_onnx, text_onnx=text_onnx,
        tokenizer_json=tokenizer_json, max_batch_size=max_batch_size)
    return card, repository


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def serving(repository: Path) -> Iterator[object]:
    from xmodal.server import TritonServer

    http_port, grpc_port, metrics_port = free_ports(3)
    server = TritonServer(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    server.start()
    try:
        server.wait_ready(timeout=90)
        yield server
    finally:
        server.stop()


def write_png(path: Path, colour: tuple[int, int, int], shape: str = "ellipse", size: int = 24) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = (2, 3, size - 3, size - 2)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=colour + (255,))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def write_corpus(directory: Path, *, style: str = "tiny", split: str = "test",
                 extra: list[dict] | None = None) -> tuple[Path, list[Path]]:
    """One PNG per colour (distinct content) and a manifest for them; `extra` records are appended."""
    images, records = [], []
    for index, (name, colour) in enumerate(COLOURS.items()):
        shape = "ellipse" if index % 2 == 0 else "rectangle"
        path = write_png(directory / "images" / style / f"{name}.png", colour, shape)
        images.append(path)
        records.append({"id": f"{style}/{name}", "concept": name, "style": style, "split": split,
                        "image": f"images/{style}/{name}.png",
                        "captions": [f"{name} {shape}", f"a {name} {'face' if shape == 'ellipse' else 'star'}"],
                        "group": "colours", "subgroup": shape})
    records += extra or []
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest, images


def record(directory_relative_image: str, concept: str, *, style: str = "tiny", split: str = "test") -> dict:
    return {"id": f"{style}/{concept}", "concept": concept, "style": style, "split": split,
            "image": directory_relative_image, "captions": [f"{concept} thing"]}
