"""Export of a tiny trained run: offline-optimised ONNX with parity, the INT8 variant and its
recall gate (accept and refuse), the FP16 variant, and repositories built from each."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file, save_file

import tinymodel
from xmodal.card import ModelCard, fingerprint_files
from xmodal.export import variants
from xmodal.export.onnx import (
    IMAGE_FP16_ONNX, IMAGE_INT8_ONNX, IMAGE_ONNX, IMAGE_RAW_ONNX, PARITY_TOLERANCE, TEXT_FP16_ONNX, TEXT_INT8_ONNX,
    TEXT_ONNX, TEXT_RAW_ONNX, QuantizationRejected, export_run,
)
from xmodal.export.repository import write_model_repository

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

# 40 images in each held-out style (tinymodel's shapes corpus): chance R@10 is 25 %, so the gate
# measures a model's recall rather than a ceiling every model reaches.
HELD_OUT_IMAGES = len(tinymodel.SHAPE_COLOURS) * len(tinymodel.SHAPES)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from xmodal.training.train import train

    directory = tmp_path_factory.mktemp("export")
    manifest = tinymodel.write_shapes_manifest(directory)
    train(manifest, directory / "run", recipe="infonce_small", progress=False, image_size=32, dim=16,
          head_hidden=32, batch_size=16, epochs=10, minutes=60.0, seed=0,
          validation_style=tinymodel.SHAPES_VALIDATION_STYLE)
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
    evaluation = ModelCard.load(exported.directory).evaluation
    assert evaluation["evaluated"]["validation"]["styles"] == [tinymodel.SHAPES_VALIDATION_STYLE]
    assert evaluation["evaluated"]["test"]["styles"] == ["gamma"]
    assert set(evaluation["validation"]) == set(evaluation["held_out"]) == {"global"}
    # The gate is a choice: made on the validation style, not the test one.
    assert gate["split"] == "validation" and gate["images"] == HELD_OUT_IMAGES
    assert gate["styles"] == [tinymodel.SHAPES_VALIDATION_STYLE]
    for direction in variants.DIRECTIONS:
        assert gate["drop"][direction] <= gate["max_drop_points"]
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
    assert info["verified"] is True and not info.get("not_run_on_cpu")
    for encoder, diff in info["parity_max_abs_diff"].items():
        assert diff <= info["tolerance"], encoder
    assert set(info["parity_max_abs_diff"]) | set(info.get("not_run_on_cpu", {})) == {"image_encoder", "text_encoder"}
    assert exported.choose("gpu").precision == "fp16"
    assert exported.choose("gpu", tensorrt=True).precision == "fp32-portable"


def test_an_fp16_variant_whose_parity_did_not_run_is_never_the_gpu_default(exported):
    fp16 = exported.variants["fp16"]
    unchecked = dataclasses.replace(fp16, notes=dict(fp16.notes, verified=False,
                                                     not_run_on_cpu={"image_encoder": "no CPU kernel"}))
    model = dataclasses.replace(exported, variants=dict(exported.variants, fp16=unchecked))
    assert model.choose("gpu").precision == "fp32-portable"
    assert model.choose("gpu", precision="fp16") is unchecked  # still there when asked for by name


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


def with_activation_outliers(run_dir, target, *, channels: int = 4, scale: float = 1000.0):
    """A copy of the run whose image tower computes the same function in FP32 with a few feature
    channels `scale` times larger: the last BatchNorm's scale and shift for those channels
    multiplied, the head's weights on them divided (ReLU and the mean pool commute with a positive
    scale). INT8 quantises the head's input per tensor, so the outliers leave the other channels
    no resolution: the outlier case that breaks INT8 in real models."""
    import shutil

    from xmodal.training.run import WEIGHTS_FILE

    shutil.copytree(run_dir, target)
    weights = load_file(target / WEIGHTS_FILE)
    for channel in range(channels):
        weights["image.backbone.stages.3.4.weight"][channel] *= scale
        weights["image.backbone.stages.3.4.bias"][channel] *= scale
        weights["image.heads.global.linear.weight"][:, channel] /= scale
    save_file(weights, target / WEIGHTS_FILE)
    return target


def test_int8_that_loses_recall_is_refused_naming_both_numbers_and_fp32_is_kept(run, exported, tmp_path):
    out = tmp_path / "onnx"
    outliers = with_activation_outliers(run["run"], tmp_path / "run")
    with pytest.raises(QuantizationRejected) as caught:
        export_run(outliers, out, manifests=[run["manifest"]], quantize="int8", fp16=False)
    gate = ModelCard.load(out).evaluation["int8_gate"]  # the FP32 export is complete and records the refusal
    assert gate["accepted"] is False and gate["max_drop_points"] == variants.MAX_INT8_RECALL_DROP
    # The same FP32 model (its recall equals the unmodified run's), an INT8 one that lost recall.
    assert gate["fp32"] == exported.int8_gate["fp32"]
    assert max(gate["drop"].values()) > 10 * gate["max_drop_points"]
    message = str(caught.value)
    assert "INT8 refused" in message and f"on {HELD_OUT_IMAGES} validation images" in message
    for direction in variants.DIRECTIONS:
        name = direction.replace("_", " ")
        assert f"{name} R@10 FP32 {gate['fp32'][direction]:.2f} -> INT8 {gate['int8'][direction]:.2f}" in message
    assert not (out / IMAGE_INT8_ONNX).exists() and not (out / TEXT_INT8_ONNX).exists()
    assert (out / IMAGE_ONNX).is_file()
    assert ModelCard.load(out).fingerprint == fingerprint_files([out / IMAGE_ONNX, out / TEXT_ONNX])


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
    assert f"INT8 accepted (image_encoder and text_encoder) on {HELD_OUT_IMAGES} validation images" in output and "version 2 (int8, cpu)" in output
    card = ModelCard.load(repository)
    assert card.evaluation["onnx"]["precision"] == "int8" and card.evaluation["int8_gate"]["accepted"]
    assert card.fingerprint == fingerprint_files([tmp_path / "int8" / IMAGE_INT8_ONNX, tmp_path / "int8" / TEXT_INT8_ONNX])
    assert pinned_version(repository) == 2 and (repository / "text_encoder" / "1" / "model.onnx").is_file()
    assert "max_queue_delay_microseconds: 100" in (repository / "text_encoder" / "config.pbtxt").read_text()
