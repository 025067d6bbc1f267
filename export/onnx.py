"""Encoders to ONNX with dynamic axes, checked against PyTorch, and the model card that describes them.

What ``export_run`` leaves in ``out_dir`` (``<tower>`` is ``image_encoder`` / ``text_encoder``)::

    <tower>.raw.onnx    torch's export as is: portable FP32, the input of every variant below,
                        and the file for TensorRT (which wants plain ONNX operators)
    <tower>.onnx        FP32 after ONNX Runtime's ORT_ENABLE_EXTENDED graph optimisations,
                        applied offline (see ``xmodal.export.variants``): the served model
    <tower>.int8.onnx   with ``quantize="int8"``: dynamic quantisation (QInt8 weights), kept
                        only when held-out R@10 drops by at most 1 point each way
    <tower>.fp16.onnx   FP16 for GPUs, FP32 inputs and outputs
    tokenizer.json
    card.json           the FP32 files' card (fingerprint, parity, the INT8 gate, every variant)
    card.<precision>.json  each other variant's served card: its fingerprint and precision, the
                        card a repository serving its files carries (``Variant.card``)

Every file passes ``onnx.checker``. Parity with PyTorch (1e-4) is asserted on the raw and the
optimised FP32 files; the FP16 file is compared loosely where the CPU provider can run it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from xmodal.card import ImagePreprocessing, ModelCard, TokenizerSpec, fingerprint_files
from xmodal.contract import IMAGE_ENCODER, INPUT_IDS, PIXEL_VALUES, TEXT_ENCODER
from xmodal.export import variants
from xmodal.export.variants import QuantizationRejected  # noqa: F401 - re-exported for callers
from xmodal.training.evaluate import RERANK_TOP_N
from xmodal.training.models import ServedTower, embedding_dims
from xmodal.training.run import EVAL_FILE, TOKENIZER_FILE, load_run
from xmodal.training.splits import EVALUATED, split_rows
from xmodal.training.tokenizer import PAD_ID, max_length, vocab_hash

OPSET = 17
PARITY_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2  # L2-normalised outputs; FP16 keeps about 3 significant digits
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
IMAGE_RAW_ONNX = "image_encoder.raw.onnx"
TEXT_RAW_ONNX = "text_encoder.raw.onnx"
IMAGE_INT8_ONNX = "image_encoder.int8.onnx"
TEXT_INT8_ONNX = "text_encoder.int8.onnx"
IMAGE_FP16_ONNX = "image_encoder.fp16.onnx"
TEXT_FP16_ONNX = "text_encoder.fp16.onnx"


# What `quantize` accepts: nothing, both encoders INT8, or the text encoder alone.
QUANTIZE_CHOICES = (None, "int8", "int8-text")


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass
class Variant:
    """One precision of the exported pair: ``fp32`` (optimised, served by default),
    ``fp32-portable`` (as exported), ``int8``, ``int8-text`` (the text encoder INT8, the image
    encoder FP32), ``fp16``."""

    precision: str
    image_onnx: Path
    text_onnx: Path
    fingerprint: str
    notes: dict[str, Any] = field(default_factory=dict)
    # the card a repository serving these files carries, written beside them by export_run
    card: ModelCard | None = None


@dataclass
class ExportedModel:
    directory: Path
    card: ModelCard
    image_onnx: Path  # the FP32 optimised files the card's fingerprint names
    text_onnx: Path
    tokenizer_json: Path
    parity: dict[str, float]
    variants: dict[str, Variant] = field(default_factory=dict)
    int8_gate: dict[str, Any] | None = None

    def choose(self, target: str = "cpu", *, tensorrt: bool = False, precision: str | None = None) -> Variant:
        """The variant a repository for ``target`` serves, unless ``precision`` names one.

        cpu: INT8 when it passed its gate (both encoders, else the text encoder alone), else the
        optimised FP32. gpu: the plain FP32
        export with TensorRT (TensorRT builds its own FP16 engine and takes only standard
        operators), else FP16 when its parity with PyTorch was checked for both encoders
        (``notes["verified"] is True``), else FP32 portable.
        """
        if precision is None:
            if target == "cpu":
                precision = next((p for p in ("int8", "int8-text") if p in self.variants), "fp32")
            elif target == "gpu":
                fp16 = self.variants.get("fp16")
                verified = fp16 is not None and fp16.notes.get("verified") is True
                precision = "fp16" if verified and not tensorrt else "fp32-portable"
            else:
                raise ValueError(f"target must be 'cpu' or 'gpu', not {target!r}")
        if precision not in self.variants:
            raise ValueError(f"no {precision} variant was exported (have {sorted(self.variants)})")
        return self.variants[precision]


@contextlib.contextmanager
def inference_form(module: nn.Module) -> Iterator[None]:
    """While exporting, backbones that have one run their inference-only form: MiniLM's
    ``remove_padding`` (its dense layers skip padding tokens). The parity checks then compare
    the exported graph with the module as trained."""
    switched = [m for m in module.modules() if hasattr(m, "remove_padding")]
    for m in switched:
        m.remove_padding = True
    try:
        yield
    finally:
        for m in switched:
            m.remove_padding = False


def export_encoder(module: ServedTower, example: torch.Tensor, path: Path, input_name: str, dynamic: dict[int, str]) -> None:
    module.eval()
    with inference_form(module):
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=module.output_names,
            dynamic_axes={input_name: dynamic, **{name: {0: "batch"} for name in module.output_names}},
            opset_version=OPSET,
            dynamo=False,
        )
    variants.check(path)


def tokenizer_kind(tokenizer) -> str:
    """The card's `tokenizer.kind`: the tokenizers model type, "wordlevel" or "wordpiece" (MiniLM's)."""
    return str(json.loads(tokenizer.to_str())["model"]["type"]).lower()


def max_abs_diff(module: ServedTower, path: Path, input_name: str, inputs: torch.Tensor) -> float:
    """The largest difference between ONNX Runtime and PyTorch over every output."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = [output.numpy() for output in module(inputs)]
    actual = session.run(module.output_names, {input_name: inputs.numpy()})
    return max(float(np.max(np.abs(a - e))) for a, e in zip(actual, expected))


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    version: int = 1,
    manifests: Sequence[str | Path] | str | Path | None = None,
    quantize: str | None = None,
    fp16: bool = True,
    max_int8_recall_drop: float = variants.MAX_INT8_RECALL_DROP,
) -> ExportedModel:
    """Export a training run's encoders, assert parity with PyTorch, write the card beside them.

    ``quantize="int8"`` also writes the INT8 variant, accepted only when its R@10 (both
    directions, on the run's validation set from ``manifests``, or its test set when the data
    has no validation rows: training/splits.py) is at most ``max_int8_recall_drop`` points below the FP32 model's; the numbers go into
    the card as ``evaluation.int8_gate`` either way. A refused INT8 model raises
    :class:`QuantizationRejected` after the FP32 export and its card are complete.
    ``quantize="int8-text"`` quantises the text encoder alone (the image encoder stays FP32),
    through the same gate: a query's latency is the text encoder's, while images are embedded
    offline in batches, and the image encoder is where quantisation costs the most recall.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, not {quantize!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if quantize and manifests is None:
        raise ValueError("--quantize int8 needs the manifests the run was trained on (their test split "
                         "is the held-out set of the INT8 recall gate): pass manifests / --data")
    model, tokenizer, config = load_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = config["image_size"]
    length = max_length(tokenizer)
    generator = torch.Generator().manual_seed(0)
    evaluation = json.loads((run_dir / EVAL_FILE).read_text()) if (run_dir / EVAL_FILE).exists() else {}

    image_tower, text_tower = ServedTower(model.image, config), ServedTower(model.text, config)
    towers = {
        IMAGE_ENCODER: (image_tower, PIXEL_VALUES, torch.randn(5, 3, size, size, generator=generator)),
        TEXT_ENCODER: (text_tower, INPUT_IDS, _parity_ids(config, length, generator)),
    }
    raw = {IMAGE_ENCODER: out_dir / IMAGE_RAW_ONNX, TEXT_ENCODER: out_dir / TEXT_RAW_ONNX}
    served = {IMAGE_ENCODER: out_dir / IMAGE_ONNX, TEXT_ENCODER: out_dir / TEXT_ONNX}
    export_encoder(image_tower, torch.randn(2, 3, size, size), raw[IMAGE_ENCODER], PIXEL_VALUES, {0: "batch"})
    export_encoder(
        text_tower, torch.ones(2, 5, dtype=torch.long), raw[TEXT_ENCODER], INPUT_IDS, {0: "batch", 1: "sequence"}
    )
    for encoder in towers:
        variants.optimize_onnx(raw[encoder], served[encoder], level="extended")

    # Parity on batch sizes and lengths other than the traced ones, with padding present,
    # on both the raw and the optimised files.
    parity, raw_parity = {}, {}
    for encoder, (tower, input_name, inputs) in towers.items():
        raw_parity[encoder] = max_abs_diff(tower, raw[encoder], input_name, inputs)
        parity[encoder] = max_abs_diff(tower, served[encoder], input_name, inputs)
    for label, diffs in (("optimised", parity), ("raw", raw_parity)):
        for encoder, diff in diffs.items():
            if not diff <= PARITY_TOLERANCE:
                raise ParityError(
                    f"{encoder} ({label} ONNX): ONNX Runtime differs from PyTorch by {diff:.2e} > {PARITY_TOLERANCE:.0e}")

    found: dict[str, Variant] = {
        "fp32": Variant("fp32", served[IMAGE_ENCODER], served[TEXT_ENCODER],
                        fingerprint_files([served[IMAGE_ENCODER], served[TEXT_ENCODER]]),
                        {"graph_optimization": "ORT_ENABLE_EXTENDED (offline, CPU provider)"}),
        "fp32-portable": Variant("fp32-portable", raw[IMAGE_ENCODER], raw[TEXT_ENCODER],
                                 fingerprint_files([raw[IMAGE_ENCODER], raw[TEXT_ENCODER]]),
                                 {"graph_optimization": "none (as exported)"}),
    }
    onnx_info: dict[str, Any] = {
        "opset": OPSET,
        "graph_optimization": "ORT_ENABLE_EXTENDED, offline, CPU execution provider",
        "parity_max_abs_diff_raw": raw_parity,
    }

    if fp16:
        found_fp16, onnx_info["fp16"] = _fp16_variant(towers, raw, out_dir)
        if found_fp16 is not None:
            found["fp16"] = found_fp16

    gate = None
    if quantize is not None:
        gate, int8_variant = _int8_variant(towers, raw, served, out_dir, manifests, tokenizer,
                                           config, max_int8_recall_drop, text_only=quantize == "int8-text")
        if int8_variant is not None:
            found[quantize] = int8_variant
            onnx_info[quantize] = int8_variant.notes
    onnx_info["variants"] = {key: {"fingerprint": v.fingerprint,
                                   "files": [v.image_onnx.name, v.text_onnx.name]} for key, v in found.items()}

    reranker = None
    if model.scorer is not None:
        from xmodal.export.reranker import export_reranker  # it imports this module's constants

        reranker = export_reranker(model, config, out_dir, top_n=RERANK_TOP_N)

    tokenizer_path = out_dir / TOKENIZER_FILE
    shutil.copyfile(run_dir / TOKENIZER_FILE, tokenizer_path)
    card_evaluation: dict[str, Any] = {
        "held_out": _without_curves(evaluation.get("test", {})),
        # The run's other evaluated sets (training/splits.py), by name, and what each held.
        **{name: _without_curves(evaluation[name]) for name in EVALUATED if name != "test" and name in evaluation},
        **({"evaluated": evaluation["evaluated"]} if "evaluated" in evaluation else {}),
        "onnx_parity_max_abs_diff": parity,
        "onnx": {**onnx_info, "precision": "fp32"},
    }
    if gate is not None:
        card_evaluation["int8_gate"] = gate
    card = ModelCard(
        name=name or f"xmodal-{config['recipe']}",
        version=version,
        fingerprint=found["fp32"].fingerprint,
        embeddings={name: {"dim": dim} for name, dim in embedding_dims(config).items()},
        metric="IP",
        image=ImagePreprocessing(
            size=size, mean=list(config["image_mean"]), std=list(config["image_std"]),
            background=list(config["image_background"]),
        ),
        tokenizer=TokenizerSpec(
            kind=tokenizer_kind(tokenizer), file=TOKENIZER_FILE, vocab_hash=vocab_hash(tokenizer), max_length=length, pad_id=PAD_ID
        ),
        recipe=config["recipe"],
        training_data={
            key: evaluation[key] for key in ("train_styles", "train_images", "test_styles", "test_images") if key in evaluation
        },
        evaluation=card_evaluation,
        reranker=reranker,
    )
    card.save(out_dir)
    for variant in found.values():
        variant.card = _served_card(card, variant)
        if variant.precision != "fp32":
            variant.card.save(out_dir, f"card.{variant.precision}.json")
    exported = ExportedModel(out_dir, card, served[IMAGE_ENCODER], served[TEXT_ENCODER], tokenizer_path, parity,
                             variants=found, int8_gate=gate)
    if gate is not None:
        variants.require_int8_gate(gate)
    return exported


def _served_card(card: ModelCard, variant: Variant) -> ModelCard:
    """`card` (the FP32 files') for the variant's files: their fingerprint and precision."""
    if variant.precision == "fp32":
        return card
    evaluation = json.loads(json.dumps(card.evaluation))
    evaluation.setdefault("onnx", {})["precision"] = variant.precision
    return dataclasses.replace(card, fingerprint=variant.fingerprint, evaluation=evaluation)


def _parity_ids(config: dict[str, Any], length: int, generator: torch.Generator) -> torch.Tensor:
    text_ids = torch.randint(1, config["vocab_size"], (7, length), generator=generator)
    text_ids[3:, length // 2 :] = PAD_ID
    return text_ids


def _fp16_variant(towers, raw: dict[str, Path], out_dir: Path) -> tuple[Variant | None, dict[str, Any]]:
    """FP16 files from the raw export; compared with PyTorch loosely where the CPU provider runs them."""
    paths = {IMAGE_ENCODER: out_dir / IMAGE_FP16_ONNX, TEXT_ENCODER: out_dir / TEXT_FP16_ONNX}
    info: dict[str, Any] = {"tolerance": FP16_TOLERANCE, "parity_max_abs_diff": {}, "not_run_on_cpu": {}}
    for encoder, (tower, input_name, inputs) in towers.items():
        info.update(variants.convert_fp16(raw[encoder], paths[encoder]))
        session, reason = variants.try_session(paths[encoder])
        if session is None:
            info["not_run_on_cpu"][encoder] = reason
            continue
        with torch.no_grad():
            expected = [output.numpy() for output in tower(inputs)]
        actual = session.run(tower.output_names, {input_name: inputs.numpy()})
        diff = max(float(np.max(np.abs(a.astype(np.float32) - e))) for a, e in zip(actual, expected))
        info["parity_max_abs_diff"][encoder] = diff
        if not diff <= FP16_TOLERANCE:
            for path in paths.values():
                path.unlink(missing_ok=True)
            info["dropped"] = f"{encoder}: FP16 differs from PyTorch FP32 by {diff:.2e} > {FP16_TOLERANCE:.0e}"
            return None, info
    # True only when the parity check ran for every encoder: a GPU repository serves FP16 only then.
    info["verified"] = not info["not_run_on_cpu"]
    if not info["not_run_on_cpu"]:
        del info["not_run_on_cpu"]
    variant = Variant("fp16", paths[IMAGE_ENCODER], paths[TEXT_ENCODER],
                      fingerprint_files(list(paths.values())), info)
    return variant, info


def _int8_variant(towers, raw, served, out_dir, manifests, tokenizer, config, max_drop, text_only=False):
    """Quantise (both encoders, or the text encoder alone), optimise, run the held-out set through
    FP32 and INT8: (gate record, variant or None)."""
    from xmodal.manifest import read_manifest

    manifests = [manifests] if isinstance(manifests, (str, Path)) else list(manifests)
    # The run's own splits: the gate is a choice, made on the validation set when the data has one.
    splits = split_rows((row for m in manifests for row in read_manifest(m)),
                        validation_style=config.get("validation_style"), unseen_concepts=config.get("unseen_concepts", 0.0))
    held_out, rows = splits.held_out()
    if not rows:
        raise ValueError(f"no validation or test rows in {', '.join(map(str, manifests))}: "
                         "the INT8 gate has nothing to measure on")
    quantized = [TEXT_ENCODER] if text_only else list(towers)
    paths = {IMAGE_ENCODER: out_dir / IMAGE_INT8_ONNX, TEXT_ENCODER: out_dir / TEXT_INT8_ONNX}
    if text_only:
        paths[IMAGE_ENCODER] = served[IMAGE_ENCODER]
    notes: dict[str, Any] = {"quantized": quantized}
    for encoder in quantized:
        unoptimised = out_dir / f".{encoder}.int8.unoptimised.onnx"
        try:
            notes[encoder] = variants.quantize_int8(raw[encoder], unoptimised)
            variants.optimize_onnx(unoptimised, paths[encoder], level="extended")
        finally:
            unoptimised.unlink(missing_ok=True)
    recall, images = variants.heldout_recall(
        {"fp32": (served[IMAGE_ENCODER], served[TEXT_ENCODER]),
         "int8": (paths[IMAGE_ENCODER], paths[TEXT_ENCODER])},
        rows, tokenizer, config)
    gate = variants.int8_gate(recall["fp32"], recall["int8"], max_drop=max_drop)
    gate["split"] = held_out
    gate["images"] = images
    gate["styles"] = sorted({row.style for row in rows})
    gate["quantized"] = quantized
    if not gate["accepted"]:
        for encoder in quantized:
            paths[encoder].unlink(missing_ok=True)
        return gate, None
    notes["graph_optimization"] = "ORT_ENABLE_EXTENDED after quantisation"
    # For the record, not the gate: dynamic INT8 is not always faster on a CPU.
    notes["latency_ms"] = {}
    for encoder, (_, input_name, inputs) in towers.items():
        if encoder not in quantized:
            continue
        feeds = {input_name: inputs.numpy()}
        notes["latency_ms"][encoder] = {
            "batch": int(inputs.shape[0]),
            "fp32": round(variants.latency_ms(served[encoder], feeds, repeats=5)["median_ms"], 3),
            "int8": round(variants.latency_ms(paths[encoder], feeds, repeats=5)["median_ms"], 3),
        }
    return gate, Variant("int8-text" if text_only else "int8", paths[IMAGE_ENCODER], paths[TEXT_ENCODER],
                         fingerprint_files(list(paths.values())), notes)


def _without_curves(report: dict) -> dict:
    """The card keeps the headline figures; the full Recall@K curves stay in the run's eval.json."""
    return {output: {k: v for k, v in metrics.items() if k != "curve"} for output, metrics in report.items()}
