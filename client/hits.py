"""Search results."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xmodal.store import decode_captions


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # the collection's metric: inner product (cosine on unit vectors) for xmodal models
    image: str
    captions: list[str]
    concept: str
    style: str

    @classmethod
    def from_milvus(cls, hit: dict[str, Any]) -> "Hit":
        entity = hit.get("entity") or {}
        # The caption collection holds one caption a row; show it as the hit's only caption.
        captions = [entity["caption"]] if "caption" in entity else decode_captions(entity.get("captions"))
        return cls(
            id=str(hit.get("id", entity.get("id", ""))),
            score=float(hit.get("distance", 0.0)),
            image=str(entity.get("image", "")),
            captions=captions,
            concept=str(entity.get("concept", "")),
            style=str(entity.get("style", "")),
        )
