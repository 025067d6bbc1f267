"""all-MiniLM-L6-v2 in the project's own BERT: a complete weight load, upstream's behaviour, ONNX
export, the WordPiece tokenizer, freezing schedules, and a tiny frozen-text run end to end."""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
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
from xmodal.training.train import apply_text_freeze, caption_features, caption_states, parameter_groups, tokenize

# The real MiniLM weights in every test (a few seconds each on 2 cores), a training run and a server.
pytestmark = pytest.mark.slow

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
    # paraphrases well above the bound, unrelated sentences near 0, eating vs riding in between
    assert cos[0, 1] > 0.70
    assert cos[0, 2] < 0.10
    assert cos[3, 4] > 0.70
    assert cos[0, 1] - cos[0, 3] > 0.4


def test_hello_world_matches_the_published_reference(minilm: MiniLMBackbone, tokenizer: Tokenizer) -> None:
    """The first 5 dims of the normalised, mean-pooled "hello world" as fastembed's test suite pins them
    for sentence-transformers/all-MiniLM-L6-v2, to the tolerance its 5-digit values allow.

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


def test_packed_forward_equals_the_padded_one(minilm: MiniLMBackbone, tokenizer: Tokenizer) -> None:
    texts = ["a cat", "", "the quick brown fox jumps over the lazy dog", "hello world"]
    ids = tokenize(tokenizer, texts)  # "" is [CLS] [SEP]: the most padding a row can have
    real = (ids != 0)[..., None]
    assert (~real).sum() > 10
    with torch.no_grad():
        padded, packed = minilm.bert(ids), minilm.bert.forward_packed(ids)
        assert len(packed) == len(padded) == 7
        for layer, (a, b) in enumerate(zip(padded, packed)):
            torch.testing.assert_close(b, a * real, rtol=0, atol=1e-5, msg=f"states after layer {layer}")
        plain = minilm(ids)
        minilm.remove_padding = True
        try:
            removed = minilm(ids)
            unpadded = minilm(tokenize(tokenizer, texts[2:3]))  # a batch of one: nothing to remove
        finally:
            minilm.remove_padding = False
    for name in ("pooled", "mid", "fragments"):
        torch.testing.assert_close(removed[name], plain[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(unpadded["pooled"], plain["pooled"][2:3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["as trained", "export's (padding removed)"])
def test_onnx_parity_with_dynamic_batch_and_sequence(minilm: MiniLMBackbone, tokenizer: Tokenizer, tmp_path,
                                                     form: str) -> None:
    from xmodal.export.onnx import inference_form

    path = tmp_path / "minilm.onnx"
    with inference_form(minilm) if form.startswith("export") else contextlib.nullcontext():
        torch.onnx.export(
            minilm, (torch.ones(2, 5, dtype=torch.long),), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids"], output_names=["pooled", "mid"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "pooled": {0: "batch"}, "mid": {0: "batch"}},
        )
    assert minilm.remove_padding is False  # restored after the export
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ("NonZero" in ops) == form.startswith("export")  # where the real tokens are found
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



# "mid" (layer 3) below the cut, above it, and everything frozen (the fine-grained recipes cache token states then)
@pytest.mark.parametrize("trainable_layers", [2, 4, 0])
def test_frozen_layer_cache_equals_running_the_backbone(tokenizer: Tokenizer, trainable_layers: int) -> None:
    backbone = MiniLMBackbone(pretrained=True, trainable_layers=trainable_layers)
    assert backbone.frozen_depth == 6 - trainable_layers
    captions = ["grinning face", "grinning face: cheerful, cheery, face, grin", "cat", "red apple", "cat"]
    cache = caption_states(backbone, tokenizer, captions, torch.device("cpu"), batch_size=2)
    assert len(cache.index) == 4 and (cache.mid is not None) == (6 - trainable_layers >= 3)
    assert cache.tokens.shape[0] == sum(len(tokenizer.encode(c).ids) for c in set(captions))  # no padding kept

    query = ["red apple", "grinning face: cheerful, cheery, face, grin", "cat"]
    backbone.eval()
    from_cache = backbone.forward_from(cache.lookup(query))
    with torch.no_grad():
        direct = backbone(tokenize(tokenizer, query))
    for name in ("pooled", "mid", "fragments"):
        torch.testing.assert_close(from_cache[name], direct[name], rtol=0, atol=1e-5)
    if trainable_layers == 0:
        return
    # Training through the cache reaches the top layers and nothing below the cut.
    backbone.train()
    backbone.forward_from(cache.lookup(query))["pooled"].sum().backward()
    top = backbone.bert.encoder.layer[-1].output.dense.weight
    assert top.grad is not None and top.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.bert.encoder.layer[0].parameters())
def test_cli_text_encoder_overrides_the_recipe() -> None:
    from xmodal.cli import build_parser

    assert build_parser().parse_args(["train", "--text-encoder", "minilm"]).text_encoder == "minilm"
    assert build_parser().parse_args(["train"]).text_encoder is None  # the recipe's own
    args = build_parser().parse_args(["train", "--text-encoder", "minilm", "--text-freeze", "top2", "--text-lr-scale", "0.1"])
    assert (args.text_freeze, args.text_lr_scale) == ("top2", 0.1)


def test_minilm_brings_its_sentence_length_unless_told_otherwise() -> None:
    from xmodal.training.recipes import recipe_config

    assert recipe_config("infonce")["max_length"] == 32
    assert recipe_config("infonce", text_encoder="minilm")["max_length"] == 64
    assert recipe_config("infonce", text_encoder="minilm", max_length=128)["max_length"] == 128


# --- a tiny run, its export (FP32 and the INT8 gate) and the real tritonserver serving it ----
#
# One run for the module: 12 emoji concepts, the small CNN image tower at 32 px, MiniLM frozen
# (only the heads train), 2 epochs. It is exported once, with the INT8 variant and its gate,
# and served once by the real tritonserver from a repository written by write_model_repository.

SERVED_MAX_LENGTH = 64  # MiniLM's sentence budget in a run (recipe_config's default for minilm)
LENGTH_BUCKETS = (8, 16, 32, 64)  # preprocess_text pads one text to these (64: the served max length)


@pytest.fixture(scope="module")
def tiny_run(emoji_manifest, tmp_path_factory) -> dict:
    from xmodal.training.train import train

    directory = tmp_path_factory.mktemp("minilm-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XMODAL_DATA", str(directory / "data"))  # the image feature cache goes here
        report = train(emoji_manifest, directory / "run", recipe="infonce", text_encoder="minilm",
                       image_encoder="small_cnn", image_size=32, epochs=2, minutes=60, text_freeze="all",
                       batch_size=8, progress=False)
    return {"dir": directory, "run": directory / "run", "report": report, "manifest": emoji_manifest}


@pytest.fixture(scope="module")
def tiny_export(tiny_run) -> dict:
    """export_run with the MiniLM text encoder quantised (`--quantize int8-text`; the image tower
    here is a barely trained small CNN) and the INT8 gate on the run's held-out split. A refusal fails the gate's test
    alone: the FP32 files and the card the other tests read are complete either way."""
    from xmodal.card import ModelCard
    from xmodal.export.onnx import QuantizationRejected, export_run

    out = tiny_run["dir"] / "onnx"
    try:
        exported, refused = export_run(tiny_run["run"], out, manifests=[tiny_run["manifest"]],
                                       quantize="int8-text"), None
    except QuantizationRejected as exc:
        exported, refused = None, exc
    return {"out": out, "exported": exported, "refused": refused, "card": ModelCard.load(out)}


def test_frozen_minilm_run_trains_evaluates_and_exports(tiny_run, tiny_export, minilm) -> None:
    from xmodal.export.onnx import TEXT_ONNX
    from xmodal.manifest import read_manifest

    report, run = tiny_run["report"], tiny_run["run"]
    assert report["epochs"] == 2 and all(np.isfinite(h["loss"]) for h in report["history"])
    assert report["text_backbone_frozen"] is True
    captions = {c for row in read_manifest(tiny_run["manifest"], split="train") for c in row.captions}
    assert report["cached_captions"] == len(captions)
    assert report["test"]["global"]["image_to_text"]["MAP"] is not None

    # LiT-style: only the heads trained; the text backbone is still the pretrained one.
    weights = load_file(str(run / "model.safetensors"))
    for name, value in minilm.bert.state_dict().items():
        assert torch.equal(weights[f"text.backbone.bert.{name}"], value), name

    saved = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert saved.padding is None and saved.truncation["max_length"] == SERVED_MAX_LENGTH  # MiniLM's sentence budget

    card = tiny_export["card"]
    assert card.tokenizer.kind == "wordpiece" and card.tokenizer.max_length == SERVED_MAX_LENGTH
    assert card.tokenizer.vocab_hash == vocab_hash(minilm_tokenizer(MAX_LENGTH))
    assert max(card.evaluation["onnx_parity_max_abs_diff"].values()) <= ONNX_TOLERANCE
    assert max(card.evaluation["onnx"]["parity_max_abs_diff_raw"].values()) <= ONNX_TOLERANCE
    # The served text encoder is exported without padding tokens (parity above is with the padded module).
    assert "NonZero" in {node.op_type for node in onnx.load(str(tiny_export["out"] / TEXT_ONNX)).graph.node}
    session = ort.InferenceSession(str(tiny_export["out"] / TEXT_ONNX), providers=["CPUExecutionProvider"])
    ids = np.array([saved.encode("grinning face").ids], dtype=np.int64)
    (served,) = session.run(["global"], {"input_ids": ids})
    assert served.shape == (1, 256) and np.linalg.norm(served) == pytest.approx(1.0, abs=1e-5)


def test_minilm_int8_text_goes_through_the_recall_gate(tiny_run, tiny_export) -> None:
    """`--quantize int8-text`: the MiniLM text encoder quantised per channel (the query side; the
    image encoder stays FP32) keeps its recall: the gate accepts it, with both R@10 numbers in
    the card, and the INT8 vectors stay close to FP32's. (The refusal path is
    tests/test_export.py's, on a model that INT8 does break.)"""
    from xmodal.export import variants
    from xmodal.export.onnx import IMAGE_INT8_ONNX, IMAGE_ONNX, TEXT_INT8_ONNX, TEXT_ONNX
    from xmodal.manifest import read_manifest

    out, gate = tiny_export["out"], tiny_export["card"].evaluation["int8_gate"]
    assert gate["metric"] == "R@10" and gate["max_drop_points"] == 1.0 and gate["quantized"] == ["text_encoder"]
    assert gate["styles"] == ["openmoji"] and gate["images"] == tiny_run["report"]["test_images"] == 12
    for direction in variants.DIRECTIONS:
        assert gate["drop"][direction] == pytest.approx(gate["fp32"][direction] - gate["int8"][direction], abs=1e-3)
        # The FP32 numbers are the run's own held-out evaluation (R@10 over the same images and labels).
        assert gate["fp32"][direction] == pytest.approx(tiny_run["report"]["test"]["global"][direction]["R@10"])
    assert gate["accepted"] is True and all(gate["drop"][d] <= 1.0 for d in variants.DIRECTIONS)
    assert tiny_export["refused"] is None

    chosen = tiny_export["exported"].choose("cpu")
    assert chosen.precision == "int8-text"
    assert chosen.image_onnx == out / IMAGE_ONNX and chosen.text_onnx == out / TEXT_INT8_ONNX
    assert not (out / IMAGE_INT8_ONNX).exists()  # the image encoder is not quantised
    assert set(chosen.notes["latency_ms"]) == {"text_encoder"}
    assert chosen.card.fingerprint == chosen.fingerprint != tiny_export["card"].fingerprint
    ops = variants.op_types(chosen.text_onnx)
    assert any("Integer" in op or "Quant" in op for op in ops), ops
    # The embedding table and the 6 layers' MatMuls hold the bytes: INT8 is about a quarter of FP32.
    assert (out / TEXT_INT8_ONNX).stat().st_size < 0.35 * (out / TEXT_ONNX).stat().st_size
    # And the vectors stay close to FP32's.
    from xmodal.training.train import tokenize

    labels = sorted({row.captions[0] for row in read_manifest(tiny_run["manifest"])})
    ids = tokenize(Tokenizer.from_file(str(out / "tokenizer.json")), labels).numpy()
    fp32_vectors, int8_vectors = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["global"], {"input_ids": ids})[0]
        for path in (out / TEXT_ONNX, out / TEXT_INT8_ONNX))
    assert float((fp32_vectors * int8_vectors).sum(axis=1).min()) > 0.9


