"""Caption tokenising with HF `tokenizers`: a word-level vocabulary learnt from the training captions.

The saved tokenizer.json carries its own normaliser, pre-tokeniser and truncation, so the
trainer and the Triton preprocessing model produce the same ids by construction.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID = 0


def train_wordlevel_tokenizer(captions: Iterable[str], *, max_length: int, min_frequency: int = 1) -> Tokenizer:
    tokenizer = Tokenizer(WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(special_tokens=[PAD, UNK], min_frequency=min_frequency, show_progress=False)
    tokenizer.train_from_iterator(captions, trainer=trainer)
    assert tokenizer.token_to_id(PAD) == PAD_ID
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def vocab_hash(tokenizer: Tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def max_length(tokenizer: Tokenizer) -> int:
    truncation = tokenizer.truncation
    if not truncation:
        raise ValueError("tokenizer has no truncation set: its maximum length is undefined")
    return int(truncation["max_length"])
