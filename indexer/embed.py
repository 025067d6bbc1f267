"""The embedding stage: a Ray Data actor that sends batches to a Triton ensemble over HTTP."""
from __future__ import annotations

import time

import numpy as np

from xmodal.client.triton import Embedder


class TritonEmbedder:
    """map_batches callable class: ``data`` (bytes) -> ``vector`` [B, D] via one ensemble.

    Items that arrive with an ``error`` are passed through untouched; items the server
    rejects get its message as their ``error``. The ``data`` column is dropped here so the
    bytes never travel back to the driver. ``embed_seconds`` spreads the batch's time in
    Triton over the items sent (the driver's report sums it).
    """

    def __init__(self, triton_url: str, model: str, input_name: str, dim: int, timeout: float = 60.0):
        self.dim = dim
        # The driver checked that the server and model are ready; this reads the batch limit.
        self.embedder = Embedder(triton_url, model, input_name, timeout=timeout)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["data"])
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        errors = np.array(batch["error"], dtype=object)
        todo = [i for i in range(n) if not errors[i]]
        seconds = np.zeros(n, dtype=np.float64)
        if todo:
            started = time.perf_counter()
            embedded, item_errors = self.embedder.embed([batch["data"][i] for i in todo])
            seconds[todo] = (time.perf_counter() - started) / len(todo)
            for j, i in enumerate(todo):
                if item_errors[j]:
                    errors[i] = f"triton: {item_errors[j]}"
                else:
                    vectors[i] = embedded[j]
        out = {key: value for key, value in batch.items() if key != "data"}
        out["vector"] = vectors
        out["error"] = errors
        out["embed_seconds"] = seconds
        return out

    def __del__(self):
        embedder = getattr(self, "embedder", None)
        if embedder is not None:
            embedder.close()
