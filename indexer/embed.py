"""The embedding stage: a Ray Data actor that sends batches to a Triton ensemble over HTTP
(``indexer/local.py`` has the in-process ONNX Runtime one)."""
from __future__ import annotations

import time

import numpy as np

from xmodal.triton import Embedder, triton_urls
from xmodal.contract import GLOBAL

VECTOR_COLUMN = "vector"
NODE_COLUMN = "node"  # the Ray node whose actor embedded the batch ("" outside Ray)


def vector_column(level: str) -> str:
    """The batch column that carries an embedding level: "vector" for "global", "vector_<level>" else."""
    return VECTOR_COLUMN if level == GLOBAL else f"{VECTOR_COLUMN}_{level}"


class EmbedStage:
    """map_batches callable class: ``data`` (bytes) -> one vector column per level.

    `dims` maps each embedding level of the card to its width (an int means {"global": dim});
    every level lands in ``vector_column(level)``: "vector" [B, D] for "global",
    "vector_concept" etc. for the levels of a hierarchical model. Items that arrive with an
    ``error`` are passed through untouched; items the model rejects get its message as their
    ``error``, after ``error_prefix``. The ``data`` column is dropped here so the bytes never
    travel back to the driver. ``embed_seconds`` spreads the batch's embedding time over the
    items sent (the driver's report sums it), and ``node`` names the Ray node the actor runs
    on (the report counts the items each node embedded). Subclasses provide ``embed_outputs``.
    """

    error_prefix = ""

    def __init__(self, dims: dict[str, int] | int):
        import ray

        self.dims = {GLOBAL: dims} if isinstance(dims, int) else dict(dims)
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def embed_outputs(self, items: list[bytes]) -> tuple[dict[str, np.ndarray], list[str | None]]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["data"])
        vectors = {level: np.zeros((n, dim), dtype=np.float32) for level, dim in self.dims.items()}
        errors = np.array(batch["error"], dtype=object)
        todo = [i for i in range(n) if not errors[i]]
        seconds = np.zeros(n, dtype=np.float64)
        if todo:
            started = time.perf_counter()
            embedded, item_errors = self.embed_outputs([batch["data"][i] for i in todo])
            seconds[todo] = (time.perf_counter() - started) / len(todo)
            for j, i in enumerate(todo):
                if item_errors[j]:
                    errors[i] = f"{self.error_prefix}{item_errors[j]}"
                else:
                    for level, array in vectors.items():
                        array[i] = embedded[level][j]
        out = {key: value for key, value in batch.items() if key != "data"}
        out.update({vector_column(level): array for level, array in vectors.items()})
        out["error"] = errors
        out["embed_seconds"] = seconds
        out[NODE_COLUMN] = np.full(n, self.node, dtype=object)
        return out


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def servers_in_order(triton_url: str | list[str]) -> list[str]:
    """The Triton servers named, in the order this embedding actor asks them (``order_servers``
    with its node's address and its actor id)."""
    import ray

    if not ray.is_initialized():
        return order_servers(triton_urls(triton_url), "", 0)
    actor = ray.get_runtime_context().get_actor_id()
    return order_servers(triton_urls(triton_url), ray.util.get_node_ip_address(), int(actor, 16) if actor else 0)


def order_servers(servers: list[str], node_ip: str, turn: int) -> list[str]:
    """`servers` (``host:port``) in the order an actor asks them: those on its own node first
    (their host is the node's address or loopback), so that tensors stay on the node; then the
    rest. Each group is rotated by `turn` (the actor's), so that the actors of a node, or of
    nodes without a server, spread over the servers."""
    def rotated(group: list[str]) -> list[str]:
        shift = turn % len(group) if group else 0
        return group[shift:] + group[:shift]

    local = [url for url in servers if url.rsplit(":", 1)[0] in (node_ip, *LOOPBACK_HOSTS)]
    return rotated(local) + rotated([url for url in servers if url not in local])


class TritonEmbedder(EmbedStage):
    """The embedding stage through a Triton ensemble over HTTP, every level from the same request."""

    error_prefix = "triton: "

    def __init__(self, triton_url: str | list[str], model: str, input_name: str, dims: dict[str, int] | int,
                 timeout: float = 60.0):
        super().__init__(dims)
        # The driver checked that a server and the model are ready; this reads the batch limit.
        self.embedder = Embedder(servers_in_order(triton_url), model, input_name, timeout=timeout,
                                 outputs=tuple(self.dims))

    def embed_outputs(self, items: list[bytes]) -> tuple[dict[str, np.ndarray], list[str | None]]:
        return self.embedder.embed_outputs(items)

    def __del__(self):
        embedder = getattr(self, "embedder", None)
        if embedder is not None:
            embedder.close()
