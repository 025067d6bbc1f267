"""Offline ONNX Runtime optimisation, INT8 dynamic quantisation with its recall gate, FP16 for GPUs.

Every function takes and writes ONNX files and depends only on onnx, onnxruntime and numpy
(the held-out evaluation also on Pillow and tokenizers), never on torch.

Why ``ORT_ENABLE_EXTENDED`` and not ``ORT_ENABLE_ALL`` for the file that is served:
``ALL`` adds the layout optimisations (NCHWc convolutions and reorders) that MLAS picks for
the CPU the export runs on (its vector width: AVX2, AVX-512 ...), and ONNX Runtime's docs
say a model optimised offline at that level must run on the same kind of hardware. The
extended level stops at hardware-independent rewrites (constant folding, redundant-node
removal, Conv+BatchNorm/Conv+Add/Conv+activation, MatMul+Add, GELU, LayerNorm, attention
fusions into ``com.microsoft`` operators), which the CPU and CUDA providers both run. The
server still applies the layout pass for its own CPU when it loads the file (a session's
default level is ``ALL``), so nothing is lost locally, and the file stays portable.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from xmodal.contract import GLOBAL, INPUT_IDS, PIXEL_VALUES

R10 = "R@10"
DIRECTIONS = ("image_to_text", "text_to_image")
MAX_INT8_RECALL_DROP = 1.0  # points of held-out R@10, each direction


class QuantizationRejected(ValueError):
    """The INT8 model loses more held-out recall than the gate allows."""

    def __init__(self, gate: dict[str, Any]):
        self.gate = gate
        super().__init__(describe_gate(gate))


# -- offline graph optimisation ----------------------------------------------------------


def optimize_onnx(source: str | Path, target: str | Path, *, level: str = "extended") -> Path:
    """Apply ONNX Runtime's graph optimisations at ``level`` offline and save the result.

    The CPU execution provider does the rewriting (``SessionOptions.optimized_model_filepath``);
    the saved graph is checked with ``onnx.checker`` like every exported file.
    """
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise ValueError(f"optimisation level must be one of {sorted(levels)}, not {level!r} "
                         f"(ALL bakes in the exporting CPU's layout; see this module's docstring)")
    source, target = Path(source), Path(target)
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    check(target)
    return target


def check(path: str | Path) -> None:
    """``onnx.checker`` on the file (by path, so files near the 2 GB protobuf limit work too)."""
    onnx.checker.check_model(str(path))


def op_types(path: str | Path) -> dict[str, int]:
    """Operator counts by ``domain:type`` (``type`` alone for the ONNX domain)."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# -- INT8 ---------------------------------------------------------------------------------


NON_CONV_INT8_OPS = ("MatMul", "Gemm", "Gather", "Attention", "LSTM", "EmbedLayerNormalization")


