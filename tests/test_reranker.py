"""The fine-grained re-ranker in ONNX: the image side and the query-against-candidates scores agree
with the PyTorch scorers (the re-ranker against the *matrix* form, an independent code path),
at sizes other than those traced, reorder candidates as PyTorch does, and ignore padding."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from xmodal.contract import SCORES
from xmodal.export.onnx import PARITY_TOLERANCE
from xmodal.export.reranker import (
    IMAGE_SIDE_KEYS, IMAGE_SIDE_ONNX, RERANK_ONNX, export_reranker, rerank_input_names, side_output_names,
)
from xmodal.training.models import DualEncoder
from xmodal.training.recipes import recipe_config

pytestmark = pytest.mark.timeout(120)

SIZE, VOCAB = 24, 40
# Small random towers; small_cnn's last map is pooled to 2x2: P = 4, not the 16 of EfficientNet-Lite0
# at 128 px, so a P frozen at 16 somewhere would fail.
PATCHES = 4


def _model(kind: str) -> tuple[torch.nn.Module, dict]:
    config = recipe_config(kind, image_encoder="small_cnn", text_encoder="small_text_cnn", image_size=SIZE, dim=16,
                           head_hidden=32)
    config["vocab_size"] = VOCAB
    torch.manual_seed(0)
    model = DualEncoder({**config, "pretrained": False})
    # Random weights stand in for a trained scorer, spread wide enough that the candidates' scores
    # differ clearly (at their initial values the untrained towers' scores agree to 1e-5), and
    # the fusions are not the plain means they start as (zero level logits, zero gate), so a level
    # or space fed to the wrong slot changes the scores.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.5)
        for module in model.modules():  # the pad token's embedding stays zero, as training keeps it
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx] = 0
    return model.eval(), config


@pytest.fixture(scope="module", params=sorted(IMAGE_SIDE_KEYS))
def exported(request, tmp_path_factory):
    kind = request.param
    model, config = _model(kind)
    out = tmp_path_factory.mktemp(kind)
    report = export_reranker(model, config, out, top_n=20)
    sessions = {name: ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
                for name in report.files}
    return kind, model, report, sessions[IMAGE_SIDE_ONNX], sessions[RERANK_ONNX], out


def _pixels(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=generator)


def _ids(tokens: int, padded: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (1, tokens), generator=generator)
    ids[:, tokens - padded:] = 0
    return ids


def _onnx_side(session, kind, pixels) -> list[np.ndarray]:
    return session.run(side_output_names(kind), {"pixel_values": pixels.numpy()})


def _onnx_scores(session, kind, ids, first_stage, side) -> np.ndarray:
    """One request as the server sends it: a batch of one query and its N candidates."""
    feeds = dict(zip(rerank_input_names(kind), [ids.numpy(), first_stage.numpy()[None]] + [s[None] for s in side]))
    (scores,) = session.run([SCORES], feeds)
    assert scores.shape == (1, len(first_stage))
    return scores[0]


def _matrix_scores(model, pixels, ids, first_stage) -> np.ndarray:
    """Column 0 of the scorer's ``[N, 1]`` every-image-against-every-text scores for the one query."""
    with torch.no_grad():
        image_side = model.scorer.image_side(model.image.backbone(pixels))
        text_side = model.scorer.text_side(model.text.backbone(ids))
        fused = model.scorer.score(image_side, text_side, first_stage[:, None])["fused"]
    assert fused.shape == (len(first_stage), 1)
    return fused[:, 0].numpy()


def test_report_and_graph_interface(exported) -> None:
    kind, _, report, image_session, rerank_session, out = exported
    assert report.files == [IMAGE_SIDE_ONNX, RERANK_ONNX]
    for name in report.files:
        onnx.checker.check_model(str(out / name))
    assert all(diff <= PARITY_TOLERANCE for diff in report.parity_max_abs_diff.values())
    assert set(report.parity_max_abs_diff) == {"image_side", "rerank"}
    side = [f"image_{key}" for key in IMAGE_SIDE_KEYS[kind]]
    assert report.inputs == {IMAGE_SIDE_ONNX: ["pixel_values"], RERANK_ONNX: ["input_ids", "first_stage", *side]}
    assert report.outputs == {IMAGE_SIDE_ONNX: side, RERANK_ONNX: [SCORES]}
    # The sessions take exactly those names, MCSM's unread `first_stage` included.
    assert [i.name for i in image_session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in image_session.get_outputs()] == side
    assert [i.name for i in rerank_session.get_inputs()] == report.inputs[RERANK_ONNX]
    shapes = {i.name: i.shape for i in rerank_session.get_inputs()}
    # A batch of one request; N and L symbolic, P and the feature widths fixed.
    assert shapes["input_ids"] == [1, "tokens"]
    assert shapes["first_stage"] == [1, "candidates"]
    assert all(shapes[name][:2] == [1, "candidates"] for name in side)
    assert all(shapes[name][2:] == report.side[name].shape for name in side)
    assert [o.shape for o in rerank_session.get_outputs()] == [[1, "candidates"]]
    if kind == "cran":
        assert report.side["image_fragments"].shape[0] == PATCHES


