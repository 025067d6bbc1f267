"""Talking to the xmodal ensembles on Triton over HTTP: connect, read the card, embed in batches.

Shared by the client SDK and the indexer's embedding actors; tritonclient and numpy only.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from xmodal.card import CARD_PARAMETER, ModelCard
from xmodal.contract import EMBED_IMAGE, EMBED_TEXT, GLOBAL
from xmodal.retry import DEFAULT_RETRY, Retry, is_transient, none_answered



def host_port(url: str) -> str:
    """tritonclient wants ``host:port``; accept ``http://host:port`` too."""
    for scheme in ("http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


def triton_urls(urls: str | Sequence[str]) -> list[str]:
    """``host:port`` of each Triton server named: one URL, a list of them, or one string of
    several separated by commas (as ``--triton-url`` takes them); ValueError for none."""
    named = urls.split(",") if isinstance(urls, str) else list(urls)
    found = [host_port(url.strip()) for url in named if url and url.strip()]
    if not found:
        raise ValueError(f"no Triton URL in {urls!r}")
    return list(dict.fromkeys(found))


def connect(url: str, *, timeout: float = 10.0, models: Sequence[str] = (EMBED_IMAGE, EMBED_TEXT),
            retry: Retry = DEFAULT_RETRY) -> triton_http.InferenceServerClient:
    """A client for a live server whose `models` are ready; ConnectionError naming the URL if not.

    A refused connection is retried with backoff (`retry`): a server that is starting gets a moment.
    """
    address = host_port(url)
    client = triton_http.InferenceServerClient(address, connection_timeout=timeout, network_timeout=timeout)
    try:
        live = retry.call(client.is_server_live)
    except InferenceServerException as exc:
        live, reason = False, exc.message()
    except Exception as exc:  # refused, unreachable, timed out (socket and gevent errors)
        live, reason = False, f"{type(exc).__name__}: {exc}"
        if is_transient(exc) and retry.attempts > 1:
            reason += f" ({retry.attempts} attempts)"
    else:
        reason = "the server is not live"
    if not live:
        client.close()
        raise ConnectionError(f"cannot reach Triton at {address}: {reason}")
    for model in models:
        try:
            ready = client.is_model_ready(model)
        except InferenceServerException:
            ready = False
        if not ready:
            loaded = _ready_models(client)
            client.close()
            raise ConnectionError(
                f"Triton at {address} is up but model {model!r} is not ready "
                f"(ready models: {', '.join(loaded) or 'none'})"
            )
    return client


def connect_any(urls: str | Sequence[str], *, timeout: float = 10.0,
                models: Sequence[str] = (EMBED_IMAGE, EMBED_TEXT), retry: Retry = DEFAULT_RETRY,
                ) -> triton_http.InferenceServerClient:
    """``connect`` to the first of `urls` (``triton_urls``) whose `models` are ready;
    ConnectionError naming each server and why, when none is."""
    failures = []
    for url in triton_urls(urls):
        try:
            return connect(url, timeout=timeout, models=models, retry=retry)
        except ConnectionError as exc:
            failures.append(str(exc))
    raise ConnectionError("; ".join(failures))


def _ready_models(client: triton_http.InferenceServerClient) -> list[str]:
    try:
        return sorted(m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY")
    except Exception:
        return []


def fetch_card(client: triton_http.InferenceServerClient, model: str = EMBED_IMAGE) -> ModelCard:
    """The model card that export put into the ensemble's config ``parameters``."""
    return card_from_config(client.get_model_config(model), model)


def card_from_config(config: dict, model: str) -> ModelCard:
    """The card in a model config (as the HTTP API returns it, sync or asyncio)."""
    parameter = (config.get("parameters") or {}).get(CARD_PARAMETER)
    if not parameter or not parameter.get("string_value"):
        raise ValueError(f"Triton model {model!r} carries no {CARD_PARAMETER!r} parameter: not an xmodal model")
    return ModelCard.from_json(parameter["string_value"])


def max_batch_size(client: triton_http.InferenceServerClient, model: str) -> int:
    return int(client.get_model_config(model).get("max_batch_size", 0) or 0)


class Embedder:
    """Embed encoded items (image bytes, UTF-8 text) with one ensemble, a batch per request.

    `outputs` names the ensemble outputs a request asks for by default ("global"; a
    hierarchical model's card names "concept" and "exterior" too); ``embed`` returns the
    first of them, ``embed_outputs`` each by name.

    A request fails as a whole when one item is bad (the preprocessing model rejects it);
    the batch is then re-sent item by item so only the bad items fail, each with the
    server's message. Transport errors (server gone) are raised, not attributed to items.

    `url` may name several servers that serve the same model (``triton_urls``): requests go
    to the first, and a server that stops answering (a transient failure that outlasts `retry`:
    refused, reset, 503) is set aside to the end of the list and the request is sent to the
    next; ConnectionError only when none answers. A request is a pure function of its input,
    so sending it again elsewhere is safe.

    tritonclient.http runs on gevent, whose connections belong to the thread that made them
    (Ray Data calls an actor's UDF on another thread than its constructor), so each thread
    gets its own HTTP client per server.
    """

    def __init__(self, url: str | Sequence[str], model: str, input_name: str, *, timeout: float = 10.0,
                 batch_limit: int | None = None, retry: Retry = DEFAULT_RETRY, outputs: Sequence[str] = (GLOBAL,)):
        self.servers = triton_urls(url)  # in the order they are asked: the one answering first
        self.model = model
        self.input_name = input_name
        self.outputs = tuple(outputs)
        if not self.outputs:
            raise ValueError("an Embedder needs at least one output to ask for")
        self.timeout = timeout
        self.retry = retry
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[triton_http.InferenceServerClient] = []
        server_limit = self._call(max_batch_size, model, what=f"the config of {model}")
        self.batched = server_limit > 0
        limits = [n for n in (server_limit, batch_limit) if n]
        self.batch_limit = min(limits) if limits else 1

    @property
    def url(self) -> str:
        """The server asked first."""
        return self.servers[0]

    def client_of(self, url: str) -> triton_http.InferenceServerClient:
        """This thread's client of server `url`."""
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(url)
        if client is None:
            client = clients[url] = triton_http.InferenceServerClient(
                url, connection_timeout=self.timeout, network_timeout=self.timeout)
            with self._lock:
                self._clients.append(client)
        return client

    @property
    def client(self) -> triton_http.InferenceServerClient:
        return self.client_of(self.url)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - another thread's gevent hub; the process ends it
                pass

    def _call(self, fn, *args, what: str):
        """`fn(client, *args)` with retries, on each server in turn while the one asked does not
        answer; a transient failure that outlasts them on every server is a ConnectionError."""
        failed = []
        for url in list(self.servers):
            try:
                return self.retry.call(lambda: fn(self.client_of(url), *args))
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failed.append((url, exc))
                with self._lock:  # asked last from now on, until the others fail too
                    if url in self.servers:
                        self.servers.remove(url)
                        self.servers.append(url)
        raise none_answered(failed, what, self.retry) from failed[-1][1]

    def embed(self, items: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """Vectors [N, D] of the first output (zero rows where an item failed) and per-item
        errors (None when fine); see ``embed_outputs``."""
        vectors, errors = self.embed_outputs(items, self.outputs[:1])
        return vectors[self.outputs[0]], errors

    def embed_outputs(self, items: Sequence[bytes], outputs: Sequence[str] | None = None,
                      ) -> tuple[dict[str, np.ndarray], list[str | None]]:
        """{output: vectors [N, D_output]} for `outputs` (default ``self.outputs``), all from
        the same requests, with zero rows where an item failed, and per-item errors.

        Transient failures (refused or reset connections, 503) are retried with backoff
        (``self.retry``) and raise ConnectionError when they outlast it; they are never
        blamed on an item.
        """
        names = tuple(outputs or self.outputs)
        rows: list[dict[str, np.ndarray] | None] = [None] * len(items)
        errors: list[str | None] = [None] * len(items)
        step = self.batch_limit if self.batched else 1
        for start in range(0, len(items), step):
            chunk = list(items[start:start + step])
            try:
                out = self._infer(chunk, names)
            except InferenceServerException as exc:
                if len(chunk) == 1:
                    errors[start] = exc.message() or str(exc)
                    continue
                for offset, item in enumerate(chunk):
                    try:
                        rows[start + offset] = item_outputs(self._infer([item], names), 0)
                    except InferenceServerException as item_exc:
                        errors[start + offset] = item_exc.message() or str(item_exc)
                continue
            for offset in range(len(chunk)):
                rows[start + offset] = item_outputs(out, offset)
        return stack_outputs(rows, names), errors

    def _infer(self, chunk: list[bytes], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        inputs, requested = infer_request(self.input_name, chunk, batched=self.batched, outputs=outputs)
        result = self._call(lambda client: client.infer(self.model, inputs, outputs=requested), what=self.model)
        return infer_outputs(result, self.model, len(chunk), outputs)


def infer_request(input_name: str, chunk: Sequence[bytes], *, batched: bool, outputs: Sequence[str] = (GLOBAL,)):
    """The inputs and requested outputs of one request for `chunk` (one item when not batched).

    tritonclient.http.aio uses the same InferInput classes, so the asyncio client shares this.
    """
    if batched:
        data = np.empty((len(chunk), 1), dtype=object)
        data[:, 0] = list(chunk)
    else:
        data = np.empty((1,), dtype=object)
        data[0] = chunk[0]
    request = triton_http.InferInput(input_name, list(data.shape), "BYTES")
    request.set_data_from_numpy(data, binary_data=True)
    return [request], [triton_http.InferRequestedOutput(name, binary_data=True) for name in outputs]


def infer_outputs(result, model: str, count: int, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """{output: [count, D]} from a response; an output it lacks is the server's fault, not the items'."""
    arrays = {}
    for name in outputs:
        array = result.as_numpy(name)
        if array is None:
            raise InferenceServerException(f"{model} returned no {name!r} output")
        arrays[name] = np.asarray(array, dtype=np.float32).reshape(count, -1)
    return arrays


def item_outputs(outputs: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in outputs.items()}


def stack_outputs(rows: Sequence[dict[str, np.ndarray] | None], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-item {output: vector} -> {output: [N, D]}, zero rows where an item has none."""
    return {name: stack_vectors([row[name] if row is not None else None for row in rows]) for name in outputs}


def stack_vectors(vectors: Sequence[np.ndarray | None]) -> np.ndarray:
    """[N, D] with zero rows where an item has no vector."""
    dim = next((v.shape[-1] for v in vectors if v is not None), 0)
    stacked = np.zeros((len(vectors), dim), dtype=np.float32)
    for i, v in enumerate(vectors):
        if v is not None:
            stacked[i] = v
    return stacked
