"""Write a Triton model repository from exported ONNX encoders and their model card.

Layout (``<v>`` is ``version``, ``<p>`` the version kept from before, if any)::

    card.json                                   the served card (Triton ignores plain files at the root)
    image_encoder/config.pbtxt, <p>/ <v>/model.onnx, warmup/   backend "onnxruntime", dynamic batching
    text_encoder/config.pbtxt,  <p>/ <v>/model.onnx, warmup/   backend "onnxruntime", dynamic batching
    preprocess_image/config.pbtxt, <p>/ <v>/{model.py, preprocessing.py, params.json}, warmup/   python
    preprocess_text/config.pbtxt,  <p>/ <v>/{model.py, text_preprocessing.py, tokenizer.json, params.json}, warmup/   python
    embed_image/config.pbtxt, <p>/ <v>/card.json   ensemble IMAGE -> every embedding in the card
    embed_text/config.pbtxt,  <p>/ <v>/card.json   ensemble TEXT  -> every embedding in the card

and, for a model with a pair scorer (the card's ``reranker``: CRAN, MCSM), its second stage::

    rerank_image_side/config.pbtxt, <p>/ <v>/model.onnx   pixel_values -> image_<key> (what the side store keeps)
    rerank/config.pbtxt, <p>/ <v>/model.onnx              input_ids, first_stage, image_<key> -> scores
    embed_image_side/config.pbtxt, <p>/ <v>/card.json     ensemble IMAGE -> image_<key> (the indexer's)
    rerank_text/config.pbtxt, <p>/ <v>/card.json          ensemble TEXT, first_stage, image_<key> -> scores

``rerank`` and ``rerank_text`` take one query a request (``max_batch_size: 1``): the request's
second axis is its N candidates, and requests with different N or L could not be batched anyway.

Versions and roll-out. Writing version ``v`` into an existing repository keeps the version
its ensembles pinned until now (``p``) beside it and drops older ones. The encoders and
preprocessing models load both (``version_policy { specific { versions: [p, v] } }``), so a
client can still ask for ``p`` explicitly, e.g. to query a collection indexed with it while
the new one is indexed. The ensembles load only ``v`` and pin every step to ``v``: the
card they carry (dimensions, fingerprint) is always the one of the steps they run, and a
collection indexed with ``p`` is refused by the fingerprint check rather than searched with
the wrong model. Rolling back is writing the old export again (the version number you
write is the one pinned). Both versions share one config.pbtxt, so they must share the
input/output signature (image size, embedding names and widths); a model with another
signature goes into a new repository (or ``keep_previous=False``). What differs per version
(normalisation, tokenizer, pad id) lives in the version directory (``params.json``).

Warm-up. Every non-ensemble model warms up before it is ready: the image encoder on a zero
image batch, the text encoder on one short sequence of ``[UNK]`` ids, the preprocessing
models on a small PNG and a short text (files under ``<model>/warmup/``).

Targets. ``cpu`` gives each encoder one KIND_CPU instance unless a count is given (left to
itself Triton makes two): ONNX Runtime already spreads one call over the cores, so a second
instance competes with the first for them. The instance sweep of ``benchmarks/serving.py``
serves other counts of encoder and preprocessing instances beside this default; what it
found and recommends is in docs/serving.md (rendered from its JSON). The preprocessing
models keep Triton's default (one) unless a count is given. ``gpu`` gives the encoders
``instance_group [{ kind: KIND_GPU count: N }]`` and, with ``tensorrt=True``, the TensorRT
execution accelerator at FP16; the preprocessing models run on CPU instances there.

The ensembles carry the card JSON as the config parameter ``xmodal_card``; that is how a
client learns the dimensions and the fingerprint. The Python models are copied from the
top-level ``model_repository/`` folder of this source tree; ``xmodal/preprocessing.py`` goes
next to ``preprocess_image``'s model and ``xmodal/text_preprocessing.py`` next to
``preprocess_text``'s, so the server runs the trainer's and the local indexer's own preprocessing.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import struct
import tempfile
import uuid
from pathlib import Path

from xmodal import preprocessing as _preprocessing
from xmodal import text_preprocessing as _text_preprocessing
from xmodal.card import CARD_FILENAME, CARD_PARAMETER, ModelCard, fingerprint_files
from xmodal.contract import (EMBED_IMAGE, EMBED_IMAGE_SIDE, EMBED_MODELS, EMBED_TEXT, ENSEMBLES, FIRST_STAGE, GLOBAL,
                             IMAGE_ENCODER, PARAMS_FILE, IMAGE_INPUT, INPUT_IDS, PIXEL_VALUES, PREPROCESS_IMAGE, PREPROCESS_TEXT, RERANK,
                             RERANK_IMAGE_SIDE, RERANK_MODELS, RERANK_TEXT, SCORES, TEXT_ENCODER, TEXT_INPUT,
                             pinned_version)

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repository"
PREPROCESSING_PY = Path(_preprocessing.__file__).resolve()
TEXT_PREPROCESSING_PY = Path(_text_preprocessing.__file__).resolve()

IMAGE_PARAMETER = "xmodal_image"
TEXT_PARAMETER = "xmodal_text"
WARMUP_DIR = "warmup"
TARGETS = ("cpu", "gpu")
WARMUP_TEXT = "warm up"


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
    max_queue_delay_microseconds: int | None = None,
    versions: list[int] | None = None,
    parameters: dict[str, str] | None = None,
    extra: str = "",
) -> str:
    """The text of one ``config.pbtxt``.

    ``versions`` writes ``version_policy { specific { versions: [...] } }``;
    ``max_queue_delay_microseconds`` goes into ``dynamic_batching``.
    """
    text = f"name: {pbtxt_string(name)}\n"
    if backend:
        text += f"backend: {pbtxt_string(backend)}\n"
    if platform:
        text += f"platform: {pbtxt_string(platform)}\n"
    text += f"max_batch_size: {int(max_batch_size)}\n"
    if versions:
        text += ("version_policy { specific { versions: [ "
                 + ", ".join(str(int(v)) for v in versions) + " ] } }\n")
    text += _tensors("input", inputs) + _tensors("output", outputs)
    if dynamic_batching:
        delay = ("" if max_queue_delay_microseconds is None
                 else f"max_queue_delay_microseconds: {int(max_queue_delay_microseconds)} ")
        text += f"dynamic_batching {{ {delay}}}\n"
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




# The CPU target's encoder instances (see the module docstring; docs/serving.md shows the sweep).
CPU_ENCODER_INSTANCES = 1
# Every ONNX Runtime model's idle threads sleep instead of spinning, so they leave the cores to
# the preprocessing stubs and Triton between (and during their) requests: spinning threads
# raised the tail latency of single text queries. The instance sweep of benchmarks/serving.py
# compares "1/1" with "1/1 + spin" (docs/serving.md, rendered from its JSON).
# Read by xmodal's local onnxruntime backend; NVIDIA's ignores it.
CPU_ENCODER_PARAMETERS = {"allow_spinning": "0"}


def instance_group(kind: str, count: int) -> str:
    return f"instance_group [ {{ kind: {kind} count: {int(count)} }} ]\n"


def tensorrt_fp16() -> str:
    """ONNX Runtime's TensorRT execution provider at FP16 (NVIDIA's onnxruntime backend only)."""
    return ("optimization { execution_accelerators { gpu_execution_accelerator: [ {\n"
            '  name: "tensorrt"\n'
            '  parameters { key: "precision_mode" value: "FP16" }\n'
            '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
            "} ] } }\n")


def model_warmup(name: str, inputs: dict[str, tuple[str, list[int], str | None]]) -> str:
    """``model_warmup`` with one sample (batch 1). inputs: name -> (data type, dims, data file or None for zeros)."""
    items = []
    for tensor, (dtype, dims, data_file) in inputs.items():
        source = f"input_data_file: {pbtxt_string(data_file)}" if data_file else "zero_data: true"
        items.append(f"  inputs {{\n    key: {pbtxt_string(tensor)}\n    value: {{ data_type: {dtype} "
                     f"dims: {_dims(dims)} {source} }}\n  }}")
    return (f"model_warmup [ {{\n  name: {pbtxt_string(name)}\n  batch_size: 1\n"
            + "\n".join(items) + "\n} ]\n")


def serialize_bytes(items: list[bytes]) -> bytes:
    """Triton's raw BYTES layout (warm-up files): each element a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _warmup_png(size: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (max(8, size), max(8, size)), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((1, 1, image.width - 2, image.height - 2), fill=(200, 60, 40, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _warmup_ids(tokenizer_json: Path, length: int = 4) -> list[int]:
    """Ids every WordLevel vocabulary of ours has: [UNK] (else the first non-pad id)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    unk = tokenizer.token_to_id("[UNK]")
    if unk is None:
        unk = 1 if tokenizer.get_vocab_size() > 1 else 0
    return [int(unk)] * length


def _looks_like_repository(path: Path) -> bool:
    """Empty, or only ``card.json``, hidden files and ``<model>/config.pbtxt`` folders."""
    for child in path.iterdir():
        if child.name == CARD_FILENAME or child.name.startswith("."):
            continue
        if not (child.is_dir() and (child / "config.pbtxt").is_file()):
            return False
    return True


def repository_versions(repository: Path) -> dict[str, list[int]]:
    """Every xmodal model's version directories on disk (the re-ranker's where it has one)."""
    found = {}
    for model in (*EMBED_MODELS, *RERANK_MODELS):
        directory = Path(repository) / model
        if model in RERANK_MODELS and not directory.is_dir():
            continue
        found[model] = sorted(int(p.name) for p in directory.iterdir()
                              if p.is_dir() and p.name.isdigit()) if directory.is_dir() else []
    return found


def _signature(card: ModelCard) -> dict:
    signature = {"image_size": int(card.image.size),
                 "embeddings": {name: int(spec["dim"]) for name, spec in card.embeddings.items()}}
    if card.reranker:
        signature["reranker"] = {"kind": card.reranker.kind,
                                 "side": {name: list(shape) for name, shape in card.reranker.shapes.items()}}
    return signature


def _previous_to_keep(out_dir: Path, card: ModelCard, version: int) -> tuple[int | None, ModelCard | None]:
    """(version, its card) to carry over from the existing repository, or (None, None)."""
    previous = pinned_version(out_dir)
    if previous is None or previous == version:
        return None, None
    if not all(previous in versions for versions in repository_versions(out_dir).values()):
        return None, None  # not a complete xmodal version: nothing to keep
    try:
        old_card = ModelCard.load(out_dir / EMBED_TEXT / str(previous) / CARD_FILENAME)
    except (FileNotFoundError, ValueError):
        try:
            old_card = ModelCard.load(out_dir)
        except (FileNotFoundError, ValueError):
            return None, None
    if _signature(old_card) != _signature(card):
        raise ValueError(
            f"{out_dir} serves version {previous} with {_signature(old_card)}; version {version} has "
            f"{_signature(card)}. Versions of one repository share a config.pbtxt and so their inputs "
            f"and outputs: write this model into a new repository, or pass keep_previous=False "
            f"(xmodal export --replace) to drop version {previous}")
    return previous, old_card


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
    target: str = "cpu",
    instance_count: int | None = None,
    preprocess_instance_count: int | None = None,
    max_queue_delay_microseconds: int | None = None,
    tensorrt: bool = False,
    warmup: bool = True,
    keep_previous: bool = True,
    reranker_dir: Path | None = None,
    allow_spinning: bool | None = None,
) -> Path:
    """Write version ``version`` of the Triton model repository in ``out_dir``; return its path.

    The repository is written into a temporary sibling directory and swapped in at the end,
    so a failure never leaves a half-written repository. An existing ``out_dir`` is
    replaced only if it looks like a model repository (or is empty). With ``keep_previous``
    the version the existing ensembles pin is carried over beside the new one (see the
    module docstring for how versions roll out).

    ``verify_fingerprint`` checks that ``card.fingerprint`` is the fingerprint of the two
    ONNX files, the guarantee the indexer and client rely on. ``target`` is ``"cpu"`` or
    ``"gpu"``; ``instance_count`` sets the encoders' instances (KIND_CPU on cpu, default
    CPU_ENCODER_INSTANCES; KIND_GPU on gpu, default one per GPU), ``preprocess_instance_count`` the Python models' (always
    KIND_CPU); ``tensorrt`` (gpu only) adds the TensorRT accelerator at FP16;
    ``max_queue_delay_microseconds`` is the encoders' dynamic-batching delay. ``allow_spinning``
    (cpu only) sets whether every encoder's idle ONNX Runtime threads spin (True) or sleep (False);
    None keeps the defaults (:data:`CPU_ENCODER_PARAMETERS`: sleeping). A card with a
    ``reranker`` adds its models, from the files the card names in ``reranker_dir`` (default: the
    image encoder's directory, where ``export_run`` writes them).
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
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if tensorrt and target != "gpu":
        raise ValueError("the TensorRT accelerator needs target='gpu'")
    for label, count in (("instance_count", instance_count), ("preprocess_instance_count", preprocess_instance_count)):
        if count is not None and int(count) < 1:
            raise ValueError(f"{label} must be >= 1, got {count}")
    if max_queue_delay_microseconds is not None and int(max_queue_delay_microseconds) < 0:
        raise ValueError(f"max_queue_delay_microseconds must be >= 0, got {max_queue_delay_microseconds}")
    if GLOBAL not in card.embeddings:
        raise ValueError("the card's embeddings must include 'global'")
    if verify_fingerprint:
        actual = fingerprint_files([image_onnx, text_onnx])
        if actual != card.fingerprint:
            raise ValueError(
                f"the card's fingerprint {card.fingerprint} is not that of {image_onnx} and {text_onnx} "
                f"({actual}); export the card from these files")
    reranker_files: list[Path] = []
    if card.reranker:
        reranker_dir = Path(reranker_dir) if reranker_dir is not None else image_onnx.parent
        reranker_files = [reranker_dir / name for name in card.reranker.files]
        missing = [str(path) for path in reranker_files if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"the card's re-ranker files are missing: {missing} (pass reranker_dir)")
        if verify_fingerprint and fingerprint_files(reranker_files) != card.reranker.fingerprint:
            raise ValueError(f"the card's re-ranker fingerprint {card.reranker.fingerprint} is not that of "
                             f"{[str(p) for p in reranker_files]}; export the card from these files")
    templates = {
        PREPROCESS_IMAGE: TEMPLATES / PREPROCESS_IMAGE / "1" / "model.py",
        PREPROCESS_TEXT: TEMPLATES / PREPROCESS_TEXT / "1" / "model.py",
    }
    for path in [*templates.values(), PREPROCESSING_PY, TEXT_PREPROCESSING_PY]:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the repository writer needs the xmodal source tree "
                f"(an editable install)")
    previous, previous_card = None, None
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"{out_dir} exists and is not a directory")
        if not _looks_like_repository(out_dir):
            raise ValueError(
                f"refusing to replace {out_dir}: it is not empty and not a model repository")
        if keep_previous:
            previous, previous_card = _previous_to_keep(out_dir, card, int(version))

    embeddings = list(card.embeddings)
    _check_encoder(image_onnx, "image encoder", PIXEL_VALUES, embeddings)
    _check_encoder(text_onnx, "text encoder", INPUT_IDS, embeddings)
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise ValueError(f"{tokenizer_json} is not a tokenizers file: {exc}") from exc

    options = _Options(version=int(version), previous=previous, max_batch_size=int(max_batch_size), target=target,
                       instance_count=instance_count, preprocess_instance_count=preprocess_instance_count,
                       max_queue_delay_microseconds=max_queue_delay_microseconds, tensorrt=tensorrt,
                       warmup=warmup, reranker_files=reranker_files, allow_spinning=allow_spinning)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if previous is not None:
            _carry_version(out_dir, tmp, previous, previous_card)
        _write(tmp, card, image_onnx=image_onnx, text_onnx=text_onnx, tokenizer_json=tokenizer_json,
               templates=templates, options=options)
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


