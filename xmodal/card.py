"""The model card: the contract between training, export, serving, the indexer and the client.

Export writes it; every other part reads dimensions, preprocessing and tokenizer settings
from it and from nowhere else. The fingerprint is a hash of the exported ONNX files, so a
collection filled by one model can never be queried with another by accident.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_FILENAME = "card.json"
# The key under which the card travels in a Triton config's `parameters`.
CARD_PARAMETER = "xmodal_card"


@dataclass
class ImagePreprocessing:
    size: int
    mean: list[float]
    std: list[float]
    # RGBA images (emoji, icons) are composited onto this colour before normalising.
    background: list[int] = field(default_factory=lambda: [255, 255, 255])


@dataclass
class TokenizerSpec:
    kind: str  # "wordlevel" (HF tokenizers WordLevel, learnt from the captions) or "wordpiece" (MiniLM's)
    file: str  # the tokenizer.json, relative to the card's directory
    vocab_hash: str
    max_length: int
    pad_id: int = 0


@dataclass
class SideTensor:
    """One tensor of a re-ranker's image side, per image (no batch axis)."""

    shape: list[int]
    dtype: str = "float32"


@dataclass
class RerankerSpec:
    """A pair scorer's second stage (CRAN, MCSM): what export wrote and checked, and what the
    side store and the client need."""

    kind: str  # "cran" or "mcsm"
    files: list[str]  # the image-side ONNX file, then the re-ranker's, beside the card
    # of those two files: the side store refuses sides computed by another re-ranker
    fingerprint: str
    side: dict[str, SideTensor]  # tensor name (contract.side_tensor) -> shape per image, in the files' order
    top_n: int  # the first-stage hits it was evaluated re-ranking
    parity_max_abs_diff: dict[str, float] = field(default_factory=dict)  # "image_side", "rerank"
    inputs: dict[str, list[str]] = field(default_factory=dict)  # by file name
    outputs: dict[str, list[str]] = field(default_factory=dict)
    opset: int | None = None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each side tensor's shape per image."""
        return {name: tuple(int(d) for d in tensor.shape) for name, tensor in self.side.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RerankerSpec":
        fields = dict(data)
        fields["side"] = {name: SideTensor(**tensor) for name, tensor in fields["side"].items()}
        return cls(**fields)


@dataclass
class ModelCard:
    name: str
    version: int
    fingerprint: str
    # embedding output name -> {"dim": int}; "global" always, "concept"/"exterior" for hierarchical models
    embeddings: dict[str, dict[str, int]]
    metric: str  # Milvus metric type the vectors are meant for: "IP" on L2-normalised vectors
    image: ImagePreprocessing
    tokenizer: TokenizerSpec
    recipe: str
    training_data: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    reranker: RerankerSpec | None = None  # a pair scorer's second stage (CRAN, MCSM), or None

    @property
    def dim(self) -> int:
        return self.embeddings["global"]["dim"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, directory: str | Path, filename: str = CARD_FILENAME) -> Path:
        path = Path(directory) / filename
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        try:
            fields = dict(data)
            fields["image"] = ImagePreprocessing(**fields["image"])
            fields["tokenizer"] = TokenizerSpec(**fields["tokenizer"])
            if fields.get("reranker") is not None:
                fields["reranker"] = RerankerSpec.from_dict(fields["reranker"])
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid xmodal model card: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model card is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILENAME
        if not path.exists():
            raise FileNotFoundError(f"no model card at {path}")
        return cls.from_json(path.read_text())


def fingerprint_files(paths: list[str | Path]) -> str:
    """A short, stable hash over the files' contents, independent of their order."""
    digests = sorted(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]