@pytest.mark.parametrize("count", [1, 5])
def test_image_side_matches_pytorch(exported, count: int) -> None:
    kind, model, report, image_session, _, _ = exported
    pixels = _pixels(count, torch.Generator().manual_seed(count))
    with torch.no_grad():
        expected = model.scorer.image_side(model.image.backbone(pixels))
    actual = _onnx_side(image_session, kind, pixels)
    # Every tensor of the scorer's image side is stored, each once.
    assert sorted(IMAGE_SIDE_KEYS[kind]) == sorted(expected)
    assert len(actual) == len(IMAGE_SIDE_KEYS[kind])
    for key, value in zip(IMAGE_SIDE_KEYS[kind], actual):
        assert value.shape == (count, *report.side[f"image_{key}"].shape) == tuple(expected[key].shape)
        np.testing.assert_allclose(value, expected[key].numpy(), rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.parametrize(("candidates", "tokens", "padded"), [(7, 5, 2), (13, 9, 4), (1, 3, 0)])
def test_rerank_matches_matrix_form(exported, candidates: int, tokens: int, padded: int) -> None:
    kind, model, _, image_session, rerank_session, _ = exported
    generator = torch.Generator().manual_seed(candidates)
    pixels = _pixels(candidates, generator)
    ids = _ids(tokens, padded, generator)
    first_stage = torch.rand(candidates, generator=generator) * 2 - 1
    # The candidates' sides as the indexer stores them: from the image-side file.
    side = _onnx_side(image_session, kind, pixels)
    actual = _onnx_scores(rerank_session, kind, ids, first_stage, side)
    expected = _matrix_scores(model, pixels, ids, first_stage)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
    # Scores that do not depend on the candidate would pass the comparison for N = 1 only.
    if candidates > 1:
        assert np.ptp(expected) > 1e-3


def test_rerank_reorders_first_stage(exported) -> None:
    kind, model, _, image_session, rerank_session, _ = exported
    generator = torch.Generator().manual_seed(42)
    candidates = 8
    pixels = _pixels(candidates, generator)
    ids = _ids(6, 2, generator)
    side = _onnx_side(image_session, kind, pixels)
    # The scorer's own judgement (CRAN's global level at zero), then a first stage that ranks the
    # candidates exactly the other way round: CRAN's fused score is (1 - w_global / 2) · own, the
    # same order as own; MCSM does not read the first stage.
    own = _matrix_scores(model, pixels, ids, torch.zeros(candidates))
    first_stage = torch.from_numpy(-0.5 * own)
    expected = _matrix_scores(model, pixels, ids, first_stage)
    order = np.argsort(-expected)
    # no near ties: the order is well defined (ONNX Runtime and PyTorch agree to ~1e-7)
    assert np.min(-np.diff(expected[order])) > 1e-6

    actual = _onnx_scores(rerank_session, kind, ids, first_stage, side)
    first_stage_order = np.argsort(-first_stage.numpy())
    assert np.argmax(actual) != first_stage_order[0]
    assert list(np.argsort(-actual)) == list(order)
    assert list(order) != list(first_stage_order)


def test_padding_does_not_change_scores(exported) -> None:
    kind, _, _, image_session, rerank_session, _ = exported
    generator = torch.Generator().manual_seed(7)
    candidates = 6
    side = _onnx_side(image_session, kind, _pixels(candidates, generator))
    first_stage = torch.rand(candidates, generator=generator)
    ids = _ids(5, 0, generator)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], dim=1)
    short = _onnx_scores(rerank_session, kind, ids, first_stage, side)
    long = _onnx_scores(rerank_session, kind, padded, first_stage, side)
    np.testing.assert_allclose(long, short, rtol=0, atol=1e-5)
    # The padding is told apart from words: three real tokens in its place score differently.
    worded = torch.cat([ids, torch.randint(1, VOCAB, (1, 3), generator=generator)], dim=1)
    assert np.max(np.abs(_onnx_scores(rerank_session, kind, worded, first_stage, side) - short)) > 1e-4