@dataclasses.dataclass
class _Options:
    version: int
    previous: int | None
    max_batch_size: int
    target: str
    instance_count: int | None
    preprocess_instance_count: int | None
    max_queue_delay_microseconds: int | None
    tensorrt: bool
    warmup: bool
    reranker_files: list[Path]
    allow_spinning: bool | None = None

    def encoder_parameters(self, defaults: dict[str, str]) -> dict[str, str] | None:
        """The config parameters of an ONNX Runtime model on this target (``defaults``: the CPU target's)."""
        if self.target != "cpu":
            return None
        if self.allow_spinning is None:
            return defaults
        return {**defaults, "allow_spinning": "1" if self.allow_spinning else "0"}

    @property
    def versions(self) -> list[int]:
        return sorted({self.version} | ({self.previous} if self.previous is not None else set()))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_version(source_repo: Path, target_repo: Path, version: int, card: ModelCard) -> None:
    """Copy (hard-link where possible) every model's ``<version>/`` directory; fill in what older writers left out."""
    v = str(version)
    for model in (*EMBED_MODELS, *(RERANK_MODELS if card.reranker else ())):
        shutil.copytree(source_repo / model / v, target_repo / model / v, copy_function=_link_or_copy)
    # Written before per-version parameters existed: they came from the (shared) config.
    params = target_repo / PREPROCESS_IMAGE / v / PARAMS_FILE
    if not params.exists():
        params.write_text(_image_params(card) + "\n")
    params = target_repo / PREPROCESS_TEXT / v / PARAMS_FILE
    if not params.exists():
        params.write_text(_text_params(card) + "\n")
    for ensemble in ENSEMBLES:
        served = target_repo / ensemble / v / CARD_FILENAME
        if not served.parent.is_dir():
            continue  # the re-ranker's, for a model without one
        if not served.exists():
            served.write_text(card.to_json() + "\n")


