"""Write a Triton model repository from exported ONNX encoders and their model card.

Layout (``<v>`` is ``version``)::

    card.json                                  the card (Triton ignores plain files at the root)
    image_encoder/config.pbtxt, <v>/model.onnx  backend "onnxruntime", dynamic batching
    text_encoder/config.pbtxt,  <v>/model.onnx  backend "onnxruntime", dynamic batching
    preprocess_image/config.pbtxt, <v>/model.py, <v>/preprocessing.py   backend "python"
    preprocess_text/config.pbtxt,  <v>/model.py, <v>/tokenizer.json     backend "python"
    embed_image/config.pbtxt, <v>/              ensemble IMAGE -> every embedding in the card
    embed_text/config.pbtxt,  <v>/              ensemble TEXT  -> every embedding in the card

The ensembles carry the card JSON as the config parameter ``xmodal_card``; that is how a
client learns the dimensions and the fingerprint. No ``instance_group`` is written: Triton
picks KIND_GPU on a GPU machine and KIND_CPU elsewhere (an explicit KIND_GPU fails on CPU).
The Python models are copied from the top-level ``model_repository/`` folder of this source
tree, and ``xmodal/preprocessing.py`` goes next to ``preprocess_image``'s model so the
server runs the trainer's own preprocessing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from xmodal import preprocessing as _preprocessing
from xmodal.card import CARD_FILENAME, CARD_PARAMETER, ModelCard, fingerprint_files

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
PREPROCESSING_PY = Path(_preprocessing.__file__).resolve()

IMAGE_ENCODER = "image_encoder"
TEXT_ENCODER = "text_encoder"
PREPROCESS_IMAGE = "preprocess_image"
PREPROCESS_TEXT = "preprocess_text"
EMBED_IMAGE = "embed_image"
EMBED_TEXT = "embed_text"
IMAGE_PARAMETER = "xmodal_image"
TEXT_PARAMETER = "xmodal_text"


def pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal (quotes included)."""
    escaped = []
    for char in value:
        if char == "\\":
            escaped.append("\\\\")
        elif char == '"':
            escaped.append('\\"')
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\r":
            escaped.append("\\r")
        elif char == "\t":
            escaped.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\{ord(char):03o}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensors(kind: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    items = ",\n".join(
        f'  {{\n    name: {pbtxt_string(name)}\n    data_type: {dtype}\n    dims: {_dims(dims)}\n  }}'
        for name, dtype, dims in tensors
    )
    return f"{kind} [\n{items}\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(
        f"parameters {{\n  key: {pbtxt_string(key)}\n  value: {{ string_value: {pbtxt_string(value)} }}\n}}\n"
        for key, value in params.items()
    )


def model_config(
    name: str,
    *,
    backend: str | None = None,
    platform: str | None = None,
    max_batch_size: int,
    inputs: list[tuple[str, str, list[int]]],
    outputs: list[tuple[str, str, list[int]]],
    dynamic_batching: bool = False,
    parameters: dict[str, str] | None = None,
    extra: str = "",
) -> str:
    """The text of one ``config.pbtxt``."""
    text = f"name: {pbtxt_string(name)}\n"
    if backend:
        text += f"backend: {pbtxt_string(backend)}\n"
    if platform:
        text += f"platform: {pbtxt_string(platform)}\n"
    text += f"max_batch_size: {int(max_batch_size)}\n"
    text += _tensors("input", inputs) + _tensors("output", outputs)
    if dynamic_batching:
        text += "dynamic_batching { }\n"
    text += extra
    text += _parameters(parameters or {})
    return text


