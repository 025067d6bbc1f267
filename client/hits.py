"""Search results."""
from __future__ import annotations

from dataclasses import dataclass
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

    @classmethod
    def from_milvus(cls, hit: dict[str, Any], kind: CollectionKind) -> "Hit":
        """A Milvus search hit of a collection of `kind` (its entity decoded as the kind says)."""
        entity = hit.get("entity") or {}
        return cls(id=str(hit.get("id", entity.get("id", ""))), score=float(hit.get("distance", 0.0)),
                   **kind.hit(entity))