# --- served by the real tritonserver ---------------------------------------------------------


TRICKY_TEXTS = {
    "accents": "café naïve Ångström",
    "decomposed accents": "cafe\u0301 nai\u0308ve A\u030angstro\u0308m",
    "emoji": "😀 grinning face 👍🏽",
    "cjk": "猫と犬が好き 中文字符 한국어",
    "mixed case and punctuation": "Hello,WORLD!! It's (MiXeD) CaSe... e-mail: A.B@c.com #tag 3.14",
    "whitespace around": "  \t leading,\n\n trailing \u3000 and ideographic spaces  ",
    "10k characters": ("Ångström café 😀 naïve words, " * 400)[:10_000],
    "10k characters, one word": "x" * 10_000,  # longer than WordPiece's 100 characters a word: [UNK]
}


@pytest.fixture(scope="module")
def minilm_server(tiny_export):
    from tinymodel import serving

    from xmodal.export.onnx import IMAGE_ONNX, TEXT_ONNX
    from xmodal.export.repository import write_model_repository

    out = tiny_export["out"]
    repository = write_model_repository(
        out.parent / "model_repository", tiny_export["card"], image_onnx=out / IMAGE_ONNX, text_onnx=out / TEXT_ONNX,
        tokenizer_json=out / "tokenizer.json", max_batch_size=8)
    with serving(repository) as server:  # stops the server (and its stubs) on teardown
        yield server


