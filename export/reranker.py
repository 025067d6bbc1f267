"""A fine-grained pair scorer (CRAN, MCSM) to ONNX as a served text→image re-ranker, checked against PyTorch.

The scorers of :mod:`xmodal.training.finegrained` split into an image side, a text side and a
score; the export follows that split, so the expensive per-image work happens once, at index time,
and the files take what Triton's ensembles give them (pixels, token ids):

    rerank_image_side.onnx   ``pixel_values`` [B, 3, S, S] → the image backbone → the image side's
                             tensors ``image_<key>`` [B, ...], in :data:`IMAGE_SIDE_KEYS` order:
                             what the indexer stores per image (the side store)
    rerank.onnx              one query's ``input_ids`` [1, L], ``first_stage`` [1, N] (the first
                             stage's scores of its N candidates) and the candidates' stored
                             ``image_<key>`` [1, N, ...] → ``scores`` [1, N], the fused
                             re-ranking score of each candidate

The leading 1 of the re-ranker's tensors is Triton's batch of one request (``max_batch_size: 1``):
a request is one query with however many candidates it re-ranks, and the query's text side is
computed once inside the graph and expanded (a view, no copy) to the N candidates. N and L are
dynamic axes; P, the image backbone's fragment count, is fixed, as it is for a given backbone and
image size, so a side stored from another model is refused by shape rather than scored. Both files
pass ``onnx.checker``, and agree with PyTorch within :data:`~xmodal.export.onnx.PARITY_TOLERANCE`
at sizes other than those traced, with padding present.
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
from xmodal.card import RerankerSpec, SideTensor, fingerprint_files
from xmodal.contract import FIRST_STAGE, INPUT_IDS, PIXEL_VALUES, SCORES, side_tensor
from xmodal.export.onnx import OPSET, PARITY_TOLERANCE, ParityError
from xmodal.training.tokenizer import PAD_ID

IMAGE_SIDE_ONNX = "rerank_image_side.onnx"
RERANK_ONNX = "rerank.onnx"

# The image side's tensors, in the order the image-side file returns them and the re-ranker takes
# them: the keys of CRANScorer.image_side / MCSMScorer.image_side.
IMAGE_SIDE_KEYS: dict[str, tuple[str, ...]] = {"cran": ("fragments", "mask", "relation"), "mcsm": ("own", "projected")}

QUERY_INPUTS = (INPUT_IDS, FIRST_STAGE)

# (N candidates or B images, L tokens, L's padded tail) traced, then checked: the checked sizes
# differ from the traced ones, so a size that tracing froze into the graph fails here, not on the server.
TRACE_SHAPE = (3, 4, 1)
PARITY_SHAPES = ((7, 5, 2), (2, 11, 4))


def side_output_names(kind: str) -> list[str]:
    """The image-side file's output names, which are also the re-ranker's candidate input names."""
    return [side_tensor(key) for key in _keys(kind)]


def rerank_input_names(kind: str) -> list[str]:
    return [*QUERY_INPUTS, *side_output_names(kind)]


def _keys(kind: str) -> tuple[str, ...]:
    if kind not in IMAGE_SIDE_KEYS:
        raise ValueError(f"unknown scorer kind {kind!r}; known: {sorted(IMAGE_SIDE_KEYS)}")
    return IMAGE_SIDE_KEYS[kind]


class ImageSideModule(nn.Module):
    """Pixels → the image backbone → ``scorer.image_side`` as a tuple in :data:`IMAGE_SIDE_KEYS` order.

    An image has no fragment mask (every patch is real), so none is passed on.
    """

    def __init__(self, backbone: nn.Module, scorer: nn.Module, kind: str):
        super().__init__()
        self.backbone = backbone
        self.scorer = scorer
        self.keys = _keys(kind)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(pixel_values)
        side = self.scorer.image_side({"pooled": features["pooled"], "fragments": features["fragments"]})
        return tuple(side[key] for key in self.keys)


class RerankModule(nn.Module):
    """One query against its N candidates: ``scorer.score(..., pairwise=True)["fused"]`` → ``[1, N]``.

    N is read from ``first_stage``, which every scorer kind takes, so the graph has the same inputs
    for CRAN (which reads the first stage as its `global` level) and MCSM (which does not).
    """

    def __init__(self, backbone: nn.Module, scorer: nn.Module, kind: str):
        super().__init__()
        self.backbone = backbone
        self.scorer = scorer
        self.keys = _keys(kind)

    def forward(self, input_ids: torch.Tensor, first_stage: torch.Tensor, *candidate_side: torch.Tensor) -> torch.Tensor:
        """input_ids ``[1, L]`` (padded with the tokenizer's pad id), first_stage ``[1, N]``, then the
        candidates' image-side tensors ``[1, N, ...]`` in :data:`IMAGE_SIDE_KEYS` order → ``[1, N]``."""
        if len(candidate_side) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} candidate side tensors {self.keys}, got {len(candidate_side)}")
        text = self.scorer.text_side(self.backbone(input_ids))
        candidates = first_stage.shape[1]
        text = {key: value.expand(candidates, *value.shape[1:]) for key, value in text.items()}
        image = {key: side[0] for key, side in zip(self.keys, candidate_side)}
        return self.scorer.score(image, text, first_stage[0], pairwise=True)["fused"][None]


