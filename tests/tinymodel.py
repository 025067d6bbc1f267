"""A tiny real stack for the indexer and client tests: torch encoders exported to ONNX, a
WordLevel tokenizer, a Triton model repository, a few PNG images and their manifest.

Not a test module; conftest.py builds the session's tiny repository, server and corpus with it,
and tests import it for their own (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import contextlib
import io
import json
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Iterator

from xmodal.card import ImagePreprocessing, ModelCard, TokenizerSpec, fingerprint_files

SIZE = 16
DIM = 8
MAX_LENGTH = 6
WORDS = ["a", "red", "green", "blue", "heart", "face", "smiling", "cat", "dog", "star", "with", "eyes"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "purple": (150, 40, 180), "black": (10, 10, 10)}


def export_encoders(directory: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Untrained but deterministic image and text encoders -> ONNX (global, L2-normalised);
    another `seed`, other weights (another model's fingerprint)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

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


def write_tokenizer(path: Path, words: list[str] = WORDS) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.save(str(path))
    return path


def make_card(fingerprint: str, name: str = "tiny", *, embeddings: dict[str, dict[str, int]] | None = None,
              recipe: str = "test") -> ModelCard:
    return ModelCard(
        name=name, version=1, fingerprint=fingerprint, embeddings=embeddings or {"global": {"dim": DIM}},
        metric="IP", image=ImagePreprocessing(size=SIZE, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
        tokenizer=TokenizerSpec(kind="wordlevel", file="tokenizer.json", vocab_hash="test", max_length=MAX_LENGTH),
        recipe=recipe)


def build_repository(directory: Path, *, max_batch_size: int = 8, seed: int = 0) -> tuple[ModelCard, Path]:
    from xmodal.export.repository import write_model_repository

    image_onnx, text_onnx = export_encoders(directory, seed=seed)
    tokenizer_json = write_tokenizer(directory / "tokenizer.json")
    card = make_card(fingerprint_files([image_onnx, text_onnx]))
    repository = write_model_repository(
        directory / "model_repository", card, image_onnx=image_onnx, text_onnx=text_onnx,
        tokenizer_json=tokenizer_json, max_batch_size=max_batch_size)
    return card, repository


# -- a two-level (MT-HCN-style) model -----------------------------------------------------------

# Levels as the mthcn recipe has them, on the small CNN and text CNN; `global` is their fusion.
HIERARCHICAL_CONFIG = {
    "recipe": "mthcn", "image_encoder": "small_cnn", "text_encoder": "small_text_cnn",
    "levels": {"concept": "pooled", "exterior": "mid"}, "fusion": {"concept": 0.5, "exterior": 0.5},
    "dim": DIM, "head_layers": 1, "head_hidden": 16,
}
# write_corpus's captions[0] ("red ellipse", ...) in words the hierarchical tokenizer knows.
HIERARCHICAL_WORDS = WORDS + [name for name in COLOURS if name not in WORDS] + ["ellipse", "rectangle"]


def build_hierarchical_repository(directory: Path, pairs: list[tuple[Path, str]], *, max_batch_size: int = 8,
                                  steps: int = 150) -> tuple[ModelCard, Path]:
    """A two-level model fitted to `pairs` (image file, caption), exported and written as a repository.

    Fitted so that each caption's own image comes first at every level (checked here): a
    level-weighted search then has a right answer to find. The images go through the
    server's own preprocessing, the captions through the served tokenizer.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    from xmodal.export.onnx import export_encoder
    from xmodal.export.repository import write_model_repository
    from xmodal.preprocessing import preprocess_image_bytes
    from xmodal.training.models import DualEncoder, ServedTower, embedding_dims

    torch.manual_seed(0)
    tokenizer_json = write_tokenizer(directory / "tokenizer.json", HIERARCHICAL_WORDS)
    config = {**HIERARCHICAL_CONFIG, "vocab_size": len(HIERARCHICAL_WORDS) + 2}
    dims = embedding_dims(config)
    card = make_card("0" * 16, "tiny-mthcn", embeddings={name: {"dim": dim} for name, dim in dims.items()},
                     recipe="mthcn")
    pixels = torch.from_numpy(np.stack([
        preprocess_image_bytes(Path(image).read_bytes(), SIZE, card.image.mean, card.image.std, card.image.background)
        for image, _ in pairs]))
    encodings = Tokenizer.from_file(str(tokenizer_json)).encode_batch([caption for _, caption in pairs])
    length = max(len(e.ids) for e in encodings)
    ids = torch.tensor([e.ids + [0] * (length - len(e.ids)) for e in encodings])

    model = DualEncoder(config)
    model.eval()  # batch norm on its initial statistics: the served model normalises exactly as the fitted one
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = torch.arange(len(pairs))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend, and a busy machine makes that far slower
    try:
        for _ in range(steps):
            images, texts = model.image(pixels), model.text(ids)
            loss = sum(F.cross_entropy(images[level] @ texts[level].T / 0.1, target)
                       + F.cross_entropy(texts[level] @ images[level].T / 0.1, target) for level in config["levels"])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            images, texts = model.image(pixels), model.text(ids)
    finally:
        torch.set_num_threads(threads)
    for level in config["levels"]:
        if not torch.equal((texts[level] @ images[level].T).argmax(dim=1), target):
            raise RuntimeError(f"the tiny hierarchical model did not fit its {len(pairs)} pairs at level {level!r}")

    image_onnx, text_onnx = directory / "image.onnx", directory / "text.onnx"
    export_encoder(ServedTower(model.image, config), torch.randn(2, 3, SIZE, SIZE), image_onnx, "pixel_values",
                   {0: "batch"})
    export_encoder(ServedTower(model.text, config), torch.ones(2, 5, dtype=torch.long), text_onnx, "input_ids",
                   {0: "batch", 1: "sequence"})
    card.fingerprint = fingerprint_files([image_onnx, text_onnx])
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
def serving(repository: Path, *, stop_timeout: float = 10) -> Iterator[object]:
    """The real tritonserver on `repository`, ready; stopped on leaving (SIGTERM, and SIGKILL
    after `stop_timeout` s: 0 kills it at once)."""
    from xmodal.server import TritonServer

    http_port, grpc_port, metrics_port = free_ports(3)
    server = TritonServer(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    server.start()
    try:
        server.wait_ready(timeout=90)
        yield server
    finally:
        server.stop(stop_timeout)


def write_png(path: Path, colour: tuple[int, int, int], shape: str = "ellipse", size: int = 24) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = (2, 3, size - 3, size - 2)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=colour + (255,))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def png(directory: Path, name: str, shape: str = "ellipse") -> bytes:
    """The bytes of `directory`/`name`.png, a shape in one of COLOURS."""
    return write_png(directory / f"{name}.png", COLOURS[name], shape).read_bytes()


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


