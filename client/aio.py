"""``AsyncClient``: the asyncio twin of ``Client``, same arguments, same checks, same hits.

Triton is called with ``tritonclient.http.aio`` (aiohttp, one connection pool per client,
reused by every call); Milvus through pymilvus, which is synchronous, in a thread executor
so the event loop never blocks on it.

    async with AsyncClient("127.0.0.1:8000", "xmodal-data/xmodal.db") as client:
        hits = await client.search_text("red apple", k=5, filter='style == "openmoji"')

A client belongs to the event loop that opened it (aiohttp sessions do).
"""
from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from xmodal import contract, settings, store
from xmodal.card import ModelCard
from xmodal import triton
from xmodal.client.hits import Hit
from xmodal.client.rerank import Reranker, open_reranker, rerank_depth
from xmodal.retry import DEFAULT_RETRY, Retry, describe, is_transient, none_answered
from xmodal.client.sdk import (CAPTION_HINT, ImageLike, check_cards, check_levels, empty_levels, encode_images,
                               encode_texts, is_image_list, query_levels, query_vectors, raise_item_errors, run_search)
from xmodal.client.searcher import Searcher, check_k, check_level_weights

T = TypeVar("T")


class AsyncClient:
    """Embed queries with the served model and search the collections it filled, with asyncio.

    Arguments as for :class:`xmodal.client.Client`, plus `executor` (where the pymilvus
    calls run; by default a private pool of `max_workers` threads, shut down on close).
    Nothing connects until ``await client.open()`` or ``async with``; the checks (Triton
    ready, collection present, same model) are Client's, with the same errors.
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
        executor: Executor | None = None,
        max_workers: int = 4,
    ) -> None:
        # several servers of one model: asked in turn, one that stops answering set aside (as Client)
        self.triton_urls = triton.triton_urls(triton_url or settings.default_triton_url())
        self.triton_url = self.triton_urls[0]
        self.milvus_uri = str(milvus_uri or settings.default_milvus_uri())
        self.collection = collection
        self.caption_collection = caption_collection
        self.timeout = timeout
        self.token = token
        self.consistency_level = consistency_level
        self.retry = retry
        self._own_executor = executor is None
        self._executor = executor
        self._max_workers = max_workers
        self._servers = list(self.triton_urls)  # in the order they are asked
        self._tritons: dict[str, triton_aio.InferenceServerClient] = {}  # by server, made when first asked
        self._triton: triton_aio.InferenceServerClient | None = None  # the first server that answered: open
        self._searcher: Searcher | None = None
        self._reranker: Reranker | None = None
        self._batch: dict[str, int] = {}  # model -> max_batch_size (0: not batched)
        self.card: ModelCard | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> "AsyncClient":
        if self._triton is not None:
            return self
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="xmodal-milvus")
        try:
            await self._check_servers()
            configs = {}
            for model in (contract.EMBED_IMAGE, contract.EMBED_TEXT):
                configs[model] = await self._call(lambda client, model=model: client.get_model_config(model),
                                                  what=f"the config of {model}")
                self._batch[model] = int(configs[model].get("max_batch_size", 0) or 0)
            self.card = triton.card_from_config(configs[contract.EMBED_IMAGE], contract.EMBED_IMAGE)
            text_card = triton.card_from_config(configs[contract.EMBED_TEXT], contract.EMBED_TEXT)
            check_cards(self.triton_url, self.card, text_card)
            self._searcher = await self._run(
                Searcher, self.milvus_uri, self.card, token=self.token, timeout=self.timeout,
                consistency_level=self.consistency_level)
            await self._run(self._searcher.open, self.collection)
        except BaseException:
            await self.close()
            raise
        return self

    def _client_of(self, url: str) -> triton_aio.InferenceServerClient:
        if url not in self._tritons:
            self._tritons[url] = triton_aio.InferenceServerClient(url, conn_timeout=self.timeout)
        return self._tritons[url]

    async def _check_servers(self) -> None:
        """The first server that is live with both models ready is asked first; ConnectionError
        naming each server and why when none is."""
        failures = []
        for url in list(self._servers):
            try:
                await self._check_server(url)
            except ConnectionError as exc:
                failures.append(str(exc))
                continue
            self._servers.remove(url)
            self._servers.insert(0, url)
            self._triton = self._client_of(url)
            return
        raise ConnectionError("; ".join(failures))

    async def _check_server(self, url: str) -> None:
        client = self._client_of(url)
        try:
            live = await self.retry.acall(client.is_server_live)
        except Exception as exc:  # refused, unreachable, timed out
            reason = describe(exc)
            if is_transient(exc) and self.retry.attempts > 1:
                reason += f" ({self.retry.attempts} attempts)"
            raise ConnectionError(f"cannot reach Triton at {url}: {reason}") from None
        if not live:
            raise ConnectionError(f"cannot reach Triton at {url}: the server is not live")
        for model in (contract.EMBED_IMAGE, contract.EMBED_TEXT):
            if not await client.is_model_ready(model):
                raise ConnectionError(f"Triton at {url} is up but model {model!r} is not ready")

    async def close(self) -> None:
        self._triton = None
        clients, self._tritons = list(self._tritons.values()), {}
        searcher, self._searcher = self._searcher, None
        reranker, self._reranker = self._reranker, None
        if reranker is not None:
            try:
                await self._run(reranker.close)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        for client in clients:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        if searcher is not None:
            try:
                await self._run(searcher.close)
            except Exception:  # noqa: BLE001
                pass
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> "AsyncClient":
        return await self.open()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    @property
    def dim(self) -> int:
        return self._opened().card.dim

    def _opened(self) -> "AsyncClient":
        if self._triton is None or self._searcher is None or self.card is None:
            raise RuntimeError("the client is not open: use `async with AsyncClient(...)` or `await client.open()`")
        return self

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` in the executor (pymilvus is synchronous)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _call(self, request: Callable[[triton_aio.InferenceServerClient], Any], *, what: str):
        """`await request(client)` with retries, on each server in turn while the one asked does
        not answer (as ``triton.Embedder``); a transient failure that outlasts them on every
        server is a ConnectionError naming each."""
        failed = []
        for url in list(self._servers):
            try:
                return await self.retry.acall(lambda: request(self._client_of(url)))
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failed.append((url, exc))
                if url in self._servers:  # asked last from now on
                    self._servers.remove(url)
                    self._servers.append(url)
        raise none_answered(failed, what, self.retry) from failed[-1][1]

    # -- embedding ---------------------------------------------------------------------------

    async def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """Unit vectors [N, D] for one text or a list of texts (the "global" embedding)."""
        return (await self.embed_text_levels(texts, [contract.GLOBAL]))[contract.GLOBAL]

    async def embed_image(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Unit vectors [N, D] for one image or a list (paths, encoded bytes, PIL images)."""
        return (await self.embed_image_levels(images, [contract.GLOBAL]))[contract.GLOBAL]

    async def embed_text_levels(self, texts: str | Sequence[str], levels: Sequence[str] | None = None,
                                ) -> dict[str, np.ndarray]:
        """{level: vectors [N, D_level]} for the card's levels (or `levels`)."""
        card = self._opened().card
        return await self._embed(contract.EMBED_TEXT, contract.TEXT_INPUT, encode_texts(texts), "text",
                                 check_levels(levels, card))

    async def embed_image_levels(self, images: ImageLike | Sequence[ImageLike], levels: Sequence[str] | None = None,
                                 ) -> dict[str, np.ndarray]:
        """{level: vectors [N, D_level]} of images for the card's levels (or `levels`)."""
        card = self._opened().card
        return await self._embed(contract.EMBED_IMAGE, contract.IMAGE_INPUT, encode_images(images), "image",
                                 check_levels(levels, card))

    async def _embed(self, model: str, input_name: str, items: list[bytes], what: str,
                     levels: Sequence[str]) -> dict[str, np.ndarray]:
        card = self._opened().card
        if not items:
            return empty_levels(card, levels)
        batched = self._batch[model] > 0
        step = self._batch[model] if batched else 1
        rows: list[dict[str, np.ndarray] | None] = [None] * len(items)
        errors: list[str | None] = [None] * len(items)
        # As triton.Embedder.embed_outputs: a batch the server refuses is re-sent item by item,
        # so the error names the bad item; transient failures are retried, never blamed on an item.
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            try:
                out = await self._infer(model, input_name, chunk, batched, levels)
            except InferenceServerException as exc:
                if len(chunk) == 1:
                    errors[start] = exc.message() or str(exc)
                    continue
                for offset, item in enumerate(chunk):
                    try:
                        rows[start + offset] = triton.item_outputs(
                            await self._infer(model, input_name, [item], batched, levels), 0)
                    except InferenceServerException as item_exc:
                        errors[start + offset] = item_exc.message() or str(item_exc)
                continue
            for offset in range(len(chunk)):
                rows[start + offset] = triton.item_outputs(out, offset)
        raise_item_errors(errors, what)
        return triton.stack_outputs(rows, levels)

    async def _infer(self, model: str, input_name: str, chunk: list[bytes], batched: bool,
                     levels: Sequence[str]) -> dict[str, np.ndarray]:
        inputs, outputs = triton.infer_request(input_name, chunk, batched=batched, outputs=levels)
        result = await self._call(lambda client: client.infer(model, inputs, outputs=outputs), what=model)
        return triton.infer_outputs(result, model, len(chunk), levels)

    # -- search ------------------------------------------------------------------------------

    async def search_text(self, query: str | Sequence[str], k: int = 5, *, filter: str | None = None,
                          level_weights: Mapping[str, float] | None = None, rerank: bool = False,
                          rerank_top: int | None = None) -> list[Hit] | list[list[Hit]]:
        """Images for a text: hits for one query, or a list of hit lists for a list of queries.

        ``rerank`` and ``rerank_top`` as in :meth:`Client.search_text`; the re-ranking requests
        run in the executor's threads.
        """
        weights = self._check_search(k, filter, level_weights)
        if rerank and weights is not None:
            raise ValueError("rerank=True re-ranks the fused global search; it takes no level_weights")
        depth = rerank_depth(self._opened().card, k, rerank_top) if rerank else k
        vectors = await self.embed_text_levels(query, query_levels(weights))
        results = await self._search(self.collection, vectors, depth, filter, weights, single=False)
        if rerank:
            if self._reranker is None:
                self._reranker = await self._run(open_reranker, self.triton_urls, self.card, self.milvus_uri,
                                                 self.collection, timeout=self.timeout, retry=self.retry,
                                                 token=self.token, consistency_level=self.consistency_level)
            texts = [query] if isinstance(query, str) else list(query)
            results = [await self._run(self._reranker.rerank, text, hits, k) for text, hits in zip(texts, results)]
        return results[0] if isinstance(query, str) else results

    async def search_image(self, image: ImageLike | Sequence[ImageLike], k: int = 5, *, filter: str | None = None,
                           level_weights: Mapping[str, float] | None = None) -> list[Hit] | list[list[Hit]]:
        """Images like an image (or a list of hit lists for a list of images)."""
        weights = self._check_search(k, filter, level_weights)
        vectors = await self.embed_image_levels(image, query_levels(weights))
        return await self._search(self.collection, vectors, k, filter, weights, single=not is_image_list(image))

    async def search_captions(self, image: ImageLike | Sequence[ImageLike], k: int = 5, *,
                              filter: str | None = None, level_weights: Mapping[str, float] | None = None,
                              ) -> list[Hit] | list[list[Hit]]:
        """Captions for an image, from the caption collection (see Client.search_captions)."""
        weights = self._check_search(k, filter, level_weights)
        if not self.caption_collection:
            raise ValueError("this client has no caption collection (caption_collection=None)")
        await self._run(self._opened()._searcher.open, self.caption_collection, hint=CAPTION_HINT)
        vectors = await self.embed_image_levels(image, query_levels(weights))
        return await self._search(self.caption_collection, vectors, k, filter, weights,
                                  single=not is_image_list(image))

    async def search_vector(self, vector: Sequence[float] | np.ndarray | Mapping[str, Any], k: int = 5, *,
                            filter: str | None = None, collection: str | None = None,
                            level_weights: Mapping[str, float] | None = None) -> list[Hit] | list[list[Hit]]:
        """Hits for a vector [D], or a list of hit lists for vectors [N, D] (see Client.search_vector)."""
        weights = self._check_search(k, filter, level_weights)
        vectors, single = query_vectors(vector, self._opened().card, weights)
        return await self._search(collection or self.collection, vectors, k, filter, weights, single=single)

    def _check_search(self, k: int, filter: str | None,
                      level_weights: Mapping[str, float] | None) -> dict[str, float] | None:
        check_k(k)
        store.normalize_filter(filter)
        return None if level_weights is None else check_level_weights(level_weights, self._opened().card)

    async def _search(self, name: str, vectors: dict[str, np.ndarray], k: int, filter: str | None,
                      weights: dict[str, float] | None, *, single: bool) -> list[Hit] | list[list[Hit]]:
        searcher = self._opened()._searcher
        assert searcher is not None
        results = await self._run(run_search, searcher, name, vectors, k, filter, weights)
        return results[0] if single else results