def export_reranker(model: nn.Module, config: dict[str, Any], out_dir: str | Path, *, top_n: int,
                    opset: int = OPSET) -> RerankerSpec:
    """Export the pair scorer of ``model`` (a DualEncoder with a ``scorer``) as the image-side file
    and the re-ranker, check both, assert parity with PyTorch.

    Raises :class:`~xmodal.export.onnx.ParityError` when ONNX Runtime and PyTorch differ by more
    than ``PARITY_TOLERANCE`` on any output. Returns the model card's ``reranker`` entry: the
    files, their fingerprint, parity, inputs and outputs by file name, side shapes per image
    (without the batch axis) and `top_n`, the first-stage hits it re-ranks.
    """
    if getattr(model, "scorer", None) is None:
        raise ValueError(f"recipe {config.get('recipe')!r} has no pair scorer to export as a re-ranker")
    kind = config["scorer"]["kind"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A CPU copy in eval mode: the caller's model (possibly mid-training, possibly on a GPU) is
    # left as it was, and the parity inputs below are CPU tensors.
    model = copy.deepcopy(model).cpu().eval()
    # The wrappers in eval mode too: torch.onnx.export restores the mode of the module it is given,
    # recursively, so a wrapper left in training mode would switch the scorer's dropout back on.
    image_module = ImageSideModule(model.image.backbone, model.scorer, kind).eval()
    rerank_module = RerankModule(model.text.backbone, model.scorer, kind).eval()
    side_names = side_output_names(kind)
    rerank_inputs = rerank_input_names(kind)
    image_path, rerank_path = out_dir / IMAGE_SIDE_ONNX, out_dir / RERANK_ONNX
    size, vocab = int(config["image_size"]), int(config["vocab_size"])

    generator = torch.Generator().manual_seed(0)
    traced_n, traced_l, traced_padded = TRACE_SHAPE
    pixels = torch.randn(traced_n, 3, size, size, generator=generator)
    with torch.no_grad():
        traced_side = image_module(pixels)
    # The exporter warns that an LSTM (MCSM) traced at a batch other than 1 may not run at another:
    # its zero initial state is built from the input's shape here, and the parity check below runs
    # batches other than the traced one.
    image_axes = {name: {0: "batch"} for name in (PIXEL_VALUES, *side_names)}
    torch.onnx.export(image_module, (pixels,), str(image_path), input_names=[PIXEL_VALUES], output_names=side_names,
                      dynamic_axes=image_axes, opset_version=opset, dynamo=False)
    variants.check(image_path)

    rerank_example = (_query_ids(traced_l, traced_padded, vocab, generator),
                      torch.rand(1, traced_n, generator=generator) * 2 - 1, *(side[None] for side in traced_side))
    rerank_axes = {INPUT_IDS: {1: "tokens"}, FIRST_STAGE: {1: "candidates"}, SCORES: {1: "candidates"},
                   **{name: {1: "candidates"} for name in side_names}}
    torch.onnx.export(rerank_module, rerank_example, str(rerank_path), input_names=rerank_inputs,
                      output_names=[SCORES], dynamic_axes=rerank_axes, opset_version=opset, dynamo=False)
    _restore_unused_inputs(rerank_path, rerank_example, rerank_inputs, rerank_axes)
    variants.check(rerank_path)

    image_session, rerank_session = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                                     for path in (image_path, rerank_path))
    _require_inputs(image_session, [PIXEL_VALUES], image_path)
    _require_inputs(rerank_session, rerank_inputs, rerank_path)
    parity = {"image_side": 0.0, "rerank": 0.0}
    for candidates, tokens, padded in PARITY_SHAPES:
        pixels = torch.randn(candidates, 3, size, size, generator=generator)
        ids = _query_ids(tokens, padded, vocab, generator)
        first_stage = torch.rand(1, candidates, generator=generator) * 2 - 1
        with torch.no_grad():
            side = image_module(pixels)
            expected = rerank_module(ids, first_stage, *(s[None] for s in side))
        actual_side = image_session.run(side_names, {PIXEL_VALUES: pixels.numpy()})
        parity["image_side"] = max(parity["image_side"], _max_abs_diff(actual_side, side))
        # The re-ranker is fed PyTorch's side, so each file's parity is its own.
        feeds = dict(zip(rerank_inputs, [ids.numpy(), first_stage.numpy(), *(s[None].numpy() for s in side)]))
        (actual,) = rerank_session.run([SCORES], feeds)
        if actual.shape != (1, candidates):
            raise ParityError(f"{RERANK_ONNX}: scores of shape {actual.shape} for {candidates} candidates")
        parity["rerank"] = max(parity["rerank"], _max_abs_diff([actual], [expected]))
    for name, diff in parity.items():
        if not diff <= PARITY_TOLERANCE:
            raise ParityError(f"{kind} {name}: ONNX Runtime differs from PyTorch by {diff:.2e} > {PARITY_TOLERANCE:.0e}")
    return RerankerSpec(
        kind=kind,
        files=[image_path.name, rerank_path.name],
        fingerprint=fingerprint_files([image_path, rerank_path]),
        side={name: SideTensor(shape=list(value.shape[1:])) for name, value in zip(side_names, traced_side)},
        top_n=top_n,
        parity_max_abs_diff=parity,
        inputs={image_path.name: [PIXEL_VALUES], rerank_path.name: rerank_inputs},
        outputs={image_path.name: side_names, rerank_path.name: [SCORES]},
        opset=opset,
    )


def _query_ids(tokens: int, padded: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """One query of ``tokens`` ids, its last ``padded`` the pad id."""
    ids = torch.randint(1, vocab, (1, tokens), generator=generator)
    ids[:, tokens - padded:] = PAD_ID
    return ids


def _max_abs_diff(actual, expected) -> float:
    return max(float(np.max(np.abs(a - e.numpy()))) for a, e in zip(actual, expected))


def _restore_unused_inputs(path: Path, examples, names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Put back the graph inputs the TorchScript exporter dropped because nothing reads them.

    MCSM does not read ``first_stage`` (its score leaves the first stage's out); without it its
    re-ranker would take other inputs than :func:`rerank_input_names` says, and the server, which
    feeds every input its config names, would be refused (ONNX Runtime rejects an unknown input
    name). An unread graph input is valid ONNX and costs nothing at run time.
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
