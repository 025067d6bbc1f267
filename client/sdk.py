"""The xmodal client SDK: text or image -> Triton -> Milvus search.

Imports tritonclient, pymilvus, numpy and (for PIL inputs) Pillow; never torch or ray.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from xmodal import settings, store
from xmodal.card import ModelCard
from xmodal.client import triton
from xmodal.client.hits import Hit

# One image: a path, encoded bytes, or a PIL image.
ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Any]

# How many query vectors go into one Milvus search call.
SEARCH_CHUNK = 256


class Client:
    """Embed queries with the served model and search the collection it filled.

    Connecting checks, in order: Triton is reachable and ``embed_image``/``embed_text`` are
    ready (``ConnectionError``); the collection exists (``ValueError`` listing the ones that
    do); it was filled by the served model, same fingerprint (``ValueError`` naming both).

    ``consistency_level``: "Bounded" by default, chosen deliberately. milvus-lite 3.2.2
    ignores the level (a write is visible to the next search, and every level costs the
    same ≈3 ms); on a Milvus server "Strong" makes every search wait for the newest writes
    (≈200 ms measured, DESIGN.md), while "Bounded" lags them by at most a few seconds,
    which suits an index that a separate batch job fills. Pass "Strong" to read your own
    writes on a server.
    """

    def __init__(
        self,
        triton_url: str | None = None,
        milvus_uri: str | os.PathLike | None = None,
        collection: str = settings.IMAGE_COLLECTION,
        *,
        timeout: float = 10.0,
        token: str | None = None,
        consistency_level: str = "Bounded",
    ) -> None:
        self.triton_url = triton.host_port(triton_url or settings.default_triton_url())
        self.milvus_uri = str(milvus_uri or settings.default_milvus_uri())
        self.collection = collection
        self.timeout = timeout
        self.consistency_level = consistency_level
        self._milvus = self._image = self._text = None
        server = triton.connect(self.triton_url, timeout=timeout)
        try:
            self.card: ModelCard = triton.fetch_card(server, triton.IMAGE_MODEL)
            text_card = triton.fetch_card(server, triton.TEXT_MODEL)
        finally:
            server.close()
        if text_card.fingerprint != self.card.fingerprint:
            raise ValueError(
                f"Triton at {self.triton_url} serves different models for images "
                f"({store.describe_model(self.card)}) and text ({store.describe_model(text_card)})")
        try:
            # Embedders keep one HTTP client per thread (see triton.Embedder).
            self._image = triton.Embedder(self.triton_url, triton.IMAGE_MODEL, triton.IMAGE_INPUT, timeout=timeout)
            self._text = triton.Embedder(self.triton_url, triton.TEXT_MODEL, triton.TEXT_INPUT, timeout=timeout)
            self._milvus = self._open_collection(token)
        except BaseException:
            self.close()
            raise

    def _open_collection(self, token: str | None):
        if store.is_local_uri(self.milvus_uri) and not Path(self.milvus_uri).expanduser().exists():
            raise ValueError(f"no milvus-lite database at {self.milvus_uri}; index some data first")
        milvus = store.connect(self.milvus_uri, token=token, timeout=self.timeout)
        try:
            if not milvus.has_collection(self.collection):
                raise ValueError(store.missing_collection_message(milvus, self.collection))
            store.check_collection_model(milvus, self.collection, self.card)
            store.ensure_loaded(milvus, self.collection)
            fields = {f["name"] for f in milvus.describe_collection(self.collection)["fields"]}
            wanted = store.CAPTION_OUTPUT_FIELDS if "caption" in fields else store.IMAGE_OUTPUT_FIELDS
            self._output_fields = [f for f in wanted if f in fields]
        except BaseException:
            milvus.close()
            raise
        return milvus

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        for attribute in ("_milvus", "_image", "_text"):
            resource = getattr(self, attribute, None)
            setattr(self, attribute, None)
            if resource is not None:
                try:
                    resource.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def dim(self) -> int:
        return self.card.dim

    # -- embedding ---------------------------------------------------------------------------

    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """Unit vectors [N, D] for one text or a list of texts."""
        items = [texts] if isinstance(texts, str) else list(texts)
        encoded = []
        for text in items:
            if not isinstance(text, str):
                raise TypeError(f"query text must be a str, got {type(text).__name__}")
            if not text.strip():
                raise ValueError("query text is empty")
            encoded.append(text.encode("utf-8"))
        return self._embed(self._text, encoded, "text")

    def embed_image(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Unit vectors [N, D] for one image or a list (paths, encoded bytes, PIL images)."""
        items = list(images) if _is_image_list(images) else [images]
        return self._embed(self._image, [_image_bytes(image) for image in items], "image")

    def _embed(self, embedder: triton.Embedder, items: list[bytes], what: str) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors, errors = embedder.embed(items)
        for index, error in enumerate(errors):
            if error:
                where = f" {index}" if len(items) > 1 else ""
                raise ValueError(f"Triton rejected {what}{where}: {error}")
        return vectors

    # -- search ------------------------------------------------------------------------------

    def search_text(self, query: str | Sequence[str], k: int = 5) -> list[Hit] | list[list[Hit]]:
        """Hits for one query, or a list of hit lists for a list of queries."""
        _check_k(k)
        vectors = self.embed_text(query)
        return self._search(vectors, k, single=isinstance(query, str))

    def search_image(self, image: ImageLike | Sequence[ImageLike], k: int = 5) -> list[Hit] | list[list[Hit]]:
        _check_k(k)
        vectors = self.embed_image(image)
        return self._search(vectors, k, single=not _is_image_list(image))

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int = 5) -> list[Hit] | list[list[Hit]]:
        """Hits for a vector [D], or a list of hit lists for vectors [N, D]."""
        _check_k(k)
        array = np.asarray(vector, dtype=np.float32)
        if array.ndim not in (1, 2) or array.shape[-1] != self.dim:
            raise ValueError(f"expected a vector of {self.dim} values or an array [N, {self.dim}], "
                             f"got shape {array.shape}")
        return self._search(array.reshape(-1, self.dim), k, single=array.ndim == 1)

    def _search(self, vectors: np.ndarray, k: int, *, single: bool) -> list[Hit] | list[list[Hit]]:
        params = store.search_params(self._milvus, self.collection, self.card.metric, k)
        results: list[list[Hit]] = []
        for start in range(0, len(vectors), SEARCH_CHUNK):
            chunk = vectors[start:start + SEARCH_CHUNK]
            found = self._milvus.search(
                self.collection, data=chunk.tolist(), limit=k, anns_field=store.VECTOR_FIELD,
                output_fields=self._output_fields, search_params=params,
                consistency_level=self.consistency_level, timeout=self.timeout,
            )
            results.extend([Hit.from_milvus(hit) for hit in hits] for hits in found)
        return results[0] if single else results


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


def _image_bytes(image: ImageLike) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        data = Path(image).expanduser().read_bytes()
    elif hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image; Pillow imported only by its owner
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(f"an image is a path, encoded bytes or a PIL image, not {type(image).__name__}")
    if not data:
        raise ValueError("image is empty")
    return data