# A corpus with enough concepts that chance recall is low (R@1 1/40, R@10 1/4 on the held-out
# style) and a model must learn colour and shape to retrieve: every colour in every shape.
SHAPE_COLOURS = dict(COLOURS, orange=(250, 140, 20), grey=(128, 128, 128))
SHAPES = ("circle", "square", "triangle", "diamond", "bar")
# style → (split, margin of the shape's box, outline width): the test style sits between the
# trained ones in size and has an outline; "delta", marked for training, is the one a run holds
# out as its validation style (validation_style="delta").
SHAPE_STYLES = {"alpha": ("train", 3, 0), "beta": ("train", 8, 0), "delta": ("train", 6, 1), "gamma": ("test", 5, 2)}
SHAPES_VALIDATION_STYLE = "delta"


def draw_shape(path: Path, shape: str, colour: tuple[int, int, int], *, margin: int, outline: int,
               size: int = 32) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    low, high, mid = margin, size - 1 - margin, (size - 1) / 2
    style = dict(fill=colour, outline=(0, 0, 0) if outline else None, width=outline)
    if shape == "circle":
        draw.ellipse((low, low, high, high), **style)
    elif shape == "square":
        draw.rectangle((low, low, high, high), **style)
    elif shape == "bar":
        draw.rectangle((low, mid - 3, high, mid + 3), **style)
    else:
        points = ([(mid, low), (high, high), (low, high)] if shape == "triangle"
                  else [(mid, low), (high, mid), (mid, high), (low, mid)])
        draw.polygon(points, fill=colour, outline=style["outline"], width=max(outline, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def write_shapes_manifest(directory: Path, *, shuffle_trained_captions: bool = False) -> Path:
    """Every SHAPE_COLOURS colour in every SHAPES shape, drawn in each SHAPE_STYLES style.

    ``shuffle_trained_captions`` permutes the captions of the trained styles' rows among them
    (the held-out rows keep theirs): a model trained on it has nothing to learn, as with a
    broken loss or shuffled labels."""
    import random

    records = []
    for style, (split, margin, outline) in SHAPE_STYLES.items():
        for colour_name, colour in SHAPE_COLOURS.items():
            for shape in SHAPES:
                concept = f"{colour_name}_{shape}"
                draw_shape(directory / "images" / style / f"{concept}.png", shape, colour, margin=margin,
                           outline=outline)
                records.append({"id": f"{style}/{concept}", "concept": concept, "style": style, "split": split,
                                "image": f"images/{style}/{concept}.png",
                                "captions": [f"{colour_name} {shape}", f"a {colour_name} {shape}"]})
    if shuffle_trained_captions:
        trained = [r for r in records if r["split"] == "train"]
        captions = [r["captions"] for r in trained]
        random.Random(0).shuffle(captions)
        for row, shuffled in zip(trained, captions):
            row["captions"] = shuffled
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def record(directory_relative_image: str, concept: str, *, style: str = "tiny", split: str = "test") -> dict:
    return {"id": f"{style}/{concept}", "concept": concept, "style": style, "split": split,
            "image": directory_relative_image, "captions": [f"{concept} thing"]}


@contextlib.contextmanager
def web_page(client) -> Iterator[object]:
    """`xmodal web` over `client` on a free port of 127.0.0.1, serving from a thread until left."""
    import threading

    from xmodal.client.web import make_server

    server = make_server(client, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# ---- shared by the indexer tests: WebDataset shards, killing a run part-way ---------------


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A WebDataset tar: each sample's files as ``<key>.<ext>`` members."""
    with tarfile.open(path, "w") as archive:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


class RunBooks:
    """The progress and dead letters the indexer keeps of `collection` in `uri` (files beside a
    milvus-lite database, rows of a server's xmodal_books), read as another process would."""

    def __init__(self, uri, collection: str):
        from xmodal import store
        from xmodal.indexer import state

        self.client = None if store.is_local_uri(str(uri)) else store.connect(str(uri))
        self.records = state.run_records(str(uri), collection, self.client)

    def progress(self) -> dict | None:
        try:
            return self.records.read_progress()
        except ValueError:
            return None

    def finished_shards(self) -> int:
        return len((self.progress() or {}).get("finished", []))

    def letters(self) -> list[dict]:
        return self.records.letters()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> "RunBooks":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def run_progress(uri, collection: str) -> dict | None:
    with RunBooks(uri, collection) as books:
        return books.progress()


def run_letters(uri, collection: str) -> list[dict]:
    with RunBooks(uri, collection) as books:
        return books.letters()


def kill_part_way(command: list[str], uri, collection: str, log_path: Path) -> dict:
    """Run `command`, SIGKILL it once its progress records a finished shard; the progress then."""
    with open(log_path, "wb") as log, RunBooks(uri, collection) as books:
        run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not books.finished_shards() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        run.send_signal(signal.SIGKILL)
        run.wait()
        return books.progress()


def many_images(directory: Path, count_: int, bad_every: int) -> Path:
    """`count_` distinct PNGs and a manifest of them, every `bad_every`-th one a file that is no image."""
    records = []
    for i in range(count_):
        relative = f"images/many/{i:04d}.png"
        if i % bad_every == bad_every - 1:
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / relative).write_bytes(b"not an image %d" % i)
        else:
            # 97 is odd: past 256 images the second channel tells images of the same first apart
            write_png(directory / relative, (i % 256, (255 - i % 256 + 97 * (i // 256)) % 256, (i * 7) % 256),
                                "ellipse" if i % 2 else "rectangle")
        records.append(record(relative, f"c{i:04d}"))
    manifest = directory / "many.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def decoded(row: dict) -> dict:
    """A row as Milvus returns it, its JSON lists (captions, paths) as plain lists."""
    from xmodal import contract

    return {name: contract.decode_string_list(value) if name in ("captions", "paths") else value
            for name, value in row.items()}