@pytest.fixture(scope="module")
def minilm_client(minilm_server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(minilm_server.url)
    yield client
    client.close()  # before the server stops: Triton waits for open connections


def _infer_text(client, model: str, texts: list[bytes]):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_).reshape(-1, 1))
    return client.infer(model, [tensor])


def test_minilm_served_card_names_the_wordpiece_tokenizer(tiny_export, minilm_client) -> None:
    from xmodal.card import CARD_PARAMETER, ModelCard

    assert minilm_client.is_server_ready()
    card = ModelCard.from_json(minilm_client.get_model_config("embed_text")["parameters"][CARD_PARAMETER]["string_value"])
    assert card.fingerprint == tiny_export["card"].fingerprint
    assert card.tokenizer.kind == "wordpiece" and card.tokenizer.max_length == SERVED_MAX_LENGTH
    assert card.tokenizer.vocab_hash == vocab_hash(minilm_tokenizer(SERVED_MAX_LENGTH))


def test_minilm_embed_text_through_triton_matches_onnxruntime(tiny_run, tiny_export, minilm_client) -> None:
    from xmodal.export.onnx import TEXT_ONNX

    texts = ["grinning face", "A man is eating food.", TRICKY_TEXTS["accents"], TRICKY_TEXTS["emoji"],
             TRICKY_TEXTS["cjk"], TRICKY_TEXTS["10k characters"]]
    session = ort.InferenceSession(str(tiny_export["out"] / TEXT_ONNX), providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(tiny_run["run"] / "tokenizer.json"))
    for batch in (texts, texts[:1], texts[3:4]):
        got = _infer_text(minilm_client, "embed_text", [t.encode() for t in batch]).as_numpy("global")
        (want,) = session.run(["global"], {"input_ids": tokenize(tokenizer, batch).numpy()})
        assert got.shape == want.shape == (len(batch), 256)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # A query alone or inside a batch padded to a longer text: the same vector (padding is masked).
    alone = _infer_text(minilm_client, "embed_text", [texts[0].encode()]).as_numpy("global")
    together = _infer_text(minilm_client, "embed_text", [t.encode() for t in texts]).as_numpy("global")
    np.testing.assert_allclose(alone[0], together[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(TRICKY_TEXTS))
def test_minilm_triton_tokenizer_matches_training(tiny_run, minilm_client, case) -> None:
    """The ids Triton's preprocess_text makes from the exported tokenizer.json are the trainer's."""
    text = TRICKY_TEXTS[case]
    (padded,) = _infer_text(minilm_client, "preprocess_text", [text.encode()]).as_numpy("input_ids").tolist()
    assert len(padded) in LENGTH_BUCKETS
    served = padded[:len(padded) - next(i for i, v in enumerate(reversed(padded)) if v != PAD_ID)]
    from_run = Tokenizer.from_file(str(tiny_run["run"] / "tokenizer.json")).encode(text).ids
    assert served == from_run == minilm_tokenizer(SERVED_MAX_LENGTH).encode(text).ids
    assert served[0] == CLS_ID and served[-1] == SEP_ID and len(served) > 2
    if case == "10k characters":
        assert len(served) == SERVED_MAX_LENGTH  # truncated, [SEP] kept
    if case == "10k characters, one word":
        assert served == [CLS_ID, 100, SEP_ID]  # [UNK]
    if case == "decomposed accents":
        assert served == minilm_tokenizer(SERVED_MAX_LENGTH).encode(TRICKY_TEXTS["accents"]).ids


def test_minilm_triton_pads_a_batch_with_the_pad_id(minilm_client) -> None:
    texts = [TRICKY_TEXTS["emoji"], TRICKY_TEXTS["cjk"], "a"]
    ids = _infer_text(minilm_client, "preprocess_text", [t.encode() for t in texts]).as_numpy("input_ids")
    expected = tokenize(minilm_tokenizer(SERVED_MAX_LENGTH), texts).numpy()
    # a batch is padded to its longest text only (one text alone goes to a length bucket, above)
    assert ids.shape[1] == expected.shape[1]
    assert ids.dtype == np.int64 and np.array_equal(ids[:, :expected.shape[1]], expected)
    assert (ids[:, expected.shape[1]:] == PAD_ID).all()
    assert ids[2, 3:].tolist() == [PAD_ID] * (ids.shape[1] - 3)


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (b"", r"TEXT\[0\] is empty"),
        (" \t\n\u3000 ".encode(), r"TEXT\[0\] is empty"),  # whitespace only (ideographic space included)
        ("\u200b\u200b".encode(), r"TEXT\[0\] has no tokens"),  # zero-width spaces: BERT's normaliser drops them
        (b"\xff\xfe\xfa", r"TEXT\[0\] is not valid UTF-8"),
        (b"caf\xe9", r"TEXT\[0\] is not valid UTF-8"),  # Latin-1, not UTF-8
    ],
    ids=["empty", "whitespace only", "zero-width only", "non-UTF-8 bytes", "Latin-1 bytes"],
)
def test_minilm_bad_text_is_that_requests_error(minilm_client, item, reason) -> None:
    from tritonclient.utils import InferenceServerException

    for model in ("preprocess_text", "embed_text"):
        with pytest.raises(InferenceServerException, match=reason) as caught:
            _infer_text(minilm_client, model, [item])
        assert str(caught.value.status()) == "400"  # INVALID_ARG
        assert minilm_client.is_server_live() and minilm_client.is_server_ready()
    assert _infer_text(minilm_client, "embed_text", [b"a cat"]).as_numpy("global").shape == (1, 256)


