"""A fine-grained pair scorer (CRAN, MCSM) to ONNX as a text→image re-ranker, checked against PyTorch.

The scorers of :mod:`xmodal.training.finegrained` split into an image side, a text side and a
score; the export follows that split, so the expensive per-image work happens once, at index time:

    rerank_image_side.onnx   the image backbone's ``pooled`` [B, C] and ``fragments`` [B, P, C]
                             → the image side's tensors ``image_<key>`` [B, ...], in
                             :data:`IMAGE_SIDE_KEYS` order: what the indexer stores per image
    rerank.onnx              one query's text backbone features (``query_pooled`` [1, Ct],
                             ``query_fragments`` [1, L, Ct], ``query_fragment_mask`` [1, L]),
                             ``first_stage`` [N] (the first stage's scores of the N candidates) and
                             the candidates' stored ``image_<key>`` [N, ...] → ``scores`` [N],
                             the fused re-ranking score of each candidate

The query's text side is computed once and repeated to the N candidates inside the graph, so a
request carries one query, however many candidates it re-ranks. N and L are dynamic axes; P is
fixed (``patches``), as it is for a given image backbone and image size, so a side stored from a
different backbone is refused by shape rather than scored. Both files pass ``onnx.checker``, and
the scores agree with PyTorch within :data:`~xmodal.export.onnx.PARITY_TOLERANCE` at two (N, L)
different from those traced, with padding present.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from xmodal.export import variants
from xmodal.export.onnx import OPSET, PARITY_TOLERANCE, ParityError

IMAGE_SIDE_ONNX = "rerank_image_side.onnx"
RERANK_ONNX = "rerank.onnx"

# The image side's tensors, in the order the image-side file returns them and the re-ranker takes
# them: the keys of CRANScorer.image_side / MCSMScorer.image_side.
IMAGE_SIDE_KEYS: dict[str, tuple[str, ...]] = {"cran": ("fragments", "mask", "relation"), "mcsm": ("own", "projected")}

IMAGE_SIDE_INPUTS = ("pooled", "fragments")
QUERY_INPUTS = ("query_pooled", "query_fragments", "query_fragment_mask", "first_stage")
SCORES = "scores"

# (N candidates or B images, L tokens, L's masked tail) traced, then checked: the checked sizes differ
# from the traced ones, so a size that tracing froze into the graph fails here, not on the server.
TRACE_SHAPE = (3, 4, 1)
PARITY_SHAPES = ((7, 5, 2), (2, 11, 4))


def side_output_names(kind: str) -> list[str]:
    """The image-side file's output names, which are also the re-ranker's candidate input names."""
    return [f"image_{key}" for key in _keys(kind)]


def rerank_input_names(kind: str) -> list[str]:
    return [*QUERY_INPUTS, *side_output_names(kind)]


def _keys(kind: str) -> tuple[str, ...]:
    if kind not in IMAGE_SIDE_KEYS:
        raise ValueError(f"unknown scorer kind {kind!r}; known: {sorted(IMAGE_SIDE_KEYS)}")
    return IMAGE_SIDE_KEYS[kind]


class ImageSideModule(nn.Module):
    """``scorer.image_side`` as a tuple in :data:`IMAGE_SIDE_KEYS` order: what is stored per image.

    An image has no fragment mask (every patch is real), so none is taken.
    """

    def __init__(self, scorer: nn.Module, kind: str):
        super().__init__()
        self.scorer = scorer
        self.keys = _keys(kind)

    def forward(self, pooled: torch.Tensor, fragments: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # `pooled` is read by MCSM only; CRAN's file still takes it (see _restore_unused_inputs), so
        # both kinds take the same two tensors from the image backbone.
        side = self.scorer.image_side({"pooled": pooled, "fragments": fragments})
        return tuple(side[key] for key in self.keys)


class RerankModule(nn.Module):
    """One query against its N candidates: ``scorer.score(..., pairwise=True)["fused"]`` → ``[N]``.

    The query's text side is computed once, on the ``[1, ...]`` features, and expanded (a view, no
    copy) to the N candidates; N is read from ``first_stage``, which every scorer kind takes, so the
    graph has the same inputs for CRAN (which reads the first stage as its `global` level) and
    MCSM (which does not).
    """

    def __init__(self, scorer: nn.Module, kind: str):
        super().__init__()
        self.scorer = scorer
        self.keys = _keys(kind)

    def forward(self, pooled: torch.Tensor, fragments: torch.Tensor, fragment_mask: torch.Tensor,
                first_stage: torch.Tensor, *candidate_side: torch.Tensor) -> torch.Tensor:
        """pooled ``[1, Ct]``, fragments ``[1, L, Ct]``, fragment_mask ``[1, L]`` (float, 1 for real
        tokens), first_stage ``[N]``, then the candidates' image-side tensors ``[N, ...]`` in
        :data:`IMAGE_SIDE_KEYS` order → scores ``[N]``."""
        if len(candidate_side) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} candidate side tensors {self.keys}, got {len(candidate_side)}")
        text = self.scorer.text_side({"pooled": pooled, "fragments": fragments, "fragment_mask": fragment_mask[..., None]})
        candidates = first_stage.shape[0]
        text = {key: value.expand(candidates, *value.shape[1:]) for key, value in text.items()}
        image = dict(zip(self.keys, candidate_side))
        return self.scorer.score(image, text, first_stage, pairwise=True)["fused"]


def export_reranker(scorer: nn.Module, kind: str, image_dim: int, text_dim: int, out_dir: str | Path, *,
                    patches: int = 16, opset: int = OPSET) -> dict[str, Any]:
    """Export ``scorer``'s image side and its re-ranker to ``out_dir``, check them, assert parity.

    ``image_dim`` / ``text_dim`` are the backbones' feature widths (``C`` / ``Ct``), ``patches`` the
    image backbone's fragment count ``P``. Raises :class:`~xmodal.export.onnx.ParityError` when ONNX
    Runtime and PyTorch differ by more than ``PARITY_TOLERANCE`` on any output. Returns
    ``{"files", "parity_max_abs_diff": {"image_side", "rerank"}, "inputs", "outputs"}``, inputs and
    outputs by file name.
    """
    keys = _keys(kind)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A CPU copy in eval mode: the caller's scorer (possibly mid-training, possibly on a GPU) is
    # left as it was, and the parity inputs below are CPU tensors.
    scorer = copy.deepcopy(scorer).cpu().eval()
    image_module, rerank_module = ImageSideModule(scorer, kind), RerankModule(scorer, kind)
    side_names = side_output_names(kind)
    rerank_inputs = rerank_input_names(kind)
    image_path, rerank_path = out_dir / IMAGE_SIDE_ONNX, out_dir / RERANK_ONNX

    generator = torch.Generator().manual_seed(0)
    traced_n, traced_l, traced_masked = TRACE_SHAPE
    image_example = _image_features(traced_n, patches, image_dim, generator)
    with torch.no_grad():
        traced_side = image_module(*image_example)
    # The exporter warns that an LSTM (MCSM) traced at a batch other than 1 may not run at another:
    # its zero initial state is built from the input's shape here, and the parity check below runs
    # batches other than the traced one.
    image_axes = {name: {0: "batch"} for name in (*IMAGE_SIDE_INPUTS, *side_names)}
    torch.onnx.export(
        image_module, image_example, str(image_path),
        input_names=list(IMAGE_SIDE_INPUTS), output_names=side_names, dynamic_axes=image_axes,
        opset_version=opset, dynamo=False,
    )
    _restore_unused_inputs(image_path, image_example, list(IMAGE_SIDE_INPUTS), image_axes)
    variants.check(image_path)

    rerank_example = (*_query_features(traced_l, traced_masked, text_dim, generator),
                      torch.randn(traced_n, generator=generator), *traced_side)
    rerank_axes = {"query_fragments": {1: "tokens"}, "query_fragment_mask": {1: "tokens"},
                   "first_stage": {0: "candidates"}, SCORES: {0: "candidates"},
                   **{name: {0: "candidates"} for name in side_names}}
    torch.onnx.export(
        rerank_module, rerank_example, str(rerank_path),
        input_names=rerank_inputs, output_names=[SCORES], dynamic_axes=rerank_axes,
        opset_version=opset, dynamo=False,
    )
    _restore_unused_inputs(rerank_path, rerank_example, rerank_inputs, rerank_axes)
    variants.check(rerank_path)

    image_session, rerank_session = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                                     for path in (image_path, rerank_path))
    _require_inputs(image_session, list(IMAGE_SIDE_INPUTS), image_path)
    _require_inputs(rerank_session, rerank_inputs, rerank_path)
    parity = {"image_side": 0.0, "rerank": 0.0}
    for candidates, tokens, masked in PARITY_SHAPES:
        image_features = _image_features(candidates, patches, image_dim, generator)
        query = _query_features(tokens, masked, text_dim, generator)
        first_stage = torch.rand(candidates, generator=generator) * 2 - 1
        with torch.no_grad():
            side = image_module(*image_features)
            expected = rerank_module(*query, first_stage, *side)
        actual_side = image_session.run(side_names, dict(zip(IMAGE_SIDE_INPUTS, _numpy(image_features))))
        parity["image_side"] = max(parity["image_side"], _max_abs_diff(actual_side, side))
        # The re-ranker is fed PyTorch's side, so each file's parity is its own.
        (actual,) = rerank_session.run([SCORES], dict(zip(rerank_inputs, _numpy((*query, first_stage, *side)))))
        if actual.shape != (candidates,):
            raise ParityError(f"{RERANK_ONNX}: scores of shape {actual.shape} for {candidates} candidates")
        parity["rerank"] = max(parity["rerank"], _max_abs_diff([actual], [expected]))
    for name, diff in parity.items():
        if not diff <= PARITY_TOLERANCE:
            raise ParityError(f"{kind} {name}: ONNX Runtime differs from PyTorch by {diff:.2e} > {PARITY_TOLERANCE:.0e}")
    return {
        "files": [image_path, rerank_path],
        "parity_max_abs_diff": parity,
        "inputs": {image_path.name: list(IMAGE_SIDE_INPUTS), rerank_path.name: rerank_inputs},
        "outputs": {image_path.name: side_names, rerank_path.name: [SCORES]},
        "image_side_keys": list(keys),
        "opset": opset,
        "patches": patches,
    }


def _image_features(batch: int, patches: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, patches, dim, generator=generator)


def _query_features(tokens: int, masked: int, dim: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query with its last ``masked`` tokens padding; the padding's features are random, not zero,
    as a backbone's may be, so only the mask keeps them out of the score."""
    mask = torch.ones(1, tokens)
    mask[:, tokens - masked:] = 0
    return torch.randn(1, dim, generator=generator), torch.randn(1, tokens, dim, generator=generator), mask