def _image_params(card: ModelCard) -> str:
    return json.dumps({"size": int(card.image.size), "mean": list(card.image.mean), "std": list(card.image.std),
                       "background": list(card.image.background)}, separators=(",", ":"))


def _text_params(card: ModelCard) -> str:
    return json.dumps({"pad_id": int(card.tokenizer.pad_id), "max_length": int(card.tokenizer.max_length)},
                      separators=(",", ":"))


def _write(root: Path, card: ModelCard, *, image_onnx: Path, text_onnx: Path, tokenizer_json: Path,
           templates: dict[str, Path], options: _Options) -> None:
    v = str(options.version)
    size = int(card.image.size)
    max_batch_size = options.max_batch_size
    embedding_outputs = [(name, "TYPE_FP32", [int(spec["dim"])]) for name, spec in card.embeddings.items()]
    passthrough = {name: name for name in card.embeddings}

    # The card as served: its tokenizer file is named relative to the repository root.
    served = dataclasses.replace(
        card, tokenizer=dataclasses.replace(card.tokenizer, file=f"{PREPROCESS_TEXT}/{v}/tokenizer.json"))
    card_json = json.dumps(served.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    encoder_extra = ""
    if options.target == "gpu":
        encoder_extra += instance_group("KIND_GPU", options.instance_count or 1)
        if options.tensorrt:
            encoder_extra += tensorrt_fp16()
    else:
        encoder_extra += instance_group("KIND_CPU", options.instance_count or CPU_ENCODER_INSTANCES)
    preprocess_extra = (instance_group("KIND_CPU", options.preprocess_instance_count)
                        if options.preprocess_instance_count else "")

    def model_dir(name: str, config: str) -> Path:
        (root / name / v).mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
        return root / name / v

    def warmup_file(model: str, tensor: str, data: bytes) -> str:
        (root / model / WARMUP_DIR).mkdir(parents=True, exist_ok=True)
        (root / model / WARMUP_DIR / tensor).write_bytes(data)
        return tensor

    def warmup(model: str, inputs: dict[str, tuple[str, list[int], str | None]]) -> str:
        return model_warmup("xmodal_warmup", inputs) if options.warmup else ""

    encoder = dict(backend="onnxruntime", max_batch_size=max_batch_size, outputs=embedding_outputs,
                   dynamic_batching=True, max_queue_delay_microseconds=options.max_queue_delay_microseconds,
                   versions=options.versions)

    target = model_dir(IMAGE_ENCODER, model_config(
        IMAGE_ENCODER, inputs=[(PIXEL_VALUES, "TYPE_FP32", [3, size, size])],
        extra=encoder_extra + warmup(IMAGE_ENCODER, {PIXEL_VALUES: ("TYPE_FP32", [3, size, size], None)}),
        parameters=options.encoder_parameters(CPU_ENCODER_PARAMETERS), **encoder))
    shutil.copyfile(image_onnx, target / "model.onnx")

    ids = _warmup_ids(tokenizer_json)
    ids_file = warmup_file(TEXT_ENCODER, INPUT_IDS, struct.pack(f"<{len(ids)}q", *ids)) if options.warmup else None
    target = model_dir(TEXT_ENCODER, model_config(
        TEXT_ENCODER, inputs=[(INPUT_IDS, "TYPE_INT64", [-1])],
        extra=encoder_extra + warmup(TEXT_ENCODER, {INPUT_IDS: ("TYPE_INT64", [len(ids)], ids_file)}),
        parameters=options.encoder_parameters(CPU_ENCODER_PARAMETERS), **encoder))
    shutil.copyfile(text_onnx, target / "model.onnx")

    image_params = _image_params(card)
    image_file = (warmup_file(PREPROCESS_IMAGE, IMAGE_INPUT, serialize_bytes([_warmup_png(size)]))
                  if options.warmup else None)
    target = model_dir(PREPROCESS_IMAGE, model_config(
        PREPROCESS_IMAGE, backend="python", max_batch_size=max_batch_size, versions=options.versions,
        inputs=[(IMAGE_INPUT, "TYPE_STRING", [1])],
        outputs=[(PIXEL_VALUES, "TYPE_FP32", [3, size, size])],
        extra=preprocess_extra + warmup(PREPROCESS_IMAGE, {IMAGE_INPUT: ("TYPE_STRING", [1], image_file)}),
        parameters={IMAGE_PARAMETER: image_params}))
    shutil.copyfile(templates[PREPROCESS_IMAGE], target / "model.py")
    shutil.copyfile(PREPROCESSING_PY, target / "preprocessing.py")
    (target / PARAMS_FILE).write_text(image_params + "\n")

    text_params = _text_params(card)
    text_file = (warmup_file(PREPROCESS_TEXT, TEXT_INPUT, serialize_bytes([WARMUP_TEXT.encode()]))
                 if options.warmup else None)
    target = model_dir(PREPROCESS_TEXT, model_config(
        PREPROCESS_TEXT, backend="python", max_batch_size=max_batch_size, versions=options.versions,
        inputs=[(TEXT_INPUT, "TYPE_STRING", [1])],
        outputs=[(INPUT_IDS, "TYPE_INT64", [-1])],
        extra=preprocess_extra + warmup(PREPROCESS_TEXT, {TEXT_INPUT: ("TYPE_STRING", [1], text_file)}),
        parameters={TEXT_PARAMETER: text_params}))
    shutil.copyfile(templates[PREPROCESS_TEXT], target / "model.py")
    shutil.copyfile(TEXT_PREPROCESSING_PY, target / "text_preprocessing.py")
    shutil.copyfile(tokenizer_json, target / "tokenizer.json")
    (target / PARAMS_FILE).write_text(text_params + "\n")

    def ensemble(name: str, batch: int, inputs: list, outputs: list,
                 steps: list[tuple[str, dict[str, str], dict[str, str]]]) -> None:
        """An ensemble pinned to this version, carrying the served card (parameter and file)."""
        target = model_dir(name, model_config(
            name, platform="ensemble", max_batch_size=batch, versions=[options.version], inputs=inputs,
            outputs=outputs, extra=_ensemble_steps([(model, options.version, i, o) for model, i, o in steps]),
            parameters={CARD_PARAMETER: card_json}))
        (target / CARD_FILENAME).write_text(served.to_json() + "\n")

    ensemble(EMBED_IMAGE, max_batch_size, [(IMAGE_INPUT, "TYPE_STRING", [1])], embedding_outputs, [
        (PREPROCESS_IMAGE, {IMAGE_INPUT: IMAGE_INPUT}, {PIXEL_VALUES: PIXEL_VALUES}),
        (IMAGE_ENCODER, {PIXEL_VALUES: PIXEL_VALUES}, passthrough),
    ])
    ensemble(EMBED_TEXT, max_batch_size, [(TEXT_INPUT, "TYPE_STRING", [1])], embedding_outputs, [
        (PREPROCESS_TEXT, {TEXT_INPUT: TEXT_INPUT}, {INPUT_IDS: INPUT_IDS}),
        (TEXT_ENCODER, {INPUT_IDS: INPUT_IDS}, passthrough),
    ])
    if card.reranker:
        _write_reranker(card, options, encoder=encoder, encoder_extra=encoder_extra, model_dir=model_dir,
                        warmup=warmup, ensemble=ensemble)
    (root / CARD_FILENAME).write_text(served.to_json() + "\n")


def _write_reranker(card: ModelCard, options: _Options, *, encoder: dict, encoder_extra: str, model_dir, warmup,
                    ensemble) -> None:
    """The pair scorer's models: its image side (batched like the encoders) and the re-ranker
    (one query a request), each behind an ensemble that runs the card's preprocessing first."""
    size = int(card.image.size)
    image_side_onnx, rerank_onnx = options.reranker_files
    side = [(name, "TYPE_FP32", list(shape)) for name, shape in card.reranker.shapes.items()]
    side_passthrough = {name: name for name, _, _ in side}

    target = model_dir(RERANK_IMAGE_SIDE, model_config(
        RERANK_IMAGE_SIDE, inputs=[(PIXEL_VALUES, "TYPE_FP32", [3, size, size])],
        extra=encoder_extra + warmup(RERANK_IMAGE_SIDE, {PIXEL_VALUES: ("TYPE_FP32", [3, size, size], None)}),
        parameters=options.encoder_parameters(CPU_ENCODER_PARAMETERS), **{**encoder, "outputs": side}))
    shutil.copyfile(image_side_onnx, target / "model.onnx")

    # One query a request: N candidates and L tokens vary, so requests never share a run.
    candidates = [(name, dtype, [-1, *dims]) for name, dtype, dims in side]
    target = model_dir(RERANK, model_config(
        RERANK, backend="onnxruntime", max_batch_size=1, versions=options.versions,
        inputs=[(INPUT_IDS, "TYPE_INT64", [-1]), (FIRST_STAGE, "TYPE_FP32", [-1]), *candidates],
        outputs=[(SCORES, "TYPE_FP32", [-1])],
        extra=encoder_extra, parameters=options.encoder_parameters(CPU_ENCODER_PARAMETERS)))
    shutil.copyfile(rerank_onnx, target / "model.onnx")

    ensemble(EMBED_IMAGE_SIDE, options.max_batch_size, [(IMAGE_INPUT, "TYPE_STRING", [1])], side, [
        (PREPROCESS_IMAGE, {IMAGE_INPUT: IMAGE_INPUT}, {PIXEL_VALUES: PIXEL_VALUES}),
        (RERANK_IMAGE_SIDE, {PIXEL_VALUES: PIXEL_VALUES}, side_passthrough),
    ])
    ensemble(RERANK_TEXT, 1, [(TEXT_INPUT, "TYPE_STRING", [1]), (FIRST_STAGE, "TYPE_FP32", [-1]), *candidates],
             [(SCORES, "TYPE_FP32", [-1])], [
        (PREPROCESS_TEXT, {TEXT_INPUT: TEXT_INPUT}, {INPUT_IDS: INPUT_IDS}),
        (RERANK, {INPUT_IDS: INPUT_IDS, FIRST_STAGE: FIRST_STAGE, **side_passthrough}, {SCORES: SCORES}),
    ])
