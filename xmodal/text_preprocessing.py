"""Text preprocessing shared by training, in-process embedding and the Triton Python model.

This file depends only on numpy and tokenizers on purpose: export copies it next to the
Triton ``preprocess_text`` model, so the server and ``xmodal index --local`` run the very
same code: the same checks with the same words, the same length buckets, the same ids.

A text to embed arrives as bytes and is refused when it is not UTF-8, empty or whitespace
only, or has no tokens but the tokenizer's special ones (e.g. only zero-width characters,
which BERT's normaliser removes: a WordPiece tokenizer would otherwise answer with the vector
of ``[CLS] [SEP]``). A refusal is a reason that completes a sentence about the text ("is
empty"); each caller names the text its own way: the server ``TEXT[3] is empty`` (the
request's row), the in-process embedder ``text is empty``.

Padding. The ids of a request are padded with the pad id, which the text encoder masks. A
request of one text is padded up to the first length bucket that holds it: 8, 16, 32, … and
the tokenizer's max length itself. Triton's dynamic batcher joins only requests of one
shape; padded to their exact lengths, concurrent single queries would almost never share an
encoder call. A request of several texts is already a batch and is padded to its longest text
only: MiniLM's cost grows with every token, so bucket padding would make a batch slower to
encode. Training pads a batch to its longest too (``pad_ids`` without a length).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

FIRST_BUCKET = 8


class TextError(ValueError):
    """A text the text encoder cannot take; the message completes a sentence about it ("is empty")."""


def bucket_length(longest: int, max_length: int | None) -> int:
    """The first of 8, 16, 32, … that holds `longest` ids, capped at the tokenizer's max length."""
    length = FIRST_BUCKET
    while length < longest:
        length *= 2
    return min(length, max_length) if max_length else length


def padded_length(longest: int, texts: int, max_length: int | None) -> int:
    """The width of a request's id matrix: one text to its bucket, several to the longest."""
    return longest if texts > 1 else bucket_length(longest, max_length)


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> np.ndarray:
    """int64 [len(rows), length]: each row's ids, then `pad_id`. `length` defaults to the longest
    row (at least 1, so a batch of texts without ids still has a column)."""
    if length is None:
        length = max(1, max((len(ids) for ids in rows), default=0))
    matrix = np.full((len(rows), length), pad_id, dtype=np.int64)
    for row, ids in enumerate(rows):
        matrix[row, :len(ids)] = ids
    return matrix


def decode_text(data: bytes) -> str:
    """One item's text; TextError when it is not UTF-8, or empty or whitespace only."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(f"is not valid UTF-8: {exc}") from exc
    if not text.strip():
        raise TextError("is empty")
    return text


def check_tokens(encoding: Encoding) -> None:
    """TextError when the tokenizer left no ids but its special ones.

    A WordPiece (BERT) tokenizer wraps every text in [CLS] … [SEP]: a text the normaliser
    removes entirely (zero-width or control characters only) still has those two ids, and
    no others."""
    if not encoding.ids or all(encoding.special_tokens_mask):
        raise TextError("has no tokens (only characters the tokenizer removes)")


class TextPreprocessor:
    """Items (bytes) -> the padded id matrix of the good ones and each item's refusal.

    `tokenizer` carries its truncation to the card's max length (the training run's own
    ``tokenizer.json``); `pad_id` is the card's."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int = 0):
        self.tokenizer = tokenizer
        self.pad_id = int(pad_id)
        self.max_length: int | None = (tokenizer.truncation or {}).get("max_length")

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, pad_id: int = 0) -> TextPreprocessor:
        return cls(Tokenizer.from_file(str(tokenizer_json)), pad_id)

    def input_ids(self, items: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """int64 [good items, width], padded as one request of the good items is, and for every
        item None or the reason it was refused (``TextError``'s message). A bad text fails alone."""
        reasons: list[str | None] = [None] * len(items)
        texts: dict[int, str] = {}
        for index, data in enumerate(items):
            try:
                texts[index] = decode_text(data)
            except TextError as exc:
                reasons[index] = str(exc)
        kept = []
        for index, encoding in zip(texts, self.tokenizer.encode_batch(list(texts.values()))):
            try:
                check_tokens(encoding)
                kept.append(encoding.ids)
            except TextError as exc:
                reasons[index] = str(exc)
        if not kept:
            return np.zeros((0, 0), dtype=np.int64), reasons
        width = padded_length(max(len(ids) for ids in kept), len(kept), self.max_length)
        return pad_ids(kept, self.pad_id, width), reasons