def _numpy(tensors) -> list[np.ndarray]:
    return [tensor.numpy() for tensor in tensors]


def _max_abs_diff(actual, expected) -> float:
    return max(float(np.max(np.abs(a - e.numpy()))) for a, e in zip(actual, expected))


def _restore_unused_inputs(path: Path, examples, names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Put back the graph inputs the TorchScript exporter dropped because nothing reads them.

    CRAN reads neither ``pooled`` (image side) nor ``query_pooled`` and ``image_mask`` (re-ranker:
    an image's patches are all real, and only the words' mask enters the score); without them its
    files would take other inputs than :func:`rerank_input_names` says, and a client feeding every
    stored tensor would be refused (ONNX Runtime rejects an unknown input name). An unread graph
    input is valid ONNX and costs nothing at run time.
    """
    model = onnx.load(str(path))
    graph = model.graph
    present = {value.name: value for value in graph.input}
    if all(name in present for name in names):
        return
    restored = []
    for name, example in zip(names, examples):
        if name in present:
            restored.append(present[name])
            continue
        axes = dynamic_axes.get(name, {})
        shape = [axes.get(axis, size) for axis, size in enumerate(example.shape)]
        restored.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(
            example.numpy().dtype), shape))
    others = [value for value in graph.input if value.name not in names]
    del graph.input[:]
    graph.input.extend([*restored, *others])
    onnx.save(model, str(path))


def _require_inputs(session: ort.InferenceSession, names: list[str], path: Path) -> None:
    # The server feeds every name in this order, whichever the scorer reads.
    found = [node.name for node in session.get_inputs()]
    if found != names:
        raise RuntimeError(f"{path.name}: inputs {found}, expected {names}")
