"""The fine-grained re-ranker in ONNX: the image side and the query-against-candidates scores agree
with the PyTorch scorers (the re-ranker against the *matrix* form, an independent code path),
at sizes other than those traced, reorder candidates as PyTorch does, and ignore padding."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from xmodal.export.onnx import PARITY_TOLERANCE
from xmodal.export.reranker import (
    IMAGE_SIDE_INPUTS, IMAGE_SIDE_KEYS, IMAGE_SIDE_ONNX, RERANK_ONNX, SCORES, export_reranker, rerank_input_names,
    side_output_names,
)
from xmodal.training.finegrained import CRANScorer, MCSMScorer

pytestmark = pytest.mark.timeout(120)

IMAGE_DIM, TEXT_DIM = 12, 10
PATCHES = 9  # not the default, so a P frozen at 16 somewhere would fail


def _scorer(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    scorer = (CRANScorer(image_dim=IMAGE_DIM, text_dim=TEXT_DIM, dim=8, relation_hidden=6) if kind == "cran"
              else MCSMScorer(image_dim=IMAGE_DIM, text_dim=TEXT_DIM, dim=8, hidden=16))
    # Both fusions start as plain means (zero level logits, zero gate); random values stand in for
    # a trained scorer, so a level or space fed to the wrong slot changes the scores.
    with torch.no_grad():
        if kind == "cran":
            scorer.level_logits.normal_()
        else:
            scorer.gate.weight.normal_()
            scorer.gate.bias.normal_()
    return scorer.eval()


@pytest.fixture(scope="module", params=sorted(IMAGE_SIDE_KEYS))
def exported(request, tmp_path_factory):
    kind = request.param
    scorer = _scorer(kind)
    report = export_reranker(scorer, kind, IMAGE_DIM, TEXT_DIM, tmp_path_factory.mktemp(kind), patches=PATCHES)
    sessions = {path.name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for path in report["files"]}
    return kind, scorer, report, sessions[IMAGE_SIDE_ONNX], sessions[RERANK_ONNX]


def _images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(count, IMAGE_DIM, generator=generator), torch.randn(count, PATCHES, IMAGE_DIM, generator=generator)


def _query(tokens: int, masked: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = torch.ones(1, tokens)
    mask[:, tokens - masked:] = 0
    return torch.randn(1, TEXT_DIM, generator=generator), torch.randn(1, tokens, TEXT_DIM, generator=generator), mask


def _onnx_side(session, kind, pooled, fragments) -> list[np.ndarray]:
    return session.run(side_output_names(kind), {"pooled": pooled.numpy(), "fragments": fragments.numpy()})


def _onnx_scores(session, kind, query, first_stage, side) -> np.ndarray:
    feeds = dict(zip(rerank_input_names(kind), [t.numpy() for t in (*query, first_stage)] + list(side)))
    (scores,) = session.run([SCORES], feeds)
    return scores


def _matrix_scores(scorer, images, query, first_stage) -> np.ndarray:
    """Column 0 of the scorer's ``[N, 1]`` every-image-against-every-text scores for the one query."""
    pooled, fragments, mask = query
    with torch.no_grad():
        image_side = scorer.image_side({"pooled": images[0], "fragments": images[1]})
        text_side = scorer.text_side({"pooled": pooled, "fragments": fragments, "fragment_mask": mask[..., None]})
        fused = scorer.score(image_side, text_side, first_stage[:, None])["fused"]
    assert fused.shape == (len(first_stage), 1)
    return fused[:, 0].numpy()


def test_report_and_graph_interface(exported) -> None:
    kind, _, report, image_session, rerank_session = exported
    assert [path.name for path in report["files"]] == [IMAGE_SIDE_ONNX, RERANK_ONNX]
    for path in report["files"]:
        onnx.checker.check_model(str(path))
    assert all(diff <= PARITY_TOLERANCE for diff in report["parity_max_abs_diff"].values())
    assert set(report["parity_max_abs_diff"]) == {"image_side", "rerank"}
    side = [f"image_{key}" for key in IMAGE_SIDE_KEYS[kind]]
    assert report["inputs"] == {IMAGE_SIDE_ONNX: list(IMAGE_SIDE_INPUTS),
                                RERANK_ONNX: ["query_pooled", "query_fragments", "query_fragment_mask", "first_stage", *side]}
    assert report["outputs"] == {IMAGE_SIDE_ONNX: side, RERANK_ONNX: [SCORES]}
    # The sessions take exactly those names, CRAN's unread `pooled` inputs included.
    assert [i.name for i in image_session.get_inputs()] == list(IMAGE_SIDE_INPUTS)
    assert [o.name for o in image_session.get_outputs()] == side
    assert [i.name for i in rerank_session.get_inputs()] == report["inputs"][RERANK_ONNX]
    shapes = {i.name: i.shape for i in rerank_session.get_inputs()}
    # N and L symbolic, P and the feature widths fixed.
    assert shapes["query_fragments"] == [1, "tokens", TEXT_DIM]
    assert shapes["query_fragment_mask"] == [1, "tokens"]
    assert shapes["first_stage"] == ["candidates"]
    assert all(shapes[name][0] == "candidates" for name in side)
    assert [i.shape for i in image_session.get_inputs()] == [["batch", IMAGE_DIM], ["batch", PATCHES, IMAGE_DIM]]
    if kind == "cran":
        assert shapes["image_fragments"][1] == PATCHES


