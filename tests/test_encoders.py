"""Backbones: the pretrained EfficientNet-Lite0, GloVe tables, the project's text backbones.

Every backbone maps its input to ``{"pooled": [B, C_top], "mid": [B, C_mid]}`` with
``dims`` giving the widths; each must export to ONNX (legacy exporter, opset 17, dynamic
batch and, for text, sequence axes) and match PyTorch in ONNX Runtime within 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from xmodal.preprocessing import decode_image, image_to_array
from xmodal.training.efficientnet import EfficientNetLite0Backbone, load_pretrained_state_dict
from xmodal.training.glove import GLOVE_DIM, glove_embedding_matrix, load_glove
from xmodal.training.text_encoders import DualPathTextCNN, SmallTransformerText
from xmodal.training.tokenizer import PAD_ID, train_wordlevel_tokenizer

ONNX_TOLERANCE = 1e-4
VOCAB_SIZE = 300


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Backbone:
    return EfficientNetLite0Backbone(pretrained=True).eval()


def check_onnx_parity(model: torch.nn.Module, example: torch.Tensor, feed: torch.Tensor, path: Path, input_name: str) -> None:
    """Export with dynamic batch (and sequence for 2-D inputs), run ``feed`` (another shape) in ORT, compare."""
    axes = {0: "batch", 1: "sequence"} if example.ndim == 2 else {0: "batch"}
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=17,
        input_names=[input_name], output_names=["pooled", "mid"],
        dynamic_axes={input_name: axes, "pooled": {0: "batch"}, "mid": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pooled, mid = session.run(["pooled", "mid"], {input_name: feed.numpy()})
    with torch.no_grad():
        expected = model(feed)
    assert pooled.shape == (feed.shape[0], model.dims["pooled"]) and mid.shape == (feed.shape[0], model.dims["mid"])
    np.testing.assert_allclose(pooled, expected["pooled"].numpy(), rtol=0, atol=ONNX_TOLERANCE)
    np.testing.assert_allclose(mid, expected["mid"].numpy(), rtol=0, atol=ONNX_TOLERANCE)


# --- EfficientNet-Lite0 -------------------------------------------------------------------


@pytest.mark.slow
def test_efficientnet_pretrained_weights_load_strictly() -> None:
    state = load_pretrained_state_dict()
    model = EfficientNetLite0Backbone(pretrained=False)
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(model.state_dict()) == set(state)
    assert torch.equal(model._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 128, 224])
def test_efficientnet_features_at_any_size(effnet: EfficientNetLite0Backbone, size: int) -> None:
    assert effnet.dims == {"pooled": 1280, "mid": 112, "fragments": 1280}
    with torch.no_grad():
        out = effnet(torch.randn(1, 3, size, size))
    assert out["pooled"].shape == (1, 1280) and out["mid"].shape == (1, 112)
    cells = -(-size // 32)  # "SAME" padding: ceil(S / 32) cells a side
    assert out["fragments"].shape == (1, cells * cells, 1280)
    torch.testing.assert_close(out["fragments"].mean(dim=1), out["pooled"])  # the patches average to the pooled feature
    assert torch.isfinite(out["pooled"]).all() and torch.isfinite(out["mid"]).all()


@pytest.mark.slow
def test_efficientnet_classifies_a_photograph(effnet: EfficientNetLite0Backbone) -> None:
    """Grace Hopper in uniform (matplotlib's sample photo, no download): ImageNet 652 'military uniform'."""
    from matplotlib import cbook

    image = decode_image(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes())
    pixels = torch.from_numpy(image_to_array(image, 224, effnet.mean, effnet.std))[None]
    with torch.no_grad():
        probs = effnet.classify(pixels).softmax(dim=-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == 652, top5  # 652 military uniform (what she wears); her bow tie (457) or suit (834) follows
    assert 457 in top5 or 834 in top5


# Emoji with an ImageNet class, then more concepts for the cross-style check.
EMOJI_IMAGENET = {"1f34c": 954, "1f355": 963, "1f353": 949, "1f34d": 953, "1f344": 947}
EMOJI_MORE = ["1f34e", "1f3c0", "1f981", "1f3b8", "1f34b", "1f966", "1f33d", "1f36a", "1f697", "1f525", "1f40c"]
EMOJI_STYLES = ("google", "twitter")
FULL_CORPUS = Path("/tmp/xmodal-full-data/emoji/images")


def emoji_images(concepts: list[str], npm_cache: Path) -> dict[tuple[str, str], Image.Image]:
    """(style, concept) → image: from a rendered corpus when one is on disk, else from the npm tarballs."""
    from xmodal.settings import data_dir

    for root in (FULL_CORPUS, data_dir() / "emoji" / "images"):
        paths = {(s, c): root / s / f"{c}.png" for s in EMOJI_STYLES for c in concepts}
        if all(path.is_file() for path in paths.values()):
            return {key: decode_image(path.read_bytes()) for key, path in paths.items()}

    from xmodal.training.emoji import STYLE_SOURCES, list_tar_files, npm_pack, read_tar_files, style_files

    images = {}
    for source in (s for s in STYLE_SOURCES if s.style in EMOJI_STYLES):
        tarball = npm_pack(source.package, npm_cache)
        members = style_files(list_tar_files(tarball), source)
        files = read_tar_files(tarball, [members[c] for c in concepts])
        images.update({(source.style, c): decode_image(files[members[c]]) for c in concepts})
    return images


@pytest.mark.slow
def test_efficientnet_features_recognise_emoji_across_styles(effnet: EfficientNetLite0Backbone, npm_cache: Path) -> None:
    """The frozen features must carry emoji identity across drawing styles (Google ↔ Twitter).

    ImageNet *classification* of flat emoji art is poor (out of distribution: the ImageNet
    classes of Google-style banana, pizza, strawberry, pineapple and mushroom are mostly
    missing from their top 5 at 224 px), so what is checked is what retrieval uses: each
    Google emoji's nearest Twitter emoji among 16 concepts is its own (chance 1/16), at
    128 px, both ways, for most of the concepts (the assertion's bound).
    """
    concepts = list(EMOJI_IMAGENET) + EMOJI_MORE
    images = emoji_images(concepts, npm_cache)
    features = {}
    for style in EMOJI_STYLES:
        pixels = np.stack([image_to_array(images[(style, c)], 128, effnet.mean, effnet.std) for c in concepts])
        with torch.no_grad():
            features[style] = torch.nn.functional.normalize(effnet(torch.from_numpy(pixels))["pooled"], dim=-1)
    similarity = features["google"] @ features["twitter"].T
    target = torch.arange(len(concepts))
    google_to_twitter = (similarity.argmax(dim=1) == target).float().mean().item()
    twitter_to_google = (similarity.argmax(dim=0) == target).float().mean().item()
    assert google_to_twitter >= 0.75 and twitter_to_google >= 0.75, (google_to_twitter, twitter_to_google)


@pytest.mark.slow
def test_efficientnet_onnx_parity(effnet: EfficientNetLite0Backbone, tmp_path: Path) -> None:
    check_onnx_parity(effnet, torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64), tmp_path / "image.onnx", "pixel_values")


# --- text backbones -----------------------------------------------------------------------


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The model with every parameter jittered (zero-initialised norms and pad rows included), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


TEXT_BACKBONES = {
    "dual_path_cnn": lambda: DualPathTextCNN(VOCAB_SIZE, width=64, blocks=3),
    "transformer": lambda: SmallTransformerText(VOCAB_SIZE, width=32, layers=2, heads=4, max_length=16),
}


def padded_ids() -> torch.Tensor:
    ids = torch.randint(1, VOCAB_SIZE, (4, 9), generator=torch.Generator().manual_seed(1))
    ids[0, 3:] = PAD_ID
    ids[2, 6:] = PAD_ID
    ids[3, :] = PAD_ID  # an empty caption
    return ids


@pytest.mark.parametrize("name", sorted(TEXT_BACKBONES))
def test_text_backbone_ignores_padding(name: str) -> None:
    model = perturbed(TEXT_BACKBONES[name]())
    ids = padded_ids()
    with torch.no_grad():
        batch = model(ids)
        for row, length in ((0, 3), (1, 9), (2, 6)):
            alone = model(ids[row : row + 1, :length])
            for key in ("pooled", "mid"):
                torch.testing.assert_close(batch[key][row], alone[key][0], rtol=0, atol=1e-5)
        # the pad rows really are ignored: changing the pad embedding changes nothing
        model.embed.weight[PAD_ID].add_(5.0)
        again = model(ids)
    for key in ("pooled", "mid"):
        assert batch[key].shape == (4, model.dims[key])
        torch.testing.assert_close(again[key], batch[key], rtol=0, atol=1e-5)
        assert torch.equal(batch[key][3], torch.zeros(model.dims[key]))  # empty caption → zeros


@pytest.mark.parametrize("name", sorted(TEXT_BACKBONES))
def test_text_backbone_onnx_parity(name: str, tmp_path: Path) -> None:
    model = perturbed(TEXT_BACKBONES[name]())
    example = torch.randint(1, VOCAB_SIZE, (2, 5))
    check_onnx_parity(model, example, padded_ids(), tmp_path / f"{name}.onnx", "input_ids")


@pytest.mark.slow
def test_text_backbones_train() -> None:
    """Gradients reach every parameter of both (the zero-initialised residual norms included)."""
    for name, build in TEXT_BACKBONES.items():
        model = build().train()
        out = model(padded_ids())
        (out["pooled"].square().sum() + out["mid"].square().sum()).backward()
        for pname, parameter in model.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), (name, pname)


