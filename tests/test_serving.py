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
import time
from pathlib import Path

import numpy as np
import pytest

from xmodal.card import CARD_PARAMETER, ImagePreprocessing, ModelCard, TokenizerSpec, fingerprint_files
from xmodal.export.repository import model_config, write_model_repository
from xmodal.preprocessing import preprocess_image_bytes
from xmodal.server import ServerError, TritonServer, free_port

ort = pytest.importorskip("onnxruntime")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SIZE = 16
DIM = 8
CONCEPT_DIM = 4
MAX_LENGTH = 6
MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]
WORDS = ["a", "red", "green", "heart", "face", "smiling", "cat", "dog", "with", "eyes"]
SHM = Path("/dev/shm")


# -- artefacts --------------------------------------------------------------------------


def _export_encoders(directory: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    torch.manual_seed(0)

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

    image_path, text_path = directory / "image.onnx", directory / "text.onnx"
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
    return {"dir": directory, "card": card, "repository": repository, "image_onnx": image_onnx,
            "text_onnx": text_onnx, "tokenizer_json": tokenizer_json}


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


@pytest.fixture(scope="module")
def server(artefacts):
    repository = artefacts["dir"] / "served_repository"
    shutil.copytree(artefacts["repository"], repository)
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
