"""Export of a tiny trained run: offline-optimised ONNX with parity, the INT8 variant and its
recall gate (accept and refuse), the FP16 variant, and repositories built from each."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from xmodal.card import ModelCard, fingerprint_files
from xmodal.export import variants
from xmodal.export.onnx import (
    IMAGE_FP16_ONNX, IMAGE_INT8_ONNX, IMAGE_ONNX, IMAGE_RAW_ONNX, PARITY_TOLERANCE, TEXT_FP16_ONNX, TEXT_INT8_ONNX,
    TEXT_ONNX, TEXT_RAW_ONNX, QuantizationRejected, export_run,
)
from xmodal.export.repository import write_model_repository

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

# Eight concepts: held-out R@10 is 100 % for any model, so the accept path is deterministic.
CONCEPTS = {"red circle": (220, 30, 30), "green circle": (30, 200, 60), "blue square": (40, 60, 220),
            "yellow square": (240, 220, 40), "purple circle": (150, 40, 180), "black square": (10, 10, 10),
            "orange circle": (250, 140, 20), "grey square": (128, 128, 128)}
STYLES = {"alpha": "train", "beta": "train", "gamma": "test"}


def _write_manifest(directory):
    from PIL import Image, ImageDraw

    records = []
    for style_index, (style, split) in enumerate(STYLES.items()):
        for concept, colour in CONCEPTS.items():
            slug = concept.replace(" ", "_")
            path = directory / "images" / style / f"{slug}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
            box = (4 + style_index, 4, 35, 35 - style_index)
            (ImageDraw.Draw(image).ellipse if "circle" in concept else ImageDraw.Draw(image).rectangle)(
                box, fill=colour + (255,))
            image.save(path)
            records.append({"id": f"{style}/{slug}", "concept": slug, "style": style, "split": split,
                            "image": f"images/{style}/{slug}.png", "captions": [concept, f"a {concept}"]})
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from xmodal.training.train import train

    directory = tmp_path_factory.mktemp("export")
    manifest = _write_manifest(directory)
    train(manifest, directory / "run", recipe="infonce_small", progress=False, image_size=32, dim=16,
          head_hidden=32, batch_size=8, epochs=3, minutes=60.0)
    return {"dir": directory, "run": directory / "run", "manifest": manifest}


@pytest.fixture(scope="module")
def exported(run):
    return export_run(run["run"], run["dir"] / "onnx", manifests=[run["manifest"]], quantize="int8")


def test_every_file_is_checked_and_the_optimised_one_keeps_parity(exported):
    out = exported.directory
    for name in (IMAGE_RAW_ONNX, TEXT_RAW_ONNX, IMAGE_ONNX, TEXT_ONNX, IMAGE_INT8_ONNX, TEXT_INT8_ONNX,
                 IMAGE_FP16_ONNX, TEXT_FP16_ONNX):
        onnx.checker.check_model(str(out / name))
    assert max(exported.parity.values()) <= PARITY_TOLERANCE
    card = ModelCard.load(out)
    assert card.evaluation["onnx_parity_max_abs_diff"] == exported.parity
    assert max(card.evaluation["onnx"]["parity_max_abs_diff_raw"].values()) <= PARITY_TOLERANCE
    assert "EXTENDED" in card.evaluation["onnx"]["graph_optimization"]
    # The optimised graph is a rewrite of the raw one, not a copy, and still answers like it.
    assert variants.op_types(out / IMAGE_ONNX) != variants.op_types(out / IMAGE_RAW_ONNX)
    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    raw, optimised = (ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
                      for name in (IMAGE_RAW_ONNX, IMAGE_ONNX))
    assert np.abs(raw.run(None, {"pixel_values": pixels})[0]
                  - optimised.run(None, {"pixel_values": pixels})[0]).max() <= PARITY_TOLERANCE
    assert card.fingerprint == fingerprint_files([out / IMAGE_ONNX, out / TEXT_ONNX])


def test_int8_accepted_with_both_numbers_in_the_card(exported):
    gate = ModelCard.load(exported.directory).evaluation["int8_gate"]
    assert gate["accepted"] is True
    assert gate["metric"] == "R@10" and gate["max_drop_points"] == 1.0
    assert gate["images"] == len(CONCEPTS) and gate["styles"] == ["gamma"]
    for direction in variants.DIRECTIONS:
        assert gate["fp32"][direction] == 100.0 and gate["int8"][direction] == 100.0
    int8 = exported.choose("cpu")
    assert int8.precision == "int8" and int8.notes["image_encoder"]["weight_type"] == "QInt8"
    ops = variants.op_types(int8.text_onnx)
    assert any("Integer" in op or "Quant" in op for op in ops), ops


def test_fp16_variant_keeps_fp32_io_and_says_what_was_verified(exported):
    fp16 = exported.variants["fp16"]
    model = onnx.load(str(fp16.image_onnx))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    info = ModelCard.load(exported.directory).evaluation["onnx"]["fp16"]
    assert info["verified"]
    for encoder, diff in info["parity_max_abs_diff"].items():
        assert diff <= info["tolerance"], encoder
    assert set(info["parity_max_abs_diff"]) | set(info.get("not_run_on_cpu", {})) == {"image_encoder", "text_encoder"}
    assert exported.choose("gpu").precision == "fp16"
    assert exported.choose("gpu", tensorrt=True).precision == "fp32-portable"


def test_each_variant_writes_a_repository_with_its_own_fingerprint(exported, tmp_path):
    for precision in ("int8", "fp16"):
        variant = exported.variants[precision]
        card = variant.card
        assert card.fingerprint != exported.card.fingerprint
        # written beside the variant's files by the export, the card its repository serves
        assert ModelCard.load(exported.directory / f"card.{precision}.json") == card
        repository = write_model_repository(
            tmp_path / precision, card, image_onnx=variant.image_onnx, text_onnx=variant.text_onnx,
            tokenizer_json=exported.tokenizer_json)
        served = ModelCard.load(repository)
        assert served.fingerprint == variant.fingerprint
        assert served.evaluation["onnx"]["precision"] == precision


def test_int8_refused_names_both_numbers_and_keeps_fp32(run, tmp_path):
    out = tmp_path / "onnx"
    # A gate that allows no drop at all -- not even none -- must refuse.
    with pytest.raises(QuantizationRejected) as caught:
        export_run(run["run"], out, manifests=[run["manifest"]], quantize="int8", fp16=False,
                   max_int8_recall_drop=-1.0)
    message = str(caught.value)
    assert "INT8 refused" in message and "FP32 100.00 -> INT8 100.00" in message
    assert "image to text" in message and "text to image" in message
    assert not (out / IMAGE_INT8_ONNX).exists() and not (out / TEXT_INT8_ONNX).exists()
    card = ModelCard.load(out)  # the FP32 export is complete and records the refusal
    assert card.evaluation["int8_gate"]["accepted"] is False
    assert (out / IMAGE_ONNX).is_file() and card.fingerprint == fingerprint_files([out / IMAGE_ONNX, out / TEXT_ONNX])


def test_gate_arithmetic():
    fp32 = {"image_to_text": 80.0, "text_to_image": 75.0}
    assert variants.int8_gate(fp32, {"image_to_text": 79.2, "text_to_image": 74.0})["accepted"]
    assert variants.int8_gate(fp32, {"image_to_text": 81.0, "text_to_image": 75.0})["accepted"]  # a gain is fine
    refused = variants.int8_gate(fp32, {"image_to_text": 79.5, "text_to_image": 73.9})
    assert not refused["accepted"] and refused["drop"]["text_to_image"] == pytest.approx(1.1)
    with pytest.raises(QuantizationRejected, match=r"text to image R@10 FP32 75\.00 -> INT8 73\.90"):
        variants.require_int8_gate(refused)
    with pytest.raises(ValueError, match="missing"):
        variants.int8_gate({"image_to_text": 1.0}, fp32)


def test_quantize_needs_the_held_out_manifests(run, tmp_path):
    with pytest.raises(ValueError, match="manifests"):
        export_run(run["run"], tmp_path / "onnx", quantize="int8")
    with pytest.raises(ValueError, match="quantize"):
        export_run(run["run"], tmp_path / "onnx", quantize="int4")


def test_export_command_serves_the_int8_variant_as_a_new_version(run, tmp_path, capsys):
    from xmodal.cli import main
    from xmodal.contract import pinned_version

    repository = tmp_path / "repo"
    common = ["export", "--run", str(run["run"]), "--model-repository", str(repository)]
    assert main(common + ["--out", str(tmp_path / "fp32")]) == 0
    assert main(common + ["--out", str(tmp_path / "int8"), "--quantize", "int8", "--data", str(run["manifest"]),
                          "--version", "2", "--max-queue-delay-us", "100"]) == 0
    output = capsys.readouterr().out
    assert "INT8 accepted (image_encoder and text_encoder) on 8 held-out images" in output and "version 2 (int8, cpu)" in output
    card = ModelCard.load(repository)
    assert card.evaluation["onnx"]["precision"] == "int8" and card.evaluation["int8_gate"]["accepted"]
    assert card.fingerprint == fingerprint_files([tmp_path / "int8" / IMAGE_INT8_ONNX, tmp_path / "int8" / TEXT_INT8_ONNX])
    assert pinned_version(repository) == 2 and (repository / "text_encoder" / "1" / "model.onnx").is_file()
    assert "max_queue_delay_microseconds: 100" in (repository / "text_encoder" / "config.pbtxt").read_text()
