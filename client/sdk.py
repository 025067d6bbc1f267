"""The xmodal client SDK: text or image -> Triton -> Milvus search.

Imports tritonclient, pymilvus, numpy and (for PIL inputs) Pillow; never torch or ray.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from xmodal import contract, settings, store
from xmodal.card import ModelCard
from xmodal import triton
from xmodal.client.hits import Hit
from xmodal.client.rerank import Reranker, open_reranker, rerank_depth
from xmodal.retry import DEFAULT_RETRY, Retry
from xmodal.client.searcher import Searcher, check_k, check_level_weights

# One image: a path, encoded bytes, or a PIL image.
ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Any]

CAPTION_HINT = 'index captions first (xmodal index --captions; in Python xmodal.indexer.IndexJob(kind="caption"))'


class Client:
    """Embed queries with the served model and search the collections it filled.

    Two collections: ``collection`` (images, searched by ``search_text``, ``search_image``
    and ``search_vector``) and ``caption_collection`` (captions, searched by
    ``search_captions``: image -> captions). The first is opened and checked when the client
    connects; the caption collection only on the first ``search_captions`` call, so a client
    works where only images were indexed. Pass ``caption_collection=None`` to have none.

    Connecting checks, in order: Triton is reachable and ``embed_image``/``embed_text`` are
    ready (``ConnectionError``); the collection exists (``ValueError`` listing the ones that
    do); it was filled by the served model, same fingerprint (``ValueError`` naming both).

    Every search takes ``filter``, a Milvus boolean expression on the scalar fields
    (``style == "openmoji"``, ``concept in ["1f600", "1f601"]``, ``style != "google" and
    concept like "1f6%"``); one the server refuses raises ``ValueError`` naming the
    expression and the server's reason. ``xmodal.store.equals_filter(field, value)`` quotes a
    value for you.

    ``timeout`` (seconds) bounds each Triton request and each Milvus call. Triton calls that
    fail transiently (connection refused or reset, HTTP 503) are retried with exponential
    backoff as ``retry`` says (``xmodal.client.Retry``; ``Retry(attempts=1)`` turns retries
    off); when they keep failing the call raises ``ConnectionError``. ``triton_url`` may name
    several servers of the same model (a list, or one string with commas): a call goes to the
    first that answers, and a server that keeps failing is asked last from then on; only when
    none answers does the call raise ``ConnectionError``, naming each. Bad input (HTTP 4xx) is
    never retried: it raises ``ValueError`` at once. Each thread gets its own HTTP connection
    to Triton, reused for its calls, so one client may serve many threads.

    ``level_weights`` (hierarchical models, whose cards name the levels "concept" and
    "exterior" besides "global"): every search ranks by the model's fused "global" vector
    unless given weights such as ``{"concept": 0.7, "exterior": 0.3}``; then a hit's score
    is ``Σ w_l · cos(query_l, row_l) / Σ w_l`` over the levels, from one Milvus search per
    level merged by that rule (docs/indexing.md, "Level weights", has the exact rule). Unknown
    levels, negative or non-numeric weights, and all-zero weights raise ``ValueError``.

    ``consistency_level``: "Bounded" by default, chosen deliberately; what a search sees
    right after an insert (measured by benchmarks/query.py, docs/query-benchmark.md,
    "Visibility"):

    - milvus-lite 2.5.1 (the pinned store) ignores the level: every level costs the same,
      and a row inserted just before is seen soon after, but not guaranteed to the very
      next search.
    - a Milvus server: "Strong" makes every search wait for the newest writes; "Bounded"
      may miss writes of the last few seconds, which suits an index that a separate batch
      job fills. Pass "Strong" to read your own writes there.

    The index type of each collection's vector fields is read once, when the collection is
    opened; searches do not describe the index again (a round trip per search saved, and on
    a store that counts its rows to describe an index, that count).
    """

    def __init__(
        self,
        triton_url: str | Sequence[str] | None = None,
        milvus_uri: str | os.PathLike | None = None,
        collection: str = settings.IMAGE_COLLECTION,
        *,
        caption_collection: str | None = settings.CAPTION_COLLECTION,
        timeout: float = 10.0,
        token: str | None = None,
        consistency_level: str = "Bounded",
        retry: Retry = DEFAULT_RETRY,
    ) -> None:
        # several servers of one model: asked in turn, one that stops answering set aside
        self.triton_urls = triton.triton_urls(triton_url or settings.default_triton_url())
        self.triton_url = self.triton_urls[0]
        self.milvus_uri = str(milvus_uri or settings.default_milvus_uri())
        self.collection = collection
        self.caption_collection = caption_collection
        self.timeout = timeout
        self.token = token
        self.consistency_level = consistency_level
        self.retry = retry
        self._searcher = self._image = self._text = self._reranker = None
        server = triton.connect_any(self.triton_urls, timeout=timeout, retry=retry)
        try:
            self.card: ModelCard = triton.fetch_card(server, contract.EMBED_IMAGE)
            text_card = triton.fetch_card(server, contract.EMBED_TEXT)
        finally:
            server.close()
        check_cards(self.triton_url, self.card, text_card)
        levels = store.card_levels(self.card)
        try:
            # Embedders keep one HTTP client per thread (see triton.Embedder).
            self._image = triton.Embedder(self.triton_urls, contract.EMBED_IMAGE, contract.IMAGE_INPUT,
                                          timeout=timeout, retry=retry, outputs=levels)
            self._text = triton.Embedder(self.triton_urls, contract.EMBED_TEXT, contract.TEXT_INPUT,
                                         timeout=timeout, retry=retry, outputs=levels)
            self._searcher = Searcher(self.milvus_uri, self.card, token=token, timeout=timeout,
                                      consistency_level=consistency_level)
            self._searcher.open(self.collection)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        for attribute in ("_searcher", "_image", "_text", "_reranker"):
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

    @property
    def searcher(self) -> Searcher:
        """The Milvus side (row look-ups and distinct values for the web page)."""
        if self._searcher is None:
            raise RuntimeError("the client is closed")
        return self._searcher

    # -- embedding ---------------------------------------------------------------------------

    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """Unit vectors [N, D] for one text or a list of texts (the "global" embedding)."""
        return self.embed_text_levels(texts, [contract.GLOBAL])[contract.GLOBAL]

    def embed_image(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Unit vectors [N, D] for one image or a list (paths, encoded bytes, PIL images)."""
        return self.embed_image_levels(images, [contract.GLOBAL])[contract.GLOBAL]

    def embed_text_levels(self, texts: str | Sequence[str], levels: Sequence[str] | None = None,
                          ) -> dict[str, np.ndarray]:
        """{level: vectors [N, D_level]} for the card's levels (or `levels`), from one request per batch."""
        return self._embed(self._text, encode_texts(texts), "text", self._levels(levels))

    def embed_image_levels(self, images: ImageLike | Sequence[ImageLike], levels: Sequence[str] | None = None,
                           ) -> dict[str, np.ndarray]:
        """{level: vectors [N, D_level]} of images for the card's levels (or `levels`)."""
        return self._embed(self._image, encode_images(images), "image", self._levels(levels))

    def _levels(self, levels: Sequence[str] | None) -> list[str]:
        return check_levels(levels, self.card)

    def _embed(self, embedder: triton.Embedder, items: list[bytes], what: str,
               levels: Sequence[str]) -> dict[str, np.ndarray]:
        if not items:
            return empty_levels(self.card, levels)
        if embedder is None:
            raise RuntimeError("the client is closed")
        vectors, errors = embedder.embed_outputs(items, levels)
        raise_item_errors(errors, what)
        return vectors

    # -- search ------------------------------------------------------------------------------

    def search_text(self, query: str | Sequence[str], k: int = 5, *, filter: str | None = None,
                    level_weights: Mapping[str, float] | None = None, rerank: bool = False,
                    rerank_top: int | None = None) -> list[Hit] | list[list[Hit]]:
        """Images for a text: hits for one query, or a list of hit lists for a list of queries.

        ``rerank=True`` (models with a re-ranker: the cran and mcsm recipes) re-orders the first
        stage's best ``rerank_top`` hits (default: the card's ``top_n``, 20) with the served pair
        scorer and returns the best ``k`` of them as ``RerankedHit`` (``score`` the re-ranker's,
        ``first_stage`` the vector search's); see :mod:`xmodal.client.rerank`. It needs the
        collection's side store (``xmodal index sides``).
        """
        weights = self._check_search(k, filter, level_weights)
        if rerank and weights is not None:
            raise ValueError("rerank=True re-ranks the fused global search; it takes no level_weights")
        depth = rerank_depth(self.card, k, rerank_top) if rerank else k
        vectors = self.embed_text_levels(query, query_levels(weights))
        results = self._search(self.collection, vectors, depth, filter, weights, single=False)
        if rerank:
            reranker = self._open_reranker()
            texts = [query] if isinstance(query, str) else list(query)
            results = [reranker.rerank(text, hits, k) for text, hits in zip(texts, results)]
        return results[0] if isinstance(query, str) else results

    def _open_reranker(self) -> Reranker:
        if self._reranker is None:
            self._reranker = open_reranker(self.triton_urls, self.card, self.milvus_uri, self.collection,
                                           timeout=self.timeout, retry=self.retry, token=self.token,
                                           consistency_level=self.consistency_level)
        return self._reranker

    def search_image(self, image: ImageLike | Sequence[ImageLike], k: int = 5, *, filter: str | None = None,
                     level_weights: Mapping[str, float] | None = None) -> list[Hit] | list[list[Hit]]:
        """Images like an image (or a list of hit lists for a list of images)."""
        weights = self._check_search(k, filter, level_weights)
        vectors = self.embed_image_levels(image, query_levels(weights))
        return self._search(self.collection, vectors, k, filter, weights, single=not is_image_list(image))

    def search_captions(self, image: ImageLike | Sequence[ImageLike], k: int = 5, *, filter: str | None = None,
                        level_weights: Mapping[str, float] | None = None) -> list[Hit] | list[list[Hit]]:
        """Captions for an image, from the caption collection.

        Each hit is one caption row: ``hit.captions == [the caption]``, ``hit.id`` the
        caption's hash, and ``hit.image``, ``hit.concept``, ``hit.style`` those of the first
        indexed image the caption belongs to.
        """
        weights = self._check_search(k, filter, level_weights)
        name = self._caption_collection()
        vectors = self.embed_image_levels(image, query_levels(weights))
        return self._search(name, vectors, k, filter, weights, single=not is_image_list(image))

    def search_vector(self, vector: Sequence[float] | np.ndarray | Mapping[str, Any], k: int = 5, *,
                      filter: str | None = None, collection: str | None = None,
                      level_weights: Mapping[str, float] | None = None) -> list[Hit] | list[list[Hit]]:
        """Hits for a vector [D], or a list of hit lists for vectors [N, D].

        Searches the image collection unless `collection` names another (the caption one).
        With `level_weights`, `vector` maps each weighted level to its vector [D_level] (or
        vectors [N, D_level]), as ``embed_text_levels`` returns them.
        """
        weights = self._check_search(k, filter, level_weights)
        vectors, single = query_vectors(vector, self.card, weights)
        return self._search(collection or self.collection, vectors, k, filter, weights, single=single)

    def _check_search(self, k: int, filter: str | None,
                      level_weights: Mapping[str, float] | None) -> dict[str, float] | None:
        """Check what a search is given before anything is sent; the normalised level weights."""
        check_k(k)
        store.normalize_filter(filter)
        return None if level_weights is None else check_level_weights(level_weights, self.card)

    def _caption_collection(self) -> str:
        if not self.caption_collection:
            raise ValueError("this client has no caption collection (caption_collection=None)")
        self.searcher.open(self.caption_collection, hint=CAPTION_HINT)
        return self.caption_collection

    def _search(self, name: str, vectors: dict[str, np.ndarray], k: int, filter: str | None,
                weights: dict[str, float] | None, *, single: bool) -> list[Hit] | list[list[Hit]]:
        results = run_search(self.searcher, name, vectors, k, filter, weights)
        return results[0] if single else results


