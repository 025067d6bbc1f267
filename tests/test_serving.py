"""Serving against the real tritonserver the nvidia-pytriton wheel bundles (no mocks).

Tiny torch encoders are exported to ONNX here, written into a model repository with
``write_model_repository`` and served by ``xmodal.server.TritonServer`` on free ports; the
server starts once for the module. The last test stops it and checks nothing is left.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from xmodal.card import CARD_PARAMETER, ImagePreprocessing, ModelCard, TokenizerSpec, fingerprint_files
from xmodal.export.repository import model_config, write_model_repository
from xmodal import preprocessing, text_preprocessing
from xmodal.preprocessing import preprocess_image_bytes
from xmodal.server import ServerError, TritonServer, free_port

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

SIZE = 16
DIM = 8
CONCEPT_DIM = 4
MAX_LENGTH = 6
MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]
WORDS = ["a", "red", "green", "heart", "face", "smiling", "cat", "dog", "with", "eyes"]
SHM = Path("/dev/shm")


# -- artefacts --------------------------------------------------------------------------


def _export_encoders(directory: Path, seed: int = 0, prefix: str = "") -> tuple[Path, Path]:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class ImageEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(8, DIM)
            self.concept = nn.Linear(8, CONCEPT_DIM)

        def forward(self, pixel_values):
            features = self.pool(torch.relu(self.conv(pixel_values))).flatten(1)
            return (nn.functional.normalize(self.head(features), dim=-1),
                    nn.functional.normalize(self.concept(features), dim=-1))

    class TextEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(len(WORDS) + 2, 8, padding_idx=0)
            self.head = nn.Linear(8, DIM)
            self.concept = nn.Linear(8, CONCEPT_DIM)

        def forward(self, input_ids):
            mask = (input_ids != 0).unsqueeze(-1).float()
            pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return (nn.functional.normalize(self.head(pooled), dim=-1),
                    nn.functional.normalize(self.concept(pooled), dim=-1))

    image_path, text_path = directory / f"{prefix}image.onnx", directory / f"{prefix}text.onnx"
    batch = {0: "batch"}
    torch.onnx.export(
        ImageEncoder().eval(), (torch.randn(2, 3, SIZE, SIZE),), str(image_path), dynamo=False,
        input_names=["pixel_values"], output_names=["global", "concept"],
        dynamic_axes={"pixel_values": batch, "global": batch, "concept": batch})
    torch.onnx.export(
        TextEncoder().eval(), (torch.tensor([[2, 3, 0], [4, 5, 6]]),), str(text_path), dynamo=False,
        input_names=["input_ids"], output_names=["global", "concept"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "global": batch, "concept": batch})
    return image_path, text_path


def _write_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.save(str(path))
    return path


def _png(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGBA") -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else (10, 20, 30))
    ImageDraw.Draw(image).ellipse((2, 1, size[0] - 3, size[1] - 2), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serving")
    image_onnx, text_onnx = _export_encoders(directory)
    tokenizer_json = _write_tokenizer(directory / "tokenizer.json")
    card = ModelCard(
        name="tiny", version=1, fingerprint=fingerprint_files([image_onnx, text_onnx]),
        embeddings={"global": {"dim": DIM}, "concept": {"dim": CONCEPT_DIM}}, metric="IP",
        image=ImagePreprocessing(size=SIZE, mean=MEAN, std=STD),
        tokenizer=TokenizerSpec(kind="wordlevel", file="tokenizer.json", vocab_hash="test",
                                max_length=MAX_LENGTH),
        recipe="test",
        # Quotes, backslashes, newlines and non-ASCII must survive config.pbtxt escaping.
        training_data={"note": 'the "emoji" set \\ line one\nline two, caf\u00e9 \U0001f600'})
    repository = write_model_repository(
        directory / "model_repository", card, image_onnx=image_onnx, text_onnx=text_onnx,
        tokenizer_json=tokenizer_json, max_batch_size=8)
    # Another model with the same signature: version 1 of the served repository (main is 2).
    other_image, other_text = _export_encoders(directory, seed=1, prefix="other_")
    other_card = ModelCard.from_dict({**card.to_dict(), "name": "tiny-older",
                                      "fingerprint": fingerprint_files([other_image, other_text])})
    return {"dir": directory, "card": card, "repository": repository, "image_onnx": image_onnx,
            "text_onnx": text_onnx, "tokenizer_json": tokenizer_json, "other_card": other_card,
            "other_image_onnx": other_image, "other_text_onnx": other_text}


def _add_batched_text_encoder(repository: Path) -> None:
    """A test-only copy of text_encoder with one instance and a long queue delay, so that
    concurrent requests reach the backend together in one execute() call."""
    target = repository / "text_encoder_batched"
    shutil.copytree(repository / "text_encoder", target)
    (target / "config.pbtxt").write_text(model_config(
        "text_encoder_batched", backend="onnxruntime", max_batch_size=8,
        inputs=[("input_ids", "TYPE_INT64", [-1])],
        outputs=[("global", "TYPE_FP32", [DIM]), ("concept", "TYPE_FP32", [CONCEPT_DIM])],
        extra="instance_group [ { kind: KIND_CPU count: 1 } ]\n"
              "dynamic_batching { max_queue_delay_microseconds: 300000 }\n",
        parameters={"intra_op_thread_count": "1"}))


def _write_two_versions(artefacts, repository: Path, **options) -> Path:
    """Version 1 = the other model, version 2 = the main one (what the ensembles then run)."""
    write_model_repository(
        repository, artefacts["other_card"], image_onnx=artefacts["other_image_onnx"],
        text_onnx=artefacts["other_text_onnx"], tokenizer_json=artefacts["tokenizer_json"], version=1,
        max_batch_size=8, **options)
    return write_model_repository(
        repository, artefacts["card"], image_onnx=artefacts["image_onnx"], text_onnx=artefacts["text_onnx"],
        tokenizer_json=artefacts["tokenizer_json"], version=2, max_batch_size=8, **options)


@pytest.fixture(scope="module")
def server(artefacts):
    repository = _write_two_versions(artefacts, artefacts["dir"] / "served_repository",
                                     max_queue_delay_microseconds=500)
    _add_batched_text_encoder(repository)
    shm_before = set(os.listdir(SHM))
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    server = TritonServer(repository, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port)
    started = time.monotonic()
    server.start()
    try:
        server.wait_ready(timeout=90)
    except BaseException:
        server.stop()
        raise
    server.ready_seconds = time.monotonic() - started
    server.shm_before = shm_before
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    client = httpclient.InferenceServerClient(server.url, concurrency=4)
    yield client
    client.close()


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _infer_bytes(client, model: str, name: str, items: list[bytes]):
    tensor = httpclient.InferInput(name, [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_).reshape(-1, 1))
    return client.infer(model, [tensor])


# -- repository ---------------------------------------------------------------------------


def test_configs_parse_and_carry_the_card(artefacts):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repository = artefacts["repository"]
    models = sorted(p.name for p in repository.iterdir() if p.is_dir())
    assert models == ["embed_image", "embed_text", "image_encoder", "preprocess_image",
                      "preprocess_text", "text_encoder"]
    for name in models:
        config = text_format.Parse((repository / name / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.name == name and config.max_batch_size == 8
        if name.endswith("_encoder"):  # one CPU instance, the CPU target's default (export/repository.py)
            assert [(g.kind, g.count) for g in config.instance_group] == [(config.instance_group[0].KIND_CPU, 1)]
        else:
            assert not config.instance_group
    ensemble = text_format.Parse((repository / "embed_text" / "config.pbtxt").read_text(),
                                 model_config_pb2.ModelConfig())
    card = ModelCard.from_json(ensemble.parameters[CARD_PARAMETER].string_value)
    assert card.fingerprint == artefacts["card"].fingerprint
    assert card.tokenizer.file == "preprocess_text/1/tokenizer.json"
    assert card.training_data == artefacts["card"].training_data
    assert (repository / "preprocess_text" / "1" / "tokenizer.json").is_file()
    assert ModelCard.load(repository).embeddings == artefacts["card"].embeddings


def test_rewrite_replaces_and_refuses_foreign_dirs(artefacts, tmp_path):
    kwargs = {k: artefacts[k] for k in ("image_onnx", "text_onnx", "tokenizer_json")}
    out = write_model_repository(tmp_path / "repo", artefacts["card"], **kwargs)
    (out / "stale_model").mkdir()
    (out / "stale_model" / "config.pbtxt").write_text("")
    write_model_repository(out, artefacts["card"], **kwargs)
    assert not (out / "stale_model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temp dirs left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        write_model_repository(foreign, artefacts["card"], **kwargs)
    bad_card = ModelCard.from_dict({**artefacts["card"].to_dict(), "fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="fingerprint"):
        write_model_repository(tmp_path / "other", bad_card, **kwargs)
    assert not (tmp_path / "other").exists()


# -- versions, warm-up, instance groups, targets ------------------------------------------


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_versions_warmup_batching_and_instances(artefacts, tmp_path):
    import struct

    repository = _write_two_versions(artefacts, tmp_path / "repo", max_queue_delay_microseconds=250,
                                     instance_count=2, preprocess_instance_count=3)
    for model in ("image_encoder", "text_encoder", "preprocess_image", "preprocess_text"):
        config = _parse(repository / model / "config.pbtxt")
        assert list(config.version_policy.specific.versions) == [1, 2], model
        assert (repository / model / "1").is_dir() and (repository / model / "2").is_dir()
        assert len(config.model_warmup) == 1 and config.model_warmup[0].batch_size == 1
        group = config.instance_group[0]
        assert group.kind == group.KIND_CPU and group.count == (2 if model.endswith("encoder") else 3)
    for model in ("image_encoder", "text_encoder"):
        assert _parse(repository / model / "config.pbtxt").dynamic_batching.max_queue_delay_microseconds == 250
    warm = _parse(repository / "image_encoder" / "config.pbtxt").model_warmup[0].inputs["pixel_values"]
    assert warm.zero_data and list(warm.dims) == [3, SIZE, SIZE]
    ids = (repository / "text_encoder" / "warmup" / "input_ids").read_bytes()
    assert struct.unpack(f"<{len(ids) // 8}q", ids) == (1, 1, 1, 1)  # [UNK]
    image = (repository / "preprocess_image" / "warmup" / "IMAGE").read_bytes()
    assert struct.unpack("<I", image[:4])[0] == len(image) - 4 and image[4:12] == b"\x89PNG\r\n\x1a\n"
    for ensemble in ("embed_image", "embed_text"):
        config = _parse(repository / ensemble / "config.pbtxt")
        assert list(config.version_policy.specific.versions) == [2]
        assert {step.model_version for step in config.ensemble_scheduling.step} == {2}
        assert ModelCard.load(repository / ensemble / "1").fingerprint == artefacts["other_card"].fingerprint
        assert ModelCard.load(repository / ensemble / "2").fingerprint == artefacts["card"].fingerprint
    assert ModelCard.load(repository).fingerprint == artefacts["card"].fingerprint
    assert ModelCard.load(repository).tokenizer.file == "preprocess_text/2/tokenizer.json"
    for version in ("1", "2"):
        assert (repository / "preprocess_image" / version / "params.json").is_file()
        assert (repository / "preprocess_text" / version / "params.json").is_file()
        # each Python model imports its preprocessing module from beside it
        for model, module in (("preprocess_image", preprocessing), ("preprocess_text", text_preprocessing)):
            copied = repository / model / version / Path(module.__file__).name
            assert copied.read_bytes() == Path(module.__file__).read_bytes(), copied

    # Version 3: the pinned version (2) stays beside it, version 1 goes.
    write_model_repository(repository, artefacts["other_card"], image_onnx=artefacts["other_image_onnx"],
                           text_onnx=artefacts["other_text_onnx"], tokenizer_json=artefacts["tokenizer_json"],
                           version=3, max_batch_size=8)
    config = _parse(repository / "text_encoder" / "config.pbtxt")
    assert list(config.version_policy.specific.versions) == [2, 3]
    assert sorted(p.name for p in (repository / "text_encoder").iterdir()) == ["2", "3", "config.pbtxt", "warmup"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temp dirs left

    # Another signature cannot share the configs; keep_previous=False starts over.
    wider = ModelCard.from_dict({**artefacts["card"].to_dict(),
                                 "embeddings": {"global": {"dim": DIM}, "concept": {"dim": CONCEPT_DIM + 1}}})
    kwargs = dict(image_onnx=artefacts["image_onnx"], text_onnx=artefacts["text_onnx"],
                  tokenizer_json=artefacts["tokenizer_json"], version=4, verify_fingerprint=False)
    with pytest.raises(ValueError, match="share a config.pbtxt"):
        write_model_repository(repository, wider, **kwargs)
    write_model_repository(repository, wider, keep_previous=False, warmup=False, **kwargs)
    assert sorted(p.name for p in (repository / "text_encoder").iterdir()) == ["4", "config.pbtxt"]
    assert not _parse(repository / "text_encoder" / "config.pbtxt").model_warmup


def test_gpu_target_writes_kind_gpu_and_tensorrt(artefacts, tmp_path):
    kwargs = {k: artefacts[k] for k in ("image_onnx", "text_onnx", "tokenizer_json")}
    repository = write_model_repository(tmp_path / "gpu", artefacts["card"], target="gpu", instance_count=2,
                                        tensorrt=True, **kwargs)
    for model in ("image_encoder", "text_encoder"):
        config = _parse(repository / model / "config.pbtxt")
        assert [(g.kind, g.count) for g in config.instance_group] == [(config.instance_group[0].KIND_GPU, 2)]
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert not _parse(repository / "preprocess_image" / "config.pbtxt").instance_group
    # the local CPU backend's setting for the query path stays out of the GPU repository
    assert "allow_spinning" not in _parse(repository / "text_encoder" / "config.pbtxt").parameters
    cpu = write_model_repository(tmp_path / "cpu", artefacts["card"], **kwargs)
    for model in ("image_encoder", "text_encoder"):  # idle ORT threads sleep on the CPU target
        assert _parse(cpu / model / "config.pbtxt").parameters["allow_spinning"].string_value == "0"
    spinning = write_model_repository(tmp_path / "spin", artefacts["card"], allow_spinning=True, **kwargs)
    assert _parse(spinning / "image_encoder" / "config.pbtxt").parameters["allow_spinning"].string_value == "1"
    plain = write_model_repository(tmp_path / "gpu-plain", artefacts["card"], target="gpu", **kwargs)
    config = _parse(plain / "image_encoder" / "config.pbtxt")
    assert config.instance_group[0].count == 1 and not config.optimization.execution_accelerators.gpu_execution_accelerator
    with pytest.raises(ValueError, match="target='gpu'"):
        write_model_repository(tmp_path / "x", artefacts["card"], tensorrt=True, **kwargs)
    with pytest.raises(ValueError, match="target"):
        write_model_repository(tmp_path / "x", artefacts["card"], target="tpu", **kwargs)


# -- image formats ------------------------------------------------------------------------


def _formats() -> dict[str, bytes]:
    """One picture (24x12, four colour blocks) in every common format, and as a JPEG that is
    stored rotated with an EXIF orientation tag saying how to turn it upright."""
    from PIL import Image

    picture = _picture()
    encoded = {}
    for name, options in (("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("BMP", {}),
                          ("JPEG", {"quality": 95, "subsampling": 0})):
        buffer = io.BytesIO()
        picture.save(buffer, format=name, **options)
        encoded[name] = buffer.getvalue()
    # Orientation 6 means "rotate 90 degrees clockwise to display": store it turned the other way.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    picture.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=95, subsampling=0,
                                                        exif=exif.tobytes())
    encoded["JPEG+EXIF"] = buffer.getvalue()
    return encoded


def _picture():
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (24, 12), (250, 250, 250))
    draw = ImageDraw.Draw(picture)
    for index, colour in enumerate([(220, 20, 20), (20, 180, 40), (30, 40, 220), (240, 200, 0)]):
        draw.rectangle((index * 6, 0, index * 6 + 5, 11), fill=colour)
    return picture


def test_every_common_format_decodes_upright():
    from PIL import Image

    from xmodal.preprocessing import decode_image, image_to_array

    reference = image_to_array(_picture(), SIZE, MEAN, STD)
    tolerance = {"PNG": 1e-6, "WEBP": 1e-6, "BMP": 1e-6, "GIF": 0.1, "JPEG": 0.35, "JPEG+EXIF": 0.35}
    for name, data in _formats().items():
        image = decode_image(data)
        assert image.size == (24, 12), name
        pixels = preprocess_image_bytes(data, SIZE, MEAN, STD)
        assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == np.float32
        assert np.abs(pixels - reference).mean() <= tolerance[name] / 4, name
        assert np.abs(pixels - reference).max() <= max(tolerance[name] * 4, 1e-6), name
    # Without the EXIF turn the same JPEG would be another picture altogether.
    sideways = Image.open(io.BytesIO(_formats()["JPEG+EXIF"]))
    sideways.load()
    assert np.abs(image_to_array(sideways, SIZE, MEAN, STD) - reference).mean() > 0.5


# -- server lifecycle errors (no launch) -------------------------------------------------


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(tmp_path / "nowhere").start()
    with pytest.raises(ServerError, match="not a Triton model repository"):
        TritonServer(tmp_path).start()


def test_port_in_use_is_named(artefacts):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http_port, metrics_port = free_port(), free_port()
        with pytest.raises(ServerError, match=rf"port {port} \(gRPC\).*in use"):
            TritonServer(artefacts["repository"], http_port=http_port, grpc_port=port,
                         metrics_port=metrics_port).start()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xmodal.cli", *args], capture_output=True, text=True, timeout=60)


def test_serve_command_exits_non_zero_with_a_clear_message(artefacts, tmp_path):
    result = _cli("serve", "--model-repository", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "does not exist" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _cli("serve", "--model-repository", str(tmp_path / "empty"))
    assert result.returncode == 1 and "not a Triton model repository" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli("serve", "--model-repository", str(artefacts["repository"]), "--http-port", str(port),
                      "--grpc-port", str(free_port()), "--metrics-port", str(free_port()))
    assert result.returncode == 1 and f"port {port} (HTTP)" in result.stderr and "in use" in result.stderr


# -- the running server ------------------------------------------------------------------


def test_server_and_models_ready(artefacts, server, client):
    assert server.ready_seconds < 60
    assert client.is_server_ready()
    for name in ("image_encoder", "text_encoder", "preprocess_image", "preprocess_text",
                 "embed_image", "embed_text"):
        assert client.is_model_ready(name), name
    config = client.get_model_config("embed_text")
    card = ModelCard.from_json(config["parameters"][CARD_PARAMETER]["string_value"])
    assert card.fingerprint == artefacts["card"].fingerprint
    assert card.embeddings == {"global": {"dim": DIM}, "concept": {"dim": CONCEPT_DIM}}
    assert card.training_data == artefacts["card"].training_data


def test_embed_text_matches_onnxruntime(artefacts, client):
    from tokenizers import Tokenizer

    texts = ["a red heart", "Smiling cat face with heart eyes and a green dog", "dog"]
    result = _infer_bytes(client, "embed_text", "TEXT", [t.encode() for t in texts])
    encodings = Tokenizer.from_file(str(artefacts["tokenizer_json"])).encode_batch(texts)
    assert max(len(e.ids) for e in encodings) == MAX_LENGTH  # truncation is in the file
    ids = np.zeros((len(texts), MAX_LENGTH), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
    expected = _session(artefacts["text_onnx"]).run(["global", "concept"], {"input_ids": ids})
    for name, want in zip(["global", "concept"], expected):
        got = result.as_numpy(name)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5, name


def test_embed_image_matches_onnxruntime(artefacts, client):
    images = [_png((24, 12), (220, 30, 40, 255)), _png((16, 16), (0, 200, 0), mode="RGB")]
    result = _infer_bytes(client, "embed_image", "IMAGE", images)
    pixels = np.stack([preprocess_image_bytes(data, SIZE, MEAN, STD) for data in images])
    expected = _session(artefacts["image_onnx"]).run(["global", "concept"], {"pixel_values": pixels})
    for name, want in zip(["global", "concept"], expected):
        got = result.as_numpy(name)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5, name


def _ids_input(ids: np.ndarray):
    tensor = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    return tensor


def test_joined_requests_split_back_and_fail_alone(artefacts, client):
    """Requests the dynamic batcher hands over together run as one ORT call and come back to
    their senders; one bad request among them fails alone."""
    model = "text_encoder_batched"
    rng = np.random.default_rng(0)
    good = [rng.integers(1, len(WORDS) + 2, size=(n, 5)).astype(np.int64) for n in (1, 2, 3)]
    bad = np.array([[2, 10_000, 3, 4, 5]], dtype=np.int64)  # id beyond the embedding table
    other = np.array([[2, 3, 4, 0]], dtype=np.int64)  # another length: batched apart
    before = client.get_inference_statistics(model)["model_stats"][0]["execution_count"]
    # The http client is not thread-safe; async_infer sends concurrently from its own pool.
    pending = [client.async_infer(model, [_ids_input(ids)]) for ids in [good[0], bad, *good[1:], other]]
    results = []
    for request in pending:
        try:
            results.append(request.get_result().as_numpy("global"))
        except InferenceServerException as exc:
            results.append(exc)
    executions = client.get_inference_statistics(model)["model_stats"][0]["execution_count"] - before
    assert executions < len(pending), "the requests were never batched together"
    assert isinstance(results[1], InferenceServerException)
    assert "ONNX Runtime rejected" in str(results[1])
    session = _session(artefacts["text_onnx"])
    for ids, got in zip([good[0], *good[1:], other], [results[0], results[2], results[3], results[4]]):
        assert not isinstance(got, Exception), got
        want = session.run(["global"], {"input_ids": ids})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize(
    ("model", "name", "item", "reason"),
    [
        ("embed_image", "IMAGE", b"\x89PNG\r\n\x1a\n this is not a png", "not an image"),
        ("embed_text", "TEXT", b"", "empty"),
        ("embed_text", "TEXT", b"   \t ", "empty"),
        ("embed_text", "TEXT", b"caf\xe9 \xff", "UTF-8"),
    ],
)
def test_bad_input_is_that_requests_error(client, model, name, item, reason):
    with pytest.raises(InferenceServerException, match=reason):
        _infer_bytes(client, model, name, [item])
    assert client.is_server_ready()
    assert _infer_bytes(client, model, name, [_png((8, 8), (1, 2, 3, 255)) if name == "IMAGE"
                                              else b"a cat"]).as_numpy("global").shape == (1, DIM)


def test_onnxruntime_backend_rejects_out_of_range_ids(client):
    tensor = _ids_input(np.array([[2, 10_000]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="ONNX Runtime rejected"):
        client.infer("text_encoder", [tensor])
    assert client.is_server_ready()


def _pixels_input(array: np.ndarray, datatype: str = "FP32"):
    tensor = httpclient.InferInput("pixel_values", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong shape", r"shape"),
        ("wrong dtype", r"(?i)FP64|data.?type"),
        ("oversize batch", r"(?i)batch.?size"),
        ("corrupt image", r"not an image"),
        ("empty string", r"empty"),
    ],
)
def test_bad_requests_fail_alone_and_the_server_stays_ready(client, case, reason):
    if case == "wrong shape":
        call = lambda: client.infer("image_encoder", [_pixels_input(np.zeros((1, 3, SIZE + 1, SIZE), np.float32))])
    elif case == "wrong dtype":
        call = lambda: client.infer("image_encoder", [_pixels_input(np.zeros((1, 3, SIZE, SIZE)), "FP64")])
    elif case == "oversize batch":  # max_batch_size is 8
        call = lambda: _infer_bytes(client, "embed_text", "TEXT", [b"a cat"] * 9)
    elif case == "corrupt image":
        call = lambda: _infer_bytes(client, "embed_image", "IMAGE", [_png((8, 8), (1, 2, 3, 255))[:40]])
    else:
        call = lambda: _infer_bytes(client, "embed_text", "TEXT", [b""])
    with pytest.raises(InferenceServerException, match=reason):
        call()
    assert client.is_server_ready()
    assert client.infer("image_encoder", [_pixels_input(np.zeros((2, 3, SIZE, SIZE), np.float32))]
                        ).as_numpy("global").shape == (2, DIM)
    assert _infer_bytes(client, "embed_text", "TEXT", [b"a cat"] * 8).as_numpy("global").shape == (8, DIM)


def test_both_versions_answer_by_explicit_version(artefacts, client):
    ids = np.array([[2, 3, 4, 0], [5, 6, 0, 0]], dtype=np.int64)
    pixels = np.random.default_rng(1).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    answers = {}
    for version, prefix in (("1", "other_"), ("2", "")):
        for model in ("image_encoder", "text_encoder", "preprocess_image", "preprocess_text"):
            assert client.is_model_ready(model, version), (model, version)
        text = client.infer("text_encoder", [_ids_input(ids)], model_version=version).as_numpy("global")
        image = client.infer("image_encoder", [_pixels_input(pixels)], model_version=version).as_numpy("global")
        want_text = _session(artefacts[f"{prefix}text_onnx"]).run(["global"], {"input_ids": ids})[0]
        want_image = _session(artefacts[f"{prefix}image_onnx"]).run(["global"], {"pixel_values": pixels})[0]
        assert np.abs(text - want_text).max() <= 1e-5 and np.abs(image - want_image).max() <= 1e-5
        answers[version] = text
    assert np.abs(answers["1"] - answers["2"]).max() > 1e-2  # two different models really answered
    assert not client.is_model_ready("embed_text", "1")  # the ensembles run the version written last
    card = ModelCard.from_json(client.get_model_config("embed_text")["parameters"][CARD_PARAMETER]["string_value"])
    assert card.fingerprint == artefacts["card"].fingerprint
    with pytest.raises(InferenceServerException):
        client.infer("text_encoder", [_ids_input(ids)], model_version="3")


def test_every_image_format_through_the_server(artefacts, client):
    encoded = _formats()
    result = _infer_bytes(client, "embed_image", "IMAGE", list(encoded.values()))
    pixels = np.stack([preprocess_image_bytes(data, SIZE, MEAN, STD) for data in encoded.values()])
    expected = _session(artefacts["image_onnx"]).run(["global"], {"pixel_values": pixels})[0]
    assert np.abs(result.as_numpy("global") - expected).max() <= 1e-5


def _own_shm(server) -> list[str]:
    # Other servers may run on this machine at the same time: look only at this one's regions.
    return [name for name in os.listdir(SHM) if name.startswith(server.shm_prefix)]


def test_stop_leaves_nothing(server, client):
    """Runs last: stops the module's server and checks processes, temp dir and /dev/shm."""
    pid, workdir = server.pid, server.log_path.parent
    assert _own_shm(server)  # the Python backend's regions exist while it runs
    client.close()  # Triton waits for open HTTP connections before it unloads the models
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 8
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # neither the server nor any Python-backend stub is left
    assert not workdir.exists()
    assert _own_shm(server) == []
    assert not [n for n in set(os.listdir(SHM)) - server.shm_before if f"xmodal_{os.getpid()}_" in n]
    server.stop()  # idempotent
