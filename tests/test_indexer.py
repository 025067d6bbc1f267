"""The Ray indexer end to end: tiny ONNX encoders on the session's real tritonserver, the
session's real local Ray, milvus-lite in tmp_path and the session's Milvus server. The streaming reader alone: test_index_sources.py."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import tinymodel
from xmodal import cli, contract, store
from xmodal.client import Client
from xmodal.indexer import IndexJob
from xmodal.indexer.embed import TritonEmbedder

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_repository, tiny_triton):
    card, _ = tiny_repository
    return {"card": card, "url": tiny_triton.url, "dir": tmp_path_factory.mktemp("indexer")}


@pytest.fixture
def db(milvus_backend):
    """A milvus-lite database, then the session's Milvus server."""
    return milvus_backend


def count(db, collection):
    client = store.connect(db)
    try:
        store.ensure_loaded(client, collection)  # written by another process: milvus-lite reopens it released
        return client.query(collection, filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]
    finally:
        client.close()


def test_every_image_once_and_reruns_are_idempotent(stack, ray_local, tmp_path, db):
    copy = tinymodel.record("images/tiny/red-again.png", "red-again")  # same bytes as red.png: same row
    manifest, images = tinymodel.write_corpus(tmp_path, extra=[copy])
    (tmp_path / copy["image"]).write_bytes(images[0].read_bytes())
    report = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=4,
                      embed_workers=2, progress=False).run()
    assert (report.items_read, report.rows_written, report.dead_letters) == (len(images) + 1, len(images), 0)
    assert report.duplicates == 1
    assert report.fingerprint == stack["card"].fingerprint and report.items_per_second > 0
    assert report.deadletter_path is None and tinymodel.run_letters(db, "xmodal_images") == []
    assert count(db, "xmodal_images") == len(images)

    again = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=3, progress=False).run()
    assert again.rows_written == len(images)
    assert count(db, "xmodal_images") == len(images)

    client = store.connect(db)
    try:
        row = client.query("xmodal_images", filter='concept == "green"',
                           output_fields=["id", "image", "captions", "style", "global"])[0]
    finally:
        client.close()
    assert row["image"] == str(images[1]) and row["style"] == "tiny"
    assert contract.decode_string_list(row["captions"]) == ["green rectangle", "a green star"]
    assert len(row["id"]) == 32 and abs(np.linalg.norm(row["global"]) - 1) < 1e-4


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header for a `width` x `height` image with next to no pixel data: how a
    decompression bomb looks before it is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_bad_inputs_go_to_the_dead_letter_file(stack, ray_local, tmp_path, db):
    folder = tmp_path / "images"
    good_png = tinymodel.write_png(tmp_path / "good.png", (200, 10, 10)).read_bytes()
    bad_files = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n this is no image",
        "truncated.png": good_png[: len(good_png) // 2],
        "empty.png": b"",
        "text.png": b"a caption, not an image\n",
        "bomb.png": png_claiming(30000, 30000),  # over twice Pillow's limit: Pillow refuses it itself
        "large.png": png_claiming(9000, 9000),  # over the limit but under twice it: Pillow only warns
    }
    folder.mkdir()
    for name, content in bad_files.items():
        (folder / name).write_bytes(content)
    (folder / "folder.png").mkdir()  # a path that cannot be read as a file
    names = [*bad_files, "folder.png", "missing.png"]
    extra = [tinymodel.record(f"images/{name}", name.removesuffix(".png")) for name in names]
    not_utf8 = tinymodel.record("images/tiny/red.png", "not-utf8")  # a good image, a caption that is not UTF-8
    not_utf8["captions"] = ["red thing", "bytes \udcff that were not UTF-8"]
    manifest, images = tinymodel.write_corpus(tmp_path, extra=[*extra, not_utf8])
    report = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=4,
                      progress=False).run()
    bad = len(names) + 1
    assert (report.items_read, report.rows_written, report.dead_letters) == (len(images) + bad, len(images), bad)
    assert count(db, "xmodal_images") == len(images)
    letters = tinymodel.run_letters(db, "xmodal_images")
    assert len(letters) == bad
    reasons = {(Path(letter["path"]).name, letter["item"]): letter["reason"] for letter in letters}
    by_name = {name: reason for (name, _), reason in reasons.items()}
    assert sorted(item for _, item in reasons) == list(range(len(images), len(images) + bad))
    for name in ("corrupt.png", "truncated.png", "text.png", "bomb.png"):
        assert by_name[name].startswith("cannot decode image"), (name, by_name[name])
    assert "Truncated" in by_name["truncated.png"] and "decompression bomb" in by_name["bomb.png"]
    assert by_name["large.png"].startswith("image too large: 9000x9000 is 81,000,000 pixels")
    assert by_name["empty.png"] == "empty file"
    assert by_name["folder.png"] == "cannot read file: Is a directory"
    assert by_name["missing.png"] == "cannot read file: No such file or directory"
    assert by_name["red.png"] == ("caption 2 is not valid UTF-8 text: 'bytes \\udcff that were not UTF-8' "
                                  "has the lone surrogate '\\udcff' at character 6")