@pytest.mark.parametrize("count", [1, 5])
def test_image_side_matches_pytorch(exported, count: int) -> None:
    kind, scorer, _, image_session, _ = exported
    pooled, fragments = _images(count, torch.Generator().manual_seed(count))
    with torch.no_grad():
        expected = scorer.image_side({"pooled": pooled, "fragments": fragments})
    actual = _onnx_side(image_session, kind, pooled, fragments)
    # Every tensor of the scorer's image side is stored, each once.
    assert sorted(IMAGE_SIDE_KEYS[kind]) == sorted(expected)
    assert len(actual) == len(IMAGE_SIDE_KEYS[kind])
    for key, value in zip(IMAGE_SIDE_KEYS[kind], actual):
        assert value.shape == tuple(expected[key].shape)
        np.testing.assert_allclose(value, expected[key].numpy(), rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.parametrize(("candidates", "tokens", "masked"), [(7, 5, 2), (13, 9, 4), (1, 3, 0)])
def test_rerank_matches_matrix_form(exported, candidates: int, tokens: int, masked: int) -> None:
    kind, scorer, _, image_session, rerank_session = exported
    generator = torch.Generator().manual_seed(candidates)
    images = _images(candidates, generator)
    query = _query(tokens, masked, generator)
    first_stage = torch.rand(candidates, generator=generator) * 2 - 1
    # The candidates' sides as the indexer would store them: from the image-side file.
    side = _onnx_side(image_session, kind, *images)
    actual = _onnx_scores(rerank_session, kind, query, first_stage, side)
    expected = _matrix_scores(scorer, images, query, first_stage)
    assert actual.shape == (candidates,)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
    # Scores that do not depend on the candidate would pass the comparison for N = 1 only.
    if candidates > 1:
        assert np.ptp(expected) > 1e-3


def test_rerank_reorders_first_stage(exported) -> None:
    kind, scorer, _, image_session, rerank_session = exported
    generator = torch.Generator().manual_seed(42)
    candidates = 8
    images = _images(candidates, generator)
    query = _query(6, 2, generator)
    side = _onnx_side(image_session, kind, *images)
    # The scorer's own judgement (CRAN's global level at zero), then a first stage that ranks the
    # candidates exactly the other way round: CRAN's fused score is (1 - w_global / 2) · own, the
    # same order as own; MCSM does not read the first stage.
    own = _matrix_scores(scorer, images, query, torch.zeros(candidates))
    first_stage = torch.from_numpy(-0.5 * own)
    expected = _matrix_scores(scorer, images, query, first_stage)
    order = np.argsort(-expected)
    assert np.min(-np.diff(expected[order])) > 1e-3  # no near ties: the order is well defined

    actual = _onnx_scores(rerank_session, kind, query, first_stage, side)
    first_stage_order = np.argsort(-first_stage.numpy())
    assert np.argmax(actual) != first_stage_order[0]
    assert list(np.argsort(-actual)) == list(order)
    assert list(order) != list(first_stage_order)


def test_padding_does_not_change_scores(exported) -> None:
    kind, _, _, image_session, rerank_session = exported
    generator = torch.Generator().manual_seed(7)
    candidates = 6
    side = _onnx_side(image_session, kind, *_images(candidates, generator))
    first_stage = torch.rand(candidates, generator=generator)
    pooled, fragments, mask = _query(5, 2, generator)
    # Three more padding tokens with features that are not zero, as a backbone's may not be.
    padded = (pooled, torch.cat([fragments, torch.randn(1, 3, TEXT_DIM, generator=generator)], dim=1),
              torch.cat([mask, torch.zeros(1, 3)], dim=1))
    short = _onnx_scores(rerank_session, kind, (pooled, fragments, mask), first_stage, side)
    long = _onnx_scores(rerank_session, kind, padded, first_stage, side)
    np.testing.assert_allclose(long, short, rtol=0, atol=1e-5)
    # The mask is read: the same eight tokens all marked real score differently.
    unmasked = _onnx_scores(rerank_session, kind, (pooled, padded[1], torch.ones(1, 8)), first_stage, side)
    assert np.max(np.abs(unmasked - short)) > 1e-4
