"""The walking skeleton end to end on a tiny slice, real at every joint.

npm fetch → training → ONNX export → the real tritonserver → a real local Ray → real
milvus-lite → the client SDK and the `xmodal search` command.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from xmodal.card import ModelCard
from xmodal.client import Client
from xmodal.demo import ranks_from_hits
from xmodal.export.onnx import export_run
from xmodal.export.repository import write_model_repository
from xmodal.indexer import IndexJob
from xmodal.preprocessing import preprocess_image_bytes
from xmodal.server import TritonServer, free_port
from xmodal.store import release_local
from xmodal.training.evaluate import recall_summary
from xmodal.manifest import read_manifest
from xmodal.training.tokenizer import load_tokenizer
from xmodal.training.train import tokenize, train

pytestmark = pytest.mark.slow

CONCEPTS = 60  # × 3 styles = 180 images


@pytest.fixture(scope="module")
def stack(tmp_path_factory, npm_cache, ray_local):
    from xmodal.training.emoji import fetch_emoji

    data = tmp_path_factory.mktemp("e2e")
    manifest = fetch_emoji(data, limit=CONCEPTS, progress=False)
    run = data / "run"
    # The epoch cap, not the time budget, ends this run, so a busy machine trains the same model.
    # 32 px images: the joints are under test here, not the image size.
    report = train(manifest, run, recipe="infonce_small", epochs=70, image_size=32, minutes=60.0, batch_size=64,
                   progress=False)
    exported = export_run(run, run / "onnx")
    repository = write_model_repository(
        data / "model_repository", exported.card, image_onnx=exported.image_onnx,
        text_onnx=exported.text_onnx, tokenizer_json=exported.tokenizer_json,
    )
    server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    try:
        server.wait_ready()
        milvus_uri = str(data / "xmodal.db")
        index_report = IndexJob(manifest=manifest, triton_url=server.url, milvus_uri=milvus_uri, split="train").run()
        yield {
            "data": data, "manifest": manifest, "report": report, "exported": exported,
            "server": server, "milvus_uri": milvus_uri, "index_report": index_report,
        }
    finally:
        server.stop()


def test_training_reports_held_out_recall(stack):
    report = stack["report"]
    assert report["train_styles"] == ["google", "twitter"]
    assert report["test_styles"] == ["openmoji"]
    for direction in ("image_to_text", "text_to_image"):
        assert set(report["test"]["global"][direction]) >= {"R@1", "R@5", "R@10", "medr", "MAP"}


def test_every_train_image_is_indexed_with_the_card_fingerprint(stack):
    assert stack["index_report"].items_read == 2 * CONCEPTS
    assert stack["index_report"].rows_written == 2 * CONCEPTS
    with Client(stack["server"].url, stack["milvus_uri"]) as client:
        assert client.card.fingerprint == stack["exported"].card.fingerprint


def test_triton_embeddings_equal_onnx_runtime(stack):
    exported, manifest = stack["exported"], stack["manifest"]
    card: ModelCard = exported.card
    rows = read_manifest(manifest, split="train")[:8]
    texts = [row.captions[0] for row in rows]
    with Client(stack["server"].url, stack["milvus_uri"]) as client:
        served_text = client.embed_text(texts)
        served_image = client.embed_image([row.image for row in rows])

    text_session = ort.InferenceSession(str(exported.text_onnx), providers=["CPUExecutionProvider"])
    ids = tokenize(load_tokenizer(exported.tokenizer_json), texts).numpy()
    (local_text,) = text_session.run(["global"], {"input_ids": ids})
    image_session = ort.InferenceSession(str(exported.image_onnx), providers=["CPUExecutionProvider"])
    pixels = np.stack([
        preprocess_image_bytes(row.image.read_bytes(), card.image.size, card.image.mean, card.image.std, card.image.background)
        for row in rows
    ])
    (local_image,) = image_session.run(["global"], {"pixel_values": pixels})

    assert served_text.shape == (8, card.dim)
    np.testing.assert_allclose(served_text, local_text, atol=1e-5)
    np.testing.assert_allclose(served_image, local_image, atol=1e-5)


def test_text_to_image_retrieval_far_above_chance_on_trained_pairs(stack):
    rows = read_manifest(stack["manifest"], split="train")
    labels = {row.concept: row.captions[0] for row in rows}
    with Client(stack["server"].url, stack["milvus_uri"]) as client:
        hit_lists = client.search_text(list(labels.values()), k=10)
    recall = recall_summary(ranks_from_hits(hit_lists, list(labels), 10))
    # Chance: each concept has 2 of the 120 indexed images, so R@1 ≈ 1.7 % and R@10 ≈ 16 %.
    assert recall["R@1"] >= 50.0, recall
    assert recall["R@10"] >= 90.0, recall


def test_search_command_prints_a_table_and_json(stack):
    # milvus-lite admits one process per database: hand it over to the command's process.
    release_local(stack["milvus_uri"])
    command = [
        sys.executable, "-m", "xmodal.cli", "search", "grinning face", "-k", "3",
        "--triton-url", stack["server"].url, "--milvus-uri", stack["milvus_uri"],
    ]
    table = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "grinning face" in table.stdout
    as_json = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    hits = json.loads(as_json.stdout)
    assert len(hits) == 3 and {"id", "score", "image", "captions"} <= set(hits[0])