def test_bad_captions_go_to_the_dead_letter_file(stack, ray_local, tmp_path, db):
    odd = tinymodel.record("images/tiny/red.png", "odd")
    odd["captions"] = ["red heart", "  ", "a \udcff cat", "x" * 9000]
    manifest, images = tinymodel.write_corpus(tmp_path, extra=[odd])
    report = IndexJob(kind="caption", manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=4,
                      progress=False).run()
    assert (report.items_read, report.dead_letters) == (2 * len(images) + 4, 3)
    assert report.rows_written == count(db, "xmodal_captions") == 2 * len(images) + 1
    # one JSON object a line, the text that is not UTF-8 kept as its \\u escape
    letters = tinymodel.run_letters(db, "xmodal_captions")
    assert "a \udcff cat" in [letter["caption"] for letter in letters]
    reasons = sorted(letter["reason"] for letter in letters)
    assert reasons == ["caption is 9000 bytes of UTF-8; the collection holds at most 8192",
                       "caption is not valid UTF-8 text: 'a \\udcff cat' has the lone surrogate '\\udcff' at character 2",
                       "empty caption"]


def test_items_the_server_rejects_get_its_message(stack):
    """Bytes that pass the reader's check but not Triton's: the batch is retried item by item."""
    good = (tinymodel.write_png(stack["dir"] / "one.png", (200, 10, 10))).read_bytes()
    embedder = TritonEmbedder(stack["url"], "embed_image", "IMAGE", tinymodel.DIM)
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "data": np.array([good, b"garbage", good], dtype=object),
             "error": np.array(["", "", ""], dtype=object)}
    out = embedder(batch)
    assert "data" not in out
    assert out["error"][0] == "" and out["error"][2] == ""
    assert out["error"][1].startswith("triton: ") and "not an image" in out["error"][1]
    assert np.allclose(out["vector"][0], out["vector"][2]) and not out["vector"][1].any()
    embedder.embedder.close()


def test_a_collection_of_another_model_is_refused(stack, tmp_path, db):
    manifest, _ = tinymodel.write_corpus(tmp_path)
    client = store.connect(db)
    store.ensure_collection(client, "xmodal_images", tinymodel.make_card("0123456789abcdef", "older"))
    client.close()
    with pytest.raises(ValueError) as raised:
        # limit=0 selects nothing: the check must come before any work
        IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), limit=0, progress=False).run()
    message = str(raised.value)
    assert "'older'" in message and "0123456789abcdef" in message
    assert "'tiny'" in message and stack["card"].fingerprint in message


def test_triton_down_is_a_connection_error(tmp_path, db):
    manifest, _ = tinymodel.write_corpus(tmp_path)
    (port,) = tinymodel.free_ports(1)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        IndexJob(manifest=manifest, triton_url=f"127.0.0.1:{port}", milvus_uri=str(db), progress=False).run()


def test_captions_one_row_per_distinct_text(stack, ray_local, tmp_path, db):
    manifest, images = tinymodel.write_corpus(tmp_path)
    report = IndexJob(kind="caption", manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), batch_size=4,
                      progress=False).run()
    assert report.items_read == 2 * len(images)
    assert report.rows_written == count(db, "xmodal_captions") == 2 * len(images)  # all distinct here
    again = IndexJob(kind="caption", manifest=manifest, triton_url=stack["url"], milvus_uri=str(db),
                     progress=False).run()
    assert again.rows_written == count(db, "xmodal_captions") == 2 * len(images)

    with Client(stack["url"], db, "xmodal_captions") as client:  # image -> captions works the same way
        hit = client.search_text("a blue face", k=1)[0]
    assert (hit.captions, hit.concept, hit.image) == (["a blue face"], "blue", str(images[2]))
    assert hit.score == pytest.approx(1.0, abs=1e-4)