def _ensemble_steps(steps: list[tuple[str, int, dict[str, str], dict[str, str]]]) -> str:
    """steps: (model, version, {model input: ensemble tensor}, {model output: ensemble tensor})."""
    blocks = []
    for model, version, input_map, output_map in steps:
        lines = [f"    {{\n      model_name: {pbtxt_string(model)}\n      model_version: {int(version)}"]
        lines += [f"      input_map {{ key: {pbtxt_string(k)} value: {pbtxt_string(v)} }}"
                  for k, v in input_map.items()]
        lines += [f"      output_map {{ key: {pbtxt_string(k)} value: {pbtxt_string(v)} }}"
                  for k, v in output_map.items()]
        blocks.append("\n".join(lines) + "\n    }")
    return "ensemble_scheduling {\n  step [\n" + ",\n".join(blocks) + "\n  ]\n}\n"


def _onnx_io(path: Path) -> tuple[set[str], set[str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return ({i.name for i in graph.input if i.name not in initializers},
            {o.name for o in graph.output})


def _check_encoder(path: Path, role: str, input_name: str, embeddings: list[str]) -> None:
    inputs, outputs = _onnx_io(path)
    if input_name not in inputs:
        raise ValueError(f"{role} {path} has no input '{input_name}' (it has {sorted(inputs)})")
    missing = [name for name in embeddings if name not in outputs]
    if missing:
        raise ValueError(
            f"{role} {path} lacks the card's embedding outputs {missing} (it has {sorted(outputs)})")


def _looks_like_repository(path: Path) -> bool:
    """Empty, or only ``card.json``, hidden files and ``<model>/config.pbtxt`` folders."""
    for child in path.iterdir():
        if child.name == CARD_FILENAME or child.name.startswith("."):
            continue
        if not (child.is_dir() and (child / "config.pbtxt").is_file()):
            return False
    return True


def write_model_repository(
    out_dir: Path,
    card: ModelCard,
    *,
    image_onnx: Path,
    text_onnx: Path,
    tokenizer_json: Path,
    version: int = 1,
    max_batch_size: int = 64,
    verify_fingerprint: bool = True,
) -> Path:
    """(Re)create the Triton model repository in ``out_dir`` and return its path.

    The repository is written into a temporary sibling directory and swapped in at the end,
    so a failure never leaves a half-written repository. An existing ``out_dir`` is
    replaced only if it looks like a model repository (or is empty).

    ``verify_fingerprint`` checks that ``card.fingerprint`` is the fingerprint of the two
    ONNX files, the guarantee the indexer and client rely on.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    image_onnx, text_onnx, tokenizer_json = Path(image_onnx), Path(text_onnx), Path(tokenizer_json)
    for path in (image_onnx, text_onnx, tokenizer_json):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    if int(version) < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    if int(max_batch_size) < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if "global" not in card.embeddings:
        raise ValueError("the card's embeddings must include 'global'")
    if verify_fingerprint:
        actual = fingerprint_files([image_onnx, text_onnx])
        if actual != card.fingerprint:
            raise ValueError(
                f"the card's fingerprint {card.fingerprint} is not that of {image_onnx} and {text_onnx} "
                f"({actual}); export the card from these files")
    templates = {
        PREPROCESS_IMAGE: TEMPLATES / PREPROCESS_IMAGE / "1" / "model.py",
        PREPROCESS_TEXT: TEMPLATES / PREPROCESS_TEXT / "1" / "model.py",
    }
    for path in [*templates.values(), PREPROCESSING_PY]:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the repository writer needs the xmodal source tree "
                f"(an editable install)")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"{out_dir} exists and is not a directory")
        if not _looks_like_repository(out_dir):
            raise ValueError(
                f"refusing to replace {out_dir}: it is not empty and not a model repository")

    embeddings = list(card.embeddings)
    _check_encoder(image_onnx, "image encoder", "pixel_values", embeddings)
    _check_encoder(text_onnx, "text encoder", "input_ids", embeddings)
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise ValueError(f"{tokenizer_json} is not a tokenizers file: {exc}") from exc

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write(tmp, card, image_onnx=image_onnx, text_onnx=text_onnx, tokenizer_json=tokenizer_json,
               templates=templates, version=int(version), max_batch_size=int(max_batch_size))
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write(root: Path, card: ModelCard, *, image_onnx: Path, text_onnx: Path, tokenizer_json: Path,
           templates: dict[str, Path], version: int, max_batch_size: int) -> None:
    v = str(version)
    size = int(card.image.size)
    embedding_outputs = [(name, "TYPE_FP32", [int(spec["dim"])]) for name, spec in card.embeddings.items()]
    passthrough = {name: name for name in card.embeddings}

    # The card as served: its tokenizer file is named relative to the repository root.
    served = dataclasses.replace(
        card, tokenizer=dataclasses.replace(card.tokenizer, file=f"{PREPROCESS_TEXT}/{v}/tokenizer.json"))
    card_json = json.dumps(served.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def model_dir(name: str, config: str) -> Path:
        (root / name / v).mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
        return root / name / v

    target = model_dir(IMAGE_ENCODER, model_config(
        IMAGE_ENCODER, backend="onnxruntime", max_batch_size=max_batch_size,
        inputs=[("pixel_values", "TYPE_FP32", [3, size, size])],
        outputs=embedding_outputs, dynamic_batching=True))
    shutil.copyfile(image_onnx, target / "model.onnx")

    target = model_dir(TEXT_ENCODER, model_config(
        TEXT_ENCODER, backend="onnxruntime", max_batch_size=max_batch_size,
        inputs=[("input_ids", "TYPE_INT64", [-1])],
        outputs=embedding_outputs, dynamic_batching=True))
    shutil.copyfile(text_onnx, target / "model.onnx")

    image_params = json.dumps({"size": size, "mean": list(card.image.mean), "std": list(card.image.std),
                               "background": list(card.image.background)}, separators=(",", ":"))
    target = model_dir(PREPROCESS_IMAGE, model_config(
        PREPROCESS_IMAGE, backend="python", max_batch_size=max_batch_size,
        inputs=[("IMAGE", "TYPE_STRING", [1])],
        outputs=[("pixel_values", "TYPE_FP32", [3, size, size])],
        parameters={IMAGE_PARAMETER: image_params}))
    shutil.copyfile(templates[PREPROCESS_IMAGE], target / "model.py")
    shutil.copyfile(PREPROCESSING_PY, target / "preprocessing.py")

    text_params = json.dumps({"pad_id": int(card.tokenizer.pad_id),
                              "max_length": int(card.tokenizer.max_length)}, separators=(",", ":"))
    target = model_dir(PREPROCESS_TEXT, model_config(
        PREPROCESS_TEXT, backend="python", max_batch_size=max_batch_size,
        inputs=[("TEXT", "TYPE_STRING", [1])],
        outputs=[("input_ids", "TYPE_INT64", [-1])],
        parameters={TEXT_PARAMETER: text_params}))
    shutil.copyfile(templates[PREPROCESS_TEXT], target / "model.py")
    shutil.copyfile(tokenizer_json, target / "tokenizer.json")

    model_dir(EMBED_IMAGE, model_config(
        EMBED_IMAGE, platform="ensemble", max_batch_size=max_batch_size,
        inputs=[("IMAGE", "TYPE_STRING", [1])], outputs=embedding_outputs,
        extra=_ensemble_steps([
            (PREPROCESS_IMAGE, version, {"IMAGE": "IMAGE"}, {"pixel_values": "pixel_values"}),
            (IMAGE_ENCODER, version, {"pixel_values": "pixel_values"}, passthrough),
        ]),
        parameters={CARD_PARAMETER: card_json}))

    model_dir(EMBED_TEXT, model_config(
        EMBED_TEXT, platform="ensemble", max_batch_size=max_batch_size,
        inputs=[("TEXT", "TYPE_STRING", [1])], outputs=embedding_outputs,
        extra=_ensemble_steps([
            (PREPROCESS_TEXT, version, {"TEXT": "TEXT"}, {"input_ids": "input_ids"}),
            (TEXT_ENCODER, version, {"input_ids": "input_ids"}, passthrough),
        ]),
        parameters={CARD_PARAMETER: card_json}))

    (root / CARD_FILENAME).write_text(served.to_json() + "\n")
