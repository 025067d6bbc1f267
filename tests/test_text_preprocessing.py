"""xmodal/text_preprocessing.py without a server: the length buckets, the padding, the checks
of one text and the id matrix of a request, with the tokenizers training makes (the word-level
one learnt from captions, MiniLM's WordPiece). tests/test_minilm.py checks that the served
model and the in-process embedder, both running this file, refuse and encode alike."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal import text_preprocessing
from xmodal.text_preprocessing import (TextError, TextPreprocessor, bucket_length, check_tokens, decode_text, pad_ids,
                                       padded_length)
from xmodal.training.bert import minilm_tokenizer
from xmodal.training.tokenizer import PAD_ID, train_wordlevel_tokenizer
from xmodal.training.train import tokenize

CAPTIONS = ["red heart", "grinning face", "a cat with green eyes", "smiling face with heart eyes"]


@pytest.fixture(scope="module")
def wordlevel():
    return train_wordlevel_tokenizer(CAPTIONS, max_length=6)


@pytest.fixture(scope="module")
def wordpiece():
    return minilm_tokenizer(64)


def test_the_module_imports_only_numpy_tokenizers_and_the_standard_library():
    # export copies it next to preprocess_text, into NVIDIA's container, where xmodal is not installed
    tree = ast.parse(Path(text_preprocessing.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "pathlib", "typing", "numpy", "tokenizers"}


@pytest.mark.parametrize(("longest", "max_length", "length"), [
    (1, None, 8), (8, None, 8), (9, None, 16), (33, None, 64), (300, None, 512),
    (9, 64, 16), (64, 64, 64), (40, 40, 40), (33, 40, 40), (3, 6, 6),
])
def test_one_text_is_padded_to_its_bucket_capped_at_the_max_length(longest, max_length, length):
    assert bucket_length(longest, max_length) == length
    assert padded_length(longest, 1, max_length) == length


def test_several_texts_are_padded_to_the_longest():
    assert padded_length(9, 2, 64) == 9
    assert padded_length(1, 32, None) == 1


def test_pad_ids_fills_each_row_then_the_pad_id():
    ids = pad_ids([[5, 6, 7], [8], []], pad_id=3)
    assert ids.dtype == np.int64
    assert ids.tolist() == [[5, 6, 7], [8, 3, 3], [3, 3, 3]]
    assert pad_ids([[5, 6], [8]], pad_id=0, length=8).tolist() == [[5, 6, 0, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    assert pad_ids([[], []], pad_id=0).shape == (2, 1)  # a column even when no text has ids
    assert pad_ids([], pad_id=0).shape == (0, 1)


def test_training_pads_a_batch_to_its_longest_without_buckets(wordlevel):
    ids = tokenize(wordlevel, ["red heart", "a cat with green eyes", "cat"])
    assert ids.dtype == torch.long and ids.shape == (3, 5)
    assert ids[2, 1:].tolist() == [PAD_ID] * 4
    assert tokenize(wordlevel, ["cat"]).shape == (1, 1)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "is empty"),
    (b" \t\n", "is empty"),
    ("\u3000 \u00a0".encode(), "is empty"),  # ideographic and no-break spaces are whitespace too
    (b"caf\xe9", "is not valid UTF-8: 'utf-8' codec can't decode byte 0xe9 in position 3: unexpected end of data"),
    (b"\xff\xfe", "is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
])
def test_a_text_that_is_not_utf8_or_is_empty_is_refused(data, reason):
    with pytest.raises(TextError) as refused:
        decode_text(data)
    assert str(refused.value) == reason
    assert isinstance(refused.value, ValueError)


def test_a_text_is_decoded_as_it_is():
    assert decode_text("  café 😀 ".encode()) == "  café 😀 "
    assert decode_text(np.bytes_(b"red heart")) == "red heart"  # as Triton's object arrays may hold it


@pytest.mark.parametrize(("tokenizer", "text"), [
    ("wordpiece", "\u200b\u200b"),  # zero-width spaces: BERT's normaliser drops them, [CLS] [SEP] are left
    ("wordpiece", "\x00\x07"),  # control characters: likewise
    ("wordlevel", "\u0301\u0308"),  # combining accents alone: StripAccents removes them, no ids at all
])
def test_a_text_the_tokenizer_removes_entirely_has_no_tokens(request, tokenizer, text):
    encoding = request.getfixturevalue(tokenizer).encode(text)
    with pytest.raises(TextError, match=r"^has no tokens \(only characters the tokenizer removes\)$"):
        check_tokens(encoding)
    check_tokens(request.getfixturevalue(tokenizer).encode("red " + text))


def test_a_request_pads_its_good_texts_and_refuses_the_bad_ones_one_by_one(wordpiece):
    preprocessor = TextPreprocessor(wordpiece, pad_id=PAD_ID)
    assert preprocessor.max_length == 64
    items = [b"red heart", b"  ", b"\xff", "\u200b".encode(), b"a cat with green eyes"]
    ids, reasons = preprocessor.input_ids(items)
    assert reasons[0] is None and reasons[4] is None
    assert reasons[1:4] == ["is empty", reasons[2], "has no tokens (only characters the tokenizer removes)"]
    assert reasons[2].startswith("is not valid UTF-8: ")
    want = [wordpiece.encode("red heart").ids, wordpiece.encode("a cat with green eyes").ids]
    assert ids.shape == (2, len(want[1]))  # two good texts: padded to the longer, no bucket
    assert ids.tolist() == pad_ids(want, PAD_ID).tolist()

    alone, reasons = preprocessor.input_ids([b"red heart"])  # one text: padded to its bucket
    assert reasons == [None] and alone.shape == (1, 8)
    assert alone.tolist() == pad_ids(want[:1], PAD_ID, 8).tolist()

    none, reasons = preprocessor.input_ids([b"", b"\xff"])
    assert none.shape == (0, 0) and all(reasons)


def test_a_text_longer_than_the_max_length_is_truncated_to_it(wordlevel, tmp_path):
    wordlevel.save(str(tmp_path / "tokenizer.json"))
    preprocessor = TextPreprocessor.from_file(tmp_path / "tokenizer.json", pad_id=7)
    ids, reasons = preprocessor.input_ids([" ".join(["cat"] * 20).encode()])
    assert reasons == [None] and ids.shape == (1, 6)  # bucket 8 capped at the max length, 6
    ids, _ = preprocessor.input_ids([b"red heart"])
    assert ids.tolist() == [[*wordlevel.encode("red heart").ids, 7, 7, 7, 7]]