def ids(db, collection) -> list[str]:
    client = store.connect(db)
    try:
        store.ensure_loaded(client, collection)
        return [row["id"] for row in client.query(collection, filter='id != ""', output_fields=["id"], limit=16384,
                                                  consistency_level="Strong")]
    finally:
        client.close()


def letters_of(db, collection: str) -> list[tuple]:
    """The dead letters of `collection` as (item, path, reason), sorted: a letter written twice is there twice."""
    return sorted((letter["item"], letter["path"], letter["reason"]) for letter in tinymodel.run_letters(db, collection))


def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(stack, ray_local, tmp_path, db):
    import ray

    manifest = tinymodel.many_images(tmp_path, 240, bad_every=25)
    command = [sys.executable, "-m", "xmodal.cli", "index", "--manifest", str(manifest), "--split", "all",
               "--triton-url", stack["url"], "--milvus-uri", str(db), "--collection", "resumed",
               "--shard-size", "8", "--write-batch", "8", "--batch-size", "4", "--json",
               "--address", ray.get_runtime_context().gcs_address]
    at_kill = tinymodel.kill_part_way(command, db, "resumed", tmp_path / "killed.log")
    assert 1 <= len(at_kill["finished"]) < at_kill["shards"] == 30 and not at_kill["complete"], (
        "the run was not killed part-way:\n" + (tmp_path / "killed.log").read_text())

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["shards_skipped"] == len(at_kill["finished"]) and report["fresh_start"] is None
    assert report["items_skipped"] == 8 * len(at_kill["finished"])
    assert "resuming: " in rerun.stderr
    assert tinymodel.run_progress(db, "resumed")["complete"]

    reference = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), collection="reference",
                         split=None, batch_size=4, progress=False).run()
    assert (reference.rows_written, reference.dead_letters) == (240 - 9, 9)
    resumed_ids = ids(db, "resumed")
    assert len(resumed_ids) == len(set(resumed_ids)) == count(db, "resumed") == 240 - 9
    assert set(resumed_ids) == set(ids(db, "reference"))
    assert report["dead_letters"] == 9
    assert letters_of(db, "resumed") == letters_of(db, "reference")
    assert len(letters_of(db, "resumed")) == 9  # none twice


def processes_named(fragment: str) -> list[int]:
    """PIDs whose command line (Ray sets a worker's to its actor's name) contains `fragment`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def live_actors_of(driver_pid: int, fragment: str) -> list[int]:
    """PIDs of the live actors whose class name contains `fragment`, of the Ray job whose driver
    is `driver_pid`: the run's own, when other tests' runs share the Ray cluster (pytest-xdist).
    Ray's global state from its GCS (the state API would need the dashboard, which is off)."""
    from ray._private import state

    jobs = {job["JobID"] for job in state.jobs() if int(job.get("DriverPid") or 0) == driver_pid}
    return [int(actor["Pid"]) for actor in state.actors().values()
            if actor.get("JobID") in jobs and actor.get("State") == "ALIVE" and fragment in actor.get("ActorClassName", "")]


def test_an_embedding_worker_killed_mid_run_is_replaced_and_the_run_completes(stack, ray_local, tmp_path, db):
    import ray

    manifest = tinymodel.many_images(tmp_path, 160, bad_every=25)
    command = [sys.executable, "-m", "xmodal.cli", "index", "--manifest", str(manifest), "--split", "all",
               "--triton-url", stack["url"], "--milvus-uri", str(db), "--collection", "survived",
               "--shard-size", "8", "--write-batch", "8", "--batch-size", "4", "--json",
               "--address", ray.get_runtime_context().gcs_address]
    books = tinymodel.RunBooks(db, "survived")
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not books.finished_shards() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    actors = live_actors_of(run.pid, "TritonEmbedder")
    assert run.poll() is None and len(actors) == 1, "no embedding actor to kill part-way"
    os.kill(actors[0], signal.SIGKILL)
    assert books.finished_shards() < 20  # of 20: killed part-way
    out, err = run.communicate(timeout=150)
    assert run.returncode == 0, err
    report = json.loads(out)  # the report alone: Ray's notes of the dead worker went to stderr
    assert books.progress()["complete"]
    books.close()
    assert (report["rows_written"], report["dead_letters"], report["fresh_start"]) == (160 - 6, 6, None)
    survived = ids(db, "survived")
    assert len(survived) == len(set(survived)) == count(db, "survived") == 160 - 6
    assert actors[0] not in processes_named("MapBatches(TritonEmbedder)")  # replaced, not revived