# --- GloVe --------------------------------------------------------------------------------


def test_load_glove_is_the_packaged_table_and_cached() -> None:
    words, vectors = load_glove()
    assert len(words) == 400_000 and vectors.shape == (400_000, GLOVE_DIM) and vectors.dtype == np.float32
    assert words[0] == "the"
    np.testing.assert_allclose(vectors[0, :3], [0.418, 0.24968, -0.41242])  # GloVe 6B 50d's first entry
    assert load_glove()[1] is vectors


def test_glove_embedding_matrix_on_a_tiny_vocabulary() -> None:
    words, vectors = load_glove()
    vocab = {"[PAD]": 0, "[UNK]": 1, "banana": 2, "pizza": 3, "qqzxvbnmw": 4, "the": 5}
    matrix, coverage = glove_embedding_matrix(vocab)
    assert matrix.shape == (6, GLOVE_DIM) and matrix.dtype == torch.float32
    for word in ("banana", "pizza", "the"):
        assert torch.equal(matrix[vocab[word]], torch.tensor(vectors[words.index(word)]))
    assert torch.equal(matrix[0], torch.zeros(GLOVE_DIM))
    assert coverage == pytest.approx(3 / 4)  # [PAD] and [UNK] are not words
    unknown = matrix[vocab["qqzxvbnmw"]]
    assert 0 < unknown.std().item() < 0.2  # small random, not zero
    again, _ = glove_embedding_matrix(vocab, seed=0)
    other, _ = glove_embedding_matrix(vocab, seed=1)
    assert torch.equal(again, matrix) and not torch.equal(other[4], matrix[4])
    with pytest.raises(ValueError):
        glove_embedding_matrix(vocab, dim=300)


def test_dual_path_cnn_starts_from_glove_for_a_real_tokenizer() -> None:
    tokenizer = train_wordlevel_tokenizer(["red apple", "banana: fruit, yellow", "grinning face"], max_length=16)
    matrix, coverage = glove_embedding_matrix(tokenizer.get_vocab())
    assert coverage == 1.0  # red apple banana : fruit , yellow grinning face — all in GloVe
    model = DualPathTextCNN(tokenizer.get_vocab_size(), embedding_init=matrix, width=32, blocks=1)
    assert torch.equal(model.embed.weight.detach(), matrix)
    ids = torch.tensor([tokenizer.encode("yellow banana").ids])
    assert model(ids)["pooled"].shape == (1, 32)
    with pytest.raises(ValueError):
        DualPathTextCNN(tokenizer.get_vocab_size() + 1, embedding_init=matrix)