def quantize_int8(source: str | Path, target: str | Path, *, conv: bool = False) -> dict[str, Any]:
    """ORT dynamic quantisation with QInt8 weights (activations quantised per batch at run time).

    ``source`` should be the un-optimised export: quantising an already fused graph leaves the
    fused operators in FP32. Convolutions stay FP32 unless ``conv``: ONNX Runtime runs a
    dynamically quantised convolution as ``ConvInteger``, slower on a CPU than the FP32
    convolution it replaces, while MatMul/Gemm (heads, transformer layers) gain. With ``conv`` and a CPU provider that lacks a kernel
    for a quantised operator, it falls back to the other operators.
    Weights get a scale per output channel.
    Returns what was done: ``{"weight_type": "QInt8", "per_channel": True, "op_types": [...] | "all"}``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    attempts: list[Sequence[str] | None] = ([None] if conv else []) + [NON_CONV_INT8_OPS]
    last_error: Exception | None = None
    for op_types_to_quantize in attempts:
        # Per-channel scales: one scale per tensor lets a few large weights take the resolution of
        # the rest, enough for the default model's MiniLM text encoder to fail the recall gate.
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else None)
        try:
            ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            last_error = exc
            continue
        check(target)
        return {"weight_type": "QInt8", "method": "dynamic", "per_channel": True,
                "op_types": "all" if op_types_to_quantize is None else list(op_types_to_quantize)}
    raise RuntimeError(f"ONNX Runtime cannot run the INT8 model of {source}: {last_error}")


def int8_gate(fp32: dict[str, float], int8: dict[str, float], *, max_drop: float = MAX_INT8_RECALL_DROP) -> dict[str, Any]:
    """The INT8 acceptance record: held-out R@10 per direction for both models, and the verdict.

    ``fp32`` and ``int8`` map ``image_to_text`` and ``text_to_image`` to R@10 in percent.
    Accepted when neither direction drops by more than ``max_drop`` points.
    """
    missing = [d for d in DIRECTIONS if d not in fp32 or d not in int8]
    if missing:
        raise ValueError(f"the INT8 gate needs R@10 for {list(DIRECTIONS)}; missing {missing}")
    drop = {d: round(float(fp32[d]) - float(int8[d]), 4) for d in DIRECTIONS}
    accepted = all(math.isfinite(value) and value <= max_drop + 1e-9 for value in drop.values())
    return {
        "metric": R10,
        "max_drop_points": float(max_drop),
        "fp32": {d: float(fp32[d]) for d in DIRECTIONS},
        "int8": {d: float(int8[d]) for d in DIRECTIONS},
        "drop": drop,
        "accepted": bool(accepted),
    }


def describe_gate(gate: dict[str, Any]) -> str:
    parts = [f"{d.replace('_', ' ')} R@10 FP32 {gate['fp32'][d]:.2f} -> INT8 {gate['int8'][d]:.2f} "
             f"(drop {gate['drop'][d]:+.2f})" for d in DIRECTIONS]
    verdict = "accepted" if gate["accepted"] else "refused"
    where = f" on {gate['images']} {gate.get('split', 'held-out')} images" if "images" in gate else ""
    which = f" ({' and '.join(gate['quantized'])})" if "quantized" in gate else ""
    return (f"INT8 {verdict}{which}{where}: " + "; ".join(parts)
            + f"; the gate allows a drop of at most {gate['max_drop_points']:.2f} point(s) per direction")


def require_int8_gate(gate: dict[str, Any]) -> None:
    if not gate["accepted"]:
        raise QuantizationRejected(gate)


# -- FP16 ---------------------------------------------------------------------------------


def convert_fp16(source: str | Path, target: str | Path) -> dict[str, Any]:
    """FP16 weights and arithmetic for GPUs, FP32 inputs and outputs (the configs stay as they are).

    Uses ``onnxconverter_common.float16`` when installed, else the copy of the same converter
    that ships inside onnxruntime (``onnxruntime.transformers.float16``).
    """
    try:
        from onnxconverter_common.float16 import convert_float_to_float16
        converter = "onnxconverter_common.float16"
    except ImportError:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        converter = "onnxruntime.transformers.float16"
    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends the input casts at the end of the node list; ONNX wants
    # topological order (onnx.checker refuses the graph otherwise).
    topological_sort(converted.graph)
    onnx.save(converted, str(target))
    check(target)
    return {"converter": converter, "keep_io_types": True}


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted({n for node in remaining for n in node.input if n not in available})
            raise ValueError(f"the graph has a cycle or inputs nobody produces: {missing[:5]}")
        pending = remaining
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def try_session(path: str | Path) -> tuple[Any, str | None]:
    """A CPU session on the file, or None and why not (CPU kernels for FP16 are incomplete)."""
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), None
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


# -- held-out recall through ONNX Runtime -------------------------------------------------


def embed_with_onnx(path: str | Path, input_name: str, batches: Sequence[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([GLOBAL], {input_name: batch})[0] for batch in batches])


def heldout_recall(
    models: dict[str, tuple[Path, Path]],
    rows: Sequence[Any],
    tokenizer: Any,
    config: dict[str, Any],
    *,
    batch_size: int = 32,
) -> tuple[dict[str, dict[str, float]], int]:
    """R@10 both ways of each (image ONNX, text ONNX) pair on the rows, as training evaluates.

    Each image is matched against the label captions (``captions[0]``) of the concepts in
    the same rows. Images are decoded and tokenised once and shared by every model.
    Returns ({model: {direction: R@10}}, number of images used).
    """
    from xmodal.preprocessing import decode_image, image_to_array
    from xmodal.training.evaluate import first_relevant_ranks, recall_summary
    from xmodal.text_preprocessing import pad_ids
    from xmodal.training.tokenizer import PAD_ID

    arrays, keys = [], []
    for row in rows:
        try:
            image = decode_image(Path(row.image).read_bytes())
        except (OSError, ValueError):
            continue
        arrays.append(image_to_array(image, config["image_size"], config["image_mean"], config["image_std"],
                                     config["image_background"]))
        keys.append(row.concept)
    if not arrays:
        raise ValueError(f"none of the {len(rows)} held-out rows has a decodable image")
    labels = {row.concept: row.captions[0] for row in rows if row.concept in set(keys)}
    text_keys = list(labels)
    pixels = [np.stack(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
    texts = [labels[k] for k in text_keys]
    ids = [pad_ids([e.ids for e in tokenizer.encode_batch(texts[i:i + batch_size])], PAD_ID)
           for i in range(0, len(texts), batch_size)]
    results = {}
    for name, (image_onnx, text_onnx) in models.items():
        image = embed_with_onnx(image_onnx, PIXEL_VALUES, pixels)
        text = embed_with_onnx(text_onnx, INPUT_IDS, ids)
        results[name] = {
            "image_to_text": recall_summary(first_relevant_ranks(image, text, keys, text_keys))[R10],
            "text_to_image": recall_summary(first_relevant_ranks(text, image, text_keys, keys))[R10],
        }
    return results, len(arrays)


# -- latency ------------------------------------------------------------------------------


def latency_ms(path: str | Path, feeds: dict[str, np.ndarray], *, level: str = "all", repeats: int = 20,
               threads: int | None = None) -> dict[str, float]:
    """Median and p90 wall time of one run, after two warm-up runs; and the session's load time."""
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - started
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return {"median_ms": 1000 * float(np.median(times)), "p90_ms": 1000 * float(np.percentile(times, 90)),
            "load_ms": 1000 * load}