def test_another_input_starts_afresh_and_says_why(stack, ray_local, tmp_path, db):
    manifest, images = tinymodel.write_corpus(tmp_path)
    first = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), limit=4, shard_size=2,
                     progress=False).run()
    assert (first.shards, first.fresh_start) == (2, None)
    books = tinymodel.RunBooks(db, "xmodal_images")
    recorded = books.progress()
    assert recorded["complete"] and recorded["finished"] == [0, 1] and recorded["items"] == 4

    # the same input, as a killed run would have left it: the rerun skips the finished shard
    recorded.update(complete=False, finished=[1])
    books.records.save_progress(recorded)
    resumed = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), limit=4, shard_size=2,
                       progress=False).run()
    assert (resumed.shards_skipped, resumed.items_skipped, resumed.rows_written) == (1, 2, 2)
    assert resumed.items_processed == 2 and resumed.stage_items["embed"] == 2

    books.records.save_progress(recorded)
    books.close()
    other = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), shard_size=2, progress=False).run()
    assert other.shards_skipped == 0 and other.rows_written == len(images)
    assert "other input" in other.fresh_start and "items 4 -> 6" in other.fresh_start
    again = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), shard_size=2, progress=False).run()
    assert "finished" in again.fresh_start and again.rows_written == len(images)


def test_report_stats_and_delete(stack, ray_local, tmp_path, db, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"broken")
    manifest, images = tinymodel.write_corpus(tmp_path, extra=[tinymodel.record("images/broken.png", "broken")])
    report = IndexJob(manifest=manifest, triton_url=stack["url"], milvus_uri=str(db), shard_size=4, write_batch=3,
                      progress=True).run()
    printed = capsys.readouterr().err
    assert "busy time per stage: read" in printed and "embed" in printed and "rows/s" in printed
    assert report.stage_items == {"read": len(images) + 1, "embed": len(images), "write": len(images)}
    assert all(report.stage_seconds[stage] > 0 for stage in ("read", "embed", "write"))
    assert set(report.to_dict()["stage_items_per_second"]) == {"read", "embed", "write"}
    store.release_local(db)  # as a second process would find it

    uri = ["--milvus-uri", str(db), "--collection", "xmodal_images"]
    assert cli.main(["index", "stats", "--json", *uri]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == len(images) and stats["dead_letters"] == 1
    assert stats["model"]["fingerprint"] == stack["card"].fingerprint and stats["model"]["name"] == "tiny"
    index_type, params = ((store.LITE_INDEX_TYPE, store.LITE_INDEX_PARAMS) if store.is_local_uri(db)
                          else (store.DEFAULT_INDEX_TYPE, store.DEFAULT_INDEX_PARAMS))  # IVF_FLAT / HNSW
    assert stats["index"]["type"] == index_type
    assert {key: str(stats["index"]["params"][key]) for key in params} == {key: str(v) for key, v in params.items()}
    assert stats["progress"]["complete"] and stats["progress"]["finished"] == [0, 1]
    assert cli.main(["index", "stats", *uri]) == 0
    text = capsys.readouterr().out
    assert "rows:         6" in text and "complete: 2 of 2 shards" in text

    assert cli.main(["index", "delete", *uri]) == 1
    assert "add --yes" in capsys.readouterr().err
    assert cli.main(["index", "delete", "--yes", *uri]) == 0
    assert "removed collection 'xmodal_images'" in capsys.readouterr().out
    assert tinymodel.run_progress(db, "xmodal_images") is None and tinymodel.run_letters(db, "xmodal_images") == []
    assert cli.main(["index", "stats", *uri]) == 1
    assert "does not exist" in capsys.readouterr().err
    client = store.connect(db)  # the model record went with the collection
    try:
        if store.is_local_uri(db):  # milvus-lite keeps it in the metadata collection, a server in properties
            assert client.get(store.MODELS_COLLECTION, ids=["xmodal_images"]) == []
        assert store.list_collections(client) == []
    finally:
        client.close()
