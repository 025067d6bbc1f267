"""all-MiniLM-L6-v2 in the project's own BERT: a complete weight load, upstream's behaviour, ONNX
export, the WordPiece tokenizer, freezing schedules, and a tiny frozen-text run end to end."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from xmodal.training.bert import (
    MiniLMBackbone, load_pretrained_state_dict, map_checkpoint_keys, minilm_tokenizer, model_dir, trainable_layers_for,
)
from xmodal.training.tokenizer import PAD_ID, vocab_hash
from xmodal.training.train import apply_text_freeze, caption_features, parameter_groups, tokenize

MAX_LENGTH = 32
CLS_ID, SEP_ID = 101, 102
ONNX_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def minilm() -> MiniLMBackbone:
    return MiniLMBackbone(pretrained=True, trainable_layers=0).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return minilm_tokenizer(MAX_LENGTH)


def encode(model: MiniLMBackbone, tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    return model.encode(tokenize(tokenizer, texts))


# --- weights ------------------------------------------------------------------------------


def test_every_tensor_of_the_checkpoint_is_loaded(minilm: MiniLMBackbone) -> None:
    with safe_open(str(model_dir() / "model.safetensors"), framework="pt") as file:
        file_keys = set(file.keys())
        query = file.get_tensor("encoder.layer.5.attention.self.query.weight")
    model_keys = set(minilm.bert.state_dict())
    assert len(file_keys) == 104 and len(model_keys) == 103
    assert file_keys - model_keys == {"embeddings.position_ids"}  # the constant arange(512) buffer, skipped by name
    assert model_keys - file_keys == set()
    assert minilm.skipped_keys == ["embeddings.position_ids"]
    assert torch.equal(minilm.bert.encoder.layer[5].attention.self.query.weight, query)

    # Keys saved under a prefix (sentence-transformers' "0.auto_model.", BertFor*'s "bert.") map to the same names.
    state, _ = load_pretrained_state_dict()
    for prefix in ("0.auto_model.", "bert."):
        mapped, skipped = map_checkpoint_keys({prefix + key: value for key, value in state.items()})
        assert set(mapped) == model_keys and skipped == []


# --- upstream behaviour -----------------------------------------------------------------------


def test_sentence_similarities_are_upstreams(minilm: MiniLMBackbone, tokenizer: Tokenizer) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums.",
             "A man is riding a horse.", "A man is riding a white horse on an enclosed ground."]
    e = encode(minilm, tokenizer, texts)
    cos = (e @ e.T).numpy()
    # measured: 0.7553 (paraphrase), 0.0476 (unrelated), 0.7369 (paraphrase), 0.2474 (eating vs riding)
    assert cos[0, 1] > 0.70
    assert cos[0, 2] < 0.10
    assert cos[3, 4] > 0.70
    assert cos[0, 1] - cos[0, 3] > 0.4


def test_hello_world_matches_the_published_reference(minilm: MiniLMBackbone, tokenizer: Tokenizer) -> None:
    """The first 5 dims of the normalised, mean-pooled "hello world" as fastembed's test suite pins them
    for sentence-transformers/all-MiniLM-L6-v2 (measured here within 6e-6 of its 5-digit values).

    Older fastembed releases pooled the [CLS] token instead and pinned [0.0259, 0.0058, 0.0114,
    0.0380, -0.0233]; the normalised [CLS] state here matches that too, a second, independent check.
    """
    ids = tokenize(tokenizer, ["hello world", "flag embedding"])
    e = minilm.encode(ids)[0].numpy()
    np.testing.assert_allclose(e[:5], [-0.034478, 0.03102, 0.00673, 0.02611, -0.039362], rtol=0, atol=1e-5)
    assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        cls = torch.nn.functional.normalize(minilm.bert(ids)[-1][0, 0], dim=-1).numpy()
    np.testing.assert_allclose(cls[:5], [0.0259, 0.0058, 0.0114, 0.0380, -0.0233], rtol=0, atol=1e-4)


def test_padding_does_not_change_features(minilm: MiniLMBackbone, tokenizer: Tokenizer) -> None:
    texts = ["a cat", "a much longer sentence about a small dog that runs around the park all day"]
    with torch.no_grad():
        batch = minilm(tokenize(tokenizer, texts))
        alone = minilm(tokenize(tokenizer, texts[:1]))
    assert batch["pooled"].shape == (2, 384) and batch["mid"].shape == (2, 384)
    for name in ("pooled", "mid"):
        torch.testing.assert_close(batch[name][:1], alone[name], rtol=0, atol=1e-5)


def test_onnx_parity_with_dynamic_batch_and_sequence(minilm: MiniLMBackbone, tokenizer: Tokenizer, tmp_path) -> None:
    path = tmp_path / "minilm.onnx"
    torch.onnx.export(
        minilm, (torch.ones(2, 5, dtype=torch.long),), str(path), dynamo=False, opset_version=17,
        input_names=["input_ids"], output_names=["pooled", "mid"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "pooled": {0: "batch"}, "mid": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for texts in (["A man is eating food."], ["a cat", "the quick brown fox jumps over the lazy dog", "hello"]):
        ids = tokenize(tokenizer, texts)
        pooled, mid = session.run(["pooled", "mid"], {"input_ids": ids.numpy()})
        with torch.no_grad():
            expected = minilm(ids)
        np.testing.assert_allclose(pooled, expected["pooled"].numpy(), rtol=0, atol=ONNX_TOLERANCE)
        np.testing.assert_allclose(mid, expected["mid"].numpy(), rtol=0, atol=ONNX_TOLERANCE)


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_is_unpadded_and_truncated(tokenizer: Tokenizer, tmp_path) -> None:
    assert tokenizer.padding is None
    assert tokenizer.encode("A man is eating food.").ids == [CLS_ID, 1037, 2158, 2003, 5983, 2833, 1012, SEP_ID]
    long = tokenizer.encode("word " * 100).ids
    assert len(long) == MAX_LENGTH and long[0] == CLS_ID and long[-1] == SEP_ID
    assert tokenizer.encode("").ids == [CLS_ID, SEP_ID]
    assert tokenizer.token_to_id("[PAD]") == PAD_ID
    # What the run saves is what export and Triton's preprocess_text load: the same settings.
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    reloaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert reloaded.padding is None and reloaded.truncation["max_length"] == MAX_LENGTH
    assert reloaded.encode("Hello, world!").ids == tokenizer.encode("Hello, world!").ids


# --- freezing schedules and the caption cache ---------------------------------------------


def test_text_freeze_schedules() -> None:
    assert trainable_layers_for("all", 6) == 0
    assert trainable_layers_for("none", 6) == "all"
    assert trainable_layers_for("top2", 6) == 2
    for bad in ("top7", "half", "top"):
        with pytest.raises(ValueError):
            trainable_layers_for(bad, 6)

    from xmodal.training.models import DualEncoder
    from xmodal.training.recipes import recipe_config

    config = recipe_config("infonce", image_encoder="small_cnn", text_encoder="minilm", text_freeze="top2",
                           text_lr_scale=0.1, dim=32, head_hidden=64)
    model = DualEncoder({**config, "vocab_size": 30522, "pretrained": False})
    assert apply_text_freeze(model.text.backbone, config) is False
    trainable = {name for name, p in model.text.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("bert.encoder.layer.4.", "bert.encoder.layer.5.")) for name in trainable)
    assert len(trainable) == 2 * 16
    model.train()
    assert not model.text.backbone.bert.embeddings.training and not model.text.backbone.bert.encoder.layer[3].training
    assert model.text.backbone.bert.encoder.layer[4].training

    heads, text = parameter_groups(model, nn.ModuleDict(), config)
    assert text["lr"] == pytest.approx(1e-4) and "lr" not in heads
    assert {id(p) for p in text["params"]} == {id(p) for p in model.text.backbone.parameters() if p.requires_grad}

    assert apply_text_freeze(model.text.backbone, {**config, "text_freeze": "all"}) is True
    assert apply_text_freeze(model.text.backbone, {**config, "text_freeze": "auto"}) is True  # pretrained: frozen
    assert apply_text_freeze(model.text.backbone, {**config, "text_freeze": "none"}) is False
    assert len(parameter_groups(model, nn.ModuleDict(), config)[1]["params"]) == 6 * 16 + 5  # + the embeddings


def test_caption_cache_equals_running_the_backbone(minilm: MiniLMBackbone, tokenizer: Tokenizer) -> None:
    captions = ["grinning face", "grinning face: cheerful, cheery, face, grin", "cat", "red apple", "cat"]
    cache = caption_features(minilm, tokenizer, captions, torch.device("cpu"), batch_size=2)
    assert len(cache.index) == 4
    looked_up = cache.lookup(["red apple", "grinning face", "cat"])
    with torch.no_grad():
        direct = minilm(tokenize(tokenizer, ["red apple", "grinning face", "cat"]))
    for name in ("pooled", "mid"):
        torch.testing.assert_close(looked_up[name], direct[name], rtol=0, atol=1e-5)


def test_cli_text_encoder_overrides_the_recipe() -> None:
    from xmodal.cli import build_parser

    assert build_parser().parse_args(["train", "--text-encoder", "minilm"]).text_encoder == "minilm"
    assert build_parser().parse_args(["train"]).text_encoder is None  # the recipe's own


# --- a tiny run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, npm_cache):
    from xmodal.training.emoji import fetch_emoji

    return fetch_emoji(tmp_path_factory.mktemp("emoji"), limit=12, progress=False)


def test_frozen_minilm_run_trains_evaluates_and_exports(manifest, minilm, tmp_path, monkeypatch) -> None:
    from xmodal.export.onnx import export_run
    from xmodal.training.train import train

    monkeypatch.setenv("XMODAL_DATA", str(tmp_path / "data"))  # the image feature cache goes here
    run = tmp_path / "run"
    report = train(manifest, run, recipe="infonce", text_encoder="minilm", image_encoder="small_cnn", image_size=32,
                   epochs=2, minutes=60, text_freeze="all", batch_size=8, progress=False)
    assert report["epochs"] == 2 and all(np.isfinite(h["loss"]) for h in report["history"])
    assert report["text_backbone_frozen"] is True
    from xmodal.training.manifest import read_manifest

    assert report["cached_captions"] == len({c for row in read_manifest(manifest, split="train") for c in row.captions})
    assert report["test"]["global"]["image_to_text"]["MAP"] is not None

    # LiT-style: only the heads trained; the text backbone is still the pretrained one.
    weights = load_file(str(run / "model.safetensors"))
    for name, value in minilm.bert.state_dict().items():
        assert torch.equal(weights[f"text.backbone.bert.{name}"], value), name

    saved = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert saved.padding is None and saved.truncation["max_length"] == MAX_LENGTH

    exported = export_run(run, tmp_path / "onnx")
    assert exported.card.tokenizer.kind == "wordpiece"
    assert exported.card.tokenizer.vocab_hash == vocab_hash(minilm_tokenizer(MAX_LENGTH))
    assert max(exported.parity.values()) <= ONNX_TOLERANCE
    session = ort.InferenceSession(str(exported.text_onnx), providers=["CPUExecutionProvider"])
    ids = np.array([saved.encode("grinning face").ids], dtype=np.int64)
    (served,) = session.run(["global"], {"input_ids": ids})
    assert served.shape == (1, 256) and np.linalg.norm(served) == pytest.approx(1.0, abs=1e-5)