# -- shared with AsyncClient -----------------------------------------------------------------

def check_cards(url: str, image_card: ModelCard, text_card: ModelCard) -> None:
    if text_card.fingerprint != image_card.fingerprint:
        raise ValueError(
            f"Triton at {url} serves different models for images "
            f"({store.describe_model(image_card)}) and text ({store.describe_model(text_card)})")


def encode_texts(texts: str | Sequence[str]) -> list[bytes]:
    items = [texts] if isinstance(texts, str) else list(texts)
    encoded = []
    for text in items:
        if not isinstance(text, str):
            raise TypeError(f"query text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("query text is empty")
        encoded.append(text.encode("utf-8"))
    return encoded


def encode_images(images: ImageLike | Sequence[ImageLike]) -> list[bytes]:
    items = list(images) if is_image_list(images) else [images]
    return [image_bytes(image) for image in items]


def raise_item_errors(errors: Sequence[str | None], what: str) -> None:
    for index, error in enumerate(errors):
        if error:
            where = f" {index}" if len(errors) > 1 else ""
            raise ValueError(f"Triton rejected {what}{where}: {error}")


def check_vectors(vector: Sequence[float] | np.ndarray, dim: int, level: str | None = None) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim not in (1, 2) or array.shape[-1] != dim:
        which = f"level {level!r}: " if level else ""
        raise ValueError(f"{which}expected a vector of {dim} values or an array [N, {dim}], got shape {array.shape}")
    return array


def check_levels(levels: Sequence[str] | None, card: ModelCard) -> list[str]:
    """`levels` (default: all of the card's, "global" first), each one the card has."""
    if levels is None:
        return store.card_levels(card)
    unknown = [level for level in levels if level not in card.embeddings]
    if isinstance(levels, str) or unknown or not levels:
        raise ValueError(f"levels must be a non-empty list of the model's levels "
                         f"({', '.join(map(repr, store.card_levels(card)))}), got {levels!r}")
    return list(levels)


def query_levels(weights: dict[str, float] | None) -> list[str]:
    """The embeddings a search needs of its queries: the weighted levels, or the fused one."""
    return list(weights) if weights else [contract.GLOBAL]


def empty_levels(card: ModelCard, levels: Sequence[str]) -> dict[str, np.ndarray]:
    return {level: np.zeros((0, int(card.embeddings[level]["dim"])), dtype=np.float32) for level in levels}


def query_vectors(vector: Any, card: ModelCard, weights: dict[str, float] | None) -> tuple[dict[str, np.ndarray], bool]:
    """search_vector's input as {level: [N, D_level]}, and whether it was one query."""
    if weights is None:
        if isinstance(vector, Mapping):
            raise ValueError("vectors by level need level_weights (which levels, how much each); "
                             "without them search_vector takes one \"global\" vector or an array of them")
        array = check_vectors(vector, card.dim)
        return {contract.GLOBAL: array.reshape(-1, card.dim)}, array.ndim == 1
    if not isinstance(vector, Mapping):
        raise ValueError(f"with level_weights, vector must map each weighted level ({', '.join(map(repr, weights))}) "
                         f"to its vector, as embed_text_levels returns them; got {type(vector).__name__}")
    missing = [level for level in weights if level not in vector]
    if missing:
        raise ValueError(f"level_weights weigh {', '.join(map(repr, missing))} but vector has no such entry "
                         f"(it has {', '.join(map(repr, vector)) or 'none'})")
    arrays = {level: check_vectors(vector[level], int(card.embeddings[level]["dim"]), level) for level in weights}
    shapes = {level: array.shape[:-1] for level, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the levels' vectors must be as many for every level, got {shapes}")
    single = next(iter(arrays.values())).ndim == 1
    return {level: array.reshape(-1, array.shape[-1]) for level, array in arrays.items()}, single


def run_search(searcher: Searcher, name: str, vectors: dict[str, np.ndarray], k: int, filter: str | None,
               weights: dict[str, float] | None) -> list[list[Hit]]:
    """The fused vector's search, or the level-weighted one when there are weights."""
    if weights is None:
        return searcher.search(name, vectors[contract.GLOBAL], k, filter)
    return searcher.search_levels(name, vectors, weights, k, filter)


def is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


def image_bytes(image: ImageLike) -> bytes:
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
