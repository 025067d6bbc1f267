"""Search results."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from xmodal.contract import CollectionKind


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # the collection's metric: inner product (cosine on unit vectors) for xmodal models
    image: str
    captions: list[str]
    concept: str
    style: str
    # An image's file (``xmodal.contract.FILE_FIELDS``); defaults for a caption, or an image of a
    # collection made before they were kept.
    relative_path: str = ""
    folder: str = ""
    size: int = 0
    mtime: int = 0
    width: int = 0
    height: int = 0
    # every file of these bytes (`image` is the first); [] for a caption
    paths: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        """What names the hit: its first caption, or for an image indexed without captions (a
        folder of images) its file's name."""
        return self.captions[0] if self.captions else PurePath(self.image).name

    @classmethod
    def from_milvus(cls, hit: dict[str, Any], kind: CollectionKind) -> "Hit":
        """A Milvus search hit of a collection of `kind` (its entity decoded as the kind says)."""
        entity = hit.get("entity") or {}
        return cls(id=str(hit.get("id", entity.get("id", ""))), score=float(hit.get("distance", 0.0)),
                   **kind.hit(entity))
