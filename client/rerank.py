"""The second stage: a text query's first-stage hits re-scored by the served pair scorer.

The first stage (a vector search of the query's ``global`` embedding) returns the top N; their
image sides come from the side store (:mod:`xmodal.sidestore`), and Triton's ``rerank_text``
ensemble (tokenise, then ``rerank.onnx``) scores the query against all N in one request. The
hits come back ordered by that score, each with ``score`` the re-ranker's and ``first_stage``
the vector search's.

A hit whose image has no side in the store (indexed after the sides were computed) cannot be
re-scored: it keeps its place after every re-scored hit, in first-stage order, and the search
says how many there were in ``Reranker.last_missing``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from xmodal import contract
from xmodal.card import ModelCard
from xmodal import triton
from xmodal.client.hits import Hit
from xmodal.retry import DEFAULT_RETRY, Retry
from xmodal.sidestore import SideStore



def rerank_depth(card: ModelCard, k: int, rerank_top: int | None) -> int:
    """How many first-stage hits a re-ranked search of ``k`` asks for: ``rerank_top``, else the
    card's ``top_n`` (what the model was evaluated with), at least ``k``."""
    if not card.reranker:
        raise ValueError(f"rerank=True needs a model with a re-ranker; {card.name} (recipe {card.recipe!r}) has none "
                         "(the cran and mcsm recipes have one)")
    if rerank_top is None:
        return max(k, card.reranker.top_n)
    if isinstance(rerank_top, bool) or not isinstance(rerank_top, int) or rerank_top < k:
        raise ValueError(f"rerank_top must be an integer at least k={k} (the first-stage hits re-ranked), "
                         f"got {rerank_top!r}")
    return rerank_top


def open_reranker(url: str | Sequence[str], card: ModelCard, milvus_uri: str, collection: str, *, timeout: float,
                  retry: Retry, token: str | None = None, consistency_level: str = "Bounded") -> "Reranker":
    """A Reranker on the side store of ``collection`` (SideStoreError naming the command that fills it)."""
    from xmodal.sidestore import open_side_store

    sides = open_side_store(milvus_uri, collection, card.reranker, token=token, consistency_level=consistency_level)
    try:
        return Reranker(url, card, sides, timeout=timeout, retry=retry, own_sides=True)
    except BaseException:
        sides.close()
        raise


@dataclasses.dataclass(frozen=True)
class RerankedHit(Hit):
    first_stage: float = 0.0  # the vector search's score; `score` is the re-ranker's


class Reranker:
    """Scores one text query against candidate images with the served re-ranker."""

    def __init__(self, url: str | Sequence[str], card: ModelCard, sides: SideStore, *, timeout: float = 10.0,
                 retry: Retry = DEFAULT_RETRY, own_sides: bool = False):
        if not card.reranker:
            raise ValueError(f"model {card.name} has no re-ranker (recipe {card.recipe!r}; CRAN and MCSM have one)")
        self.card = card
        self.sides = sides
        self.names = list(card.reranker.side)
        self._caller = triton.Embedder(url, contract.RERANK_TEXT, contract.TEXT_INPUT, timeout=timeout, retry=retry,
                                       outputs=(contract.SCORES,))
        self.last_missing = 0
        self._own_sides = own_sides

    def close(self) -> None:
        self._caller.close()
        if self._own_sides:
            self.sides.close()

    def scores(self, text: str, first_stage: np.ndarray, side: dict[str, np.ndarray]) -> np.ndarray:
        """The re-ranker's scores ``[N]`` of ``text`` against N candidates (their first-stage scores
        and stored sides, ``side[name]`` ``[N, ...]``)."""
        first_stage = np.asarray(first_stage, dtype=np.float32).reshape(1, -1)
        text_data = np.empty((1, 1), dtype=object)
        text_data[0, 0] = text.encode("utf-8")
        inputs = [triton_http.InferInput(contract.TEXT_INPUT, [1, 1], "BYTES"),
                  triton_http.InferInput(contract.FIRST_STAGE, list(first_stage.shape), "FP32")]
        inputs[0].set_data_from_numpy(text_data, binary_data=True)
        inputs[1].set_data_from_numpy(first_stage, binary_data=True)
        for name in self.names:
            value = np.ascontiguousarray(side[name][None], dtype=np.float32)
            tensor = triton_http.InferInput(name, list(value.shape), "FP32")
            tensor.set_data_from_numpy(value, binary_data=True)
            inputs.append(tensor)
        outputs = [triton_http.InferRequestedOutput(contract.SCORES, binary_data=True)]
        try:
            result = self._caller._call(lambda client: client.infer(contract.RERANK_TEXT, inputs, outputs=outputs),
                                        what=contract.RERANK_TEXT)
        except InferenceServerException as exc:
            raise ValueError(f"{contract.RERANK_TEXT} refused the query {text!r}: {exc.message() or exc}") from None
        return np.asarray(result.as_numpy(contract.SCORES), dtype=np.float32).reshape(-1)

    def rerank(self, text: str, hits: Sequence[Hit], k: int) -> list[RerankedHit]:
        """The best ``k`` of ``hits`` (one query's first stage, best first) by the re-ranker."""
        if not hits:
            self.last_missing = 0
            return []
        side, missing = self.sides.get([hit.id for hit in hits])
        self.last_missing = len(missing)
        absent = set(missing)
        scored = [hit for hit in hits if hit.id not in absent]
        reranked: list[RerankedHit] = []
        if scored:
            values = self.scores(text, np.array([hit.score for hit in scored]), side)
            order = np.argsort(-values, kind="stable")
            reranked = [_reranked(scored[i], float(values[i])) for i in order]
        reranked += [_reranked(hit, float("nan")) for hit in hits if hit.id in absent]
        return reranked[:k]


def _reranked(hit: Hit, score: float) -> RerankedHit:
    fields = {f.name: getattr(hit, f.name) for f in dataclasses.fields(Hit)}
    return RerankedHit(**{**fields, "score": score, "first_stage": hit.score})