def test_minilm_triton_and_the_local_embedder_refuse_and_encode_texts_alike(tiny_export, minilm_server,
                                                                             minilm_client) -> None:
    """Both run xmodal/text_preprocessing.py: every bad text refused in the same words (the server
    names the request's row, ``TEXT[1] is empty``; the local embedder the text, ``text is empty``),
    and the same ids and vectors for the good ones, alone (a length bucket) and together."""
    from tritonclient.utils import InferenceServerException

    from xmodal.indexer.local import LocalEmbedder

    dims = {level: spec["dim"] for level, spec in tiny_export["card"].embeddings.items()}
    embedder = LocalEmbedder(minilm_server.model_repository, "text", dims, threads=1)
    no_tokens = "has no tokens (only characters the tokenizer removes)"
    refusals = {b"": "is empty", " \t\n\u3000 ".encode(): "is empty", b"caf\xe9": "is not valid UTF-8: ",
                b"\xff\xfe\xfa": "is not valid UTF-8: ", "\u200b\u200b".encode(): no_tokens, b"\x00\x07": no_tokens}
    bad = list(refusals)
    good = [text.encode() for text in ("grinning face", TRICKY_TEXTS["emoji"], TRICKY_TEXTS["10k characters"])]
    items = bad + good
    out = embedder({"item": np.arange(len(items)), "data": np.array(items, dtype=object),
                    "error": np.array([""] * len(items), dtype=object)})
    assert list(out["error"][len(bad):]) == [""] * len(good)
    for item, local in zip(bad, out["error"]):
        assert local.startswith(f"local: text {refusals[item]}"), local
        reason = local.removeprefix("local: text ")
        with pytest.raises(InferenceServerException) as caught:
            _infer_text(minilm_client, "embed_text", [b"a cat", item])
        assert f"preprocess_text: TEXT[1] {reason}" in caught.value.message()
        assert str(caught.value.status()) == "400"

    for batch in [[text] for text in good] + [good]:
        served = _infer_text(minilm_client, "preprocess_text", batch).as_numpy("input_ids")
        local, reasons = embedder.text_preprocessor.input_ids(batch)
        assert reasons == [None] * len(batch) and local.dtype == served.dtype == np.int64
        assert np.array_equal(local, served)
    served = _infer_text(minilm_client, "embed_text", good).as_numpy("global")
    np.testing.assert_allclose(out["vector"][len(bad):], served, rtol=0, atol=1e-5)
