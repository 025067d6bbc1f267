"""`xmodal index --input`: the formats users bring (CSV, JSONL, Karpathy JSON, Parquet, WebDataset)
read directly as Ray datasources. Real local Ray, real milvus-lite, the tiny model embedded
in-process from its model repository (``--local``), no mocks. The formats' shards without Ray or
Milvus: test_index_format_shards.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tinymodel
from tinymodel import png
from xmodal import store
from xmodal.indexer import IndexJob, deadletter_path, progress_path, sources
from xmodal.indexer.formats import Source
from xmodal.indexer.state import image_store_path

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n this is no image"


@pytest.fixture(scope="module")
def repository(tiny_repository):
    _, repository = tiny_repository
    return repository


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "milvus" / "test.db"
    yield path
    store.release_local(path)


def image_folder(directory: Path) -> dict[str, bytes]:
    """images/red.png, green.png, blue.png, yellow.png, a corrupt and a zero-byte one."""
    folder = directory / "images"
    contents = {name: png(folder, name, "ellipse" if i % 2 == 0 else "rectangle")
                for i, name in enumerate(("red", "green", "blue", "yellow"))}
    (folder / "corrupt.png").write_bytes(NOT_AN_IMAGE)
    (folder / "empty.png").write_bytes(b"")
    return contents


def index(kind: str, source, repository: Path, db: Path, **options):
    return IndexJob(kind=kind, input=source, model_repository=repository, milvus_uri=str(db), batch_size=4,
                    progress=False, **options).run()


def stored(db: Path, collection: str, fields: list[str]) -> dict[str, dict]:
    client = store.connect(db)
    try:
        store.ensure_loaded(client, collection)
        return {row["id"]: tinymodel.decoded(row) for row in client.query(
            collection, filter='id != ""', output_fields=fields, limit=16384)}
    finally:
        client.close()


def letters(report) -> dict[str, str]:
    """The run's dead letters, `path` (images) or `caption` (captions) -> reason."""
    lines = Path(report.deadletter_path).read_text(encoding="utf-8").splitlines()
    return {letter.get("path", letter.get("caption")): letter["reason"] for letter in map(json.loads, lines)}


# ---- the formats, end to end --------------------------------------------------------------


def test_csv_rows_of_one_image_merge_and_bad_rows_go_to_the_dead_letters(repository, ray_local, tmp_path, db):
    contents = image_folder(tmp_path)
    source = tmp_path / "captions.csv"
    source.write_text(
        "image,caption\n"
        "images/red.png,red ellipse\n"
        "images/red.png,a red face\n"  # the same image on the next line: one row with both captions
        "images/green.png,green rectangle\n"
        "images/corrupt.png,broken\n"
        "images/empty.png,nothing inside\n"
        "images/missing.png,not there\n"
        "images/blue.png,\n"  # its only caption is empty: an image without captions
        'images/yellow.png,"a yellow star,\nquoted over two lines"\n'
        "images/green.png,one,field too many\n", encoding="utf-8")
    report = index("image", source, repository, db)
    assert (report.items_read, report.rows_written, report.dead_letters) == (8, 4, 4)
    rows = stored(db, "xmodal_images", ["image", "captions", "concept", "style"])
    ids = {name: sources.content_id(contents[name]) for name in ("red", "green", "yellow", "blue")}
    assert set(rows) == set(ids.values())
    red = rows[ids["red"]]
    assert red["captions"] == ["red ellipse", "a red face"] and red["image"] == str(tmp_path / "images/red.png")
    assert (red["concept"], red["style"]) == ("captions/images/red.png", "captions")
    assert rows[ids["yellow"]]["captions"] == ["a yellow star,\nquoted over two lines"]
    reasons = letters(report)
    folder = tmp_path / "images"
    assert reasons[str(folder / "corrupt.png")].startswith("cannot decode image")
    assert reasons[str(folder / "empty.png")] == "empty file"
    assert reasons[str(folder / "missing.png")] == "cannot read file: No such file or directory"
    assert rows[ids["blue"]]["captions"] == [] and str(folder / "blue.png") not in reasons
    assert reasons[f"{source}:11"] == f"{source}:11: more fields than the header has"

    again = index("image", source, repository, db)  # the same rows again: nothing new
    assert "finished" in again.fresh_start and (again.rows_written, again.dead_letters) == (4, 4)
    assert stored(db, "xmodal_images", ["captions"]).keys() == rows.keys()


def test_jsonl_captions_with_bad_lines(repository, ray_local, tmp_path, db):
    image_folder(tmp_path)
    source = tmp_path / "pairs.jsonl"
    source.write_bytes(b"\n".join([
        json.dumps({"image": "images/red.png", "captions": ["red ellipse", "a red face"]}).encode(),
        json.dumps({"image": "images/green.png", "caption": "green rectangle"}).encode(),
        json.dumps({"image": "images/green.png", "caption": "a green star"}).encode(),
        json.dumps({"image": "images/blue.png", "caption": "  "}).encode(),
        b"{oops",
        b'{"image": "images/blue.png", "caption": "a blue \xff face"}',  # bytes that are not UTF-8
    ]) + b"\n")
    report = index("caption", source, repository, db)
    assert (report.items_read, report.rows_written, report.dead_letters) == (7, 4, 3)
    rows = stored(db, "xmodal_captions", ["caption", "image", "concept"])
    by_caption = {row["caption"]: row for row in rows.values()}
    assert sorted(by_caption) == ["a green star", "a red face", "green rectangle", "red ellipse"]
    assert by_caption["a green star"]["image"] == str(tmp_path / "images/green.png")
    assert by_caption["a green star"]["concept"] == "pairs/images/green.png"
    lines = Path(report.deadletter_path).read_text(encoding="utf-8").splitlines()
    reasons = {letter["reason"].split(" (")[0]: letter["caption"] for letter in map(json.loads, lines)}
    assert reasons == {"caption is not valid UTF-8 text: 'a blue \\udcff face' has the lone surrogate '\\udcff' "
                       "at character 7": "a blue \udcff face", "empty caption": "",
                       f"{source}:5: not valid JSON": ""}


def test_karpathy_keeps_its_splits(repository, ray_local, tmp_path, db):
    contents = image_folder(tmp_path)
    (tmp_path / "images" / "sub").mkdir()
    (tmp_path / "images" / "sub" / "blue.png").write_bytes(contents["blue"])
    source = tmp_path / "dataset_tiny.json"
    source.write_text(json.dumps({"images": [
        {"filename": "red.png", "split": "train", "sentences": [{"raw": "red ellipse"}]},
        {"filename": "green.png", "split": "test", "sentences": [{"raw": "green rectangle"}, {"tokens": ["a", "star"]}]},
        {"filepath": "sub", "filename": "blue.png", "split": "test", "sentences": [{"raw": "blue ellipse"}]},
        {"filename": "corrupt.png", "split": "test", "sentences": [{"raw": "broken"}]},
        {"filename": "yellow.png", "split": "test", "sentences": []},
    ]}), encoding="utf-8")
    assert sources.scan(Source(source, image_root=tmp_path / "images"), kind="image").items == 5  # every split
    # a malformed row has no split to filter by: it goes to the dead letters whatever the split
    report = index("image", Source(source, image_root=tmp_path / "images"), repository, db, split="test")
    assert (report.items_read, report.rows_written, report.dead_letters) == (4, 2, 2)
    rows = stored(db, "xmodal_images", ["image", "captions", "concept"])
    green = rows[sources.content_id(contents["green"])]
    assert green["captions"] == ["green rectangle", "a star"] and green["concept"] == "tiny/green.png"
    assert rows[sources.content_id(contents["blue"])]["image"] == str(tmp_path / "images/sub/blue.png")
    reasons = letters(report)
    assert reasons[str(tmp_path / "images/corrupt.png")].startswith("cannot decode image")
    assert reasons[f"{source}: images[4]"] == f"{source}: images[4] (yellow.png): missing 'sentences'"


def test_parquet_image_bytes_are_written_beside_the_collection(repository, ray_local, tmp_path, db):
    folder = tmp_path / "pngs"
    red, green, blue, yellow = (png(folder, name) for name in ("red", "green", "blue", "yellow"))
    source = tmp_path / "train-00000.parquet"
    pq.write_table(pa.table({
        "image": [red, green, NOT_AN_IMAGE, b"", blue, red, yellow],
        "caption": [["red ellipse", "a red face"], ["green ellipse"], ["broken"], ["zero bytes"], ["blue ellipse"],
                    ["red again"], [""]],  # the last: an image without captions
    }), source, row_group_size=2)
    report = index("image", source, repository, db)
    assert (report.items_read, report.rows_written, report.dead_letters, report.duplicates) == (7, 4, 2, 1)
    rows = stored(db, "xmodal_images", ["image", "captions", "concept"])
    images = image_store_path(str(db), "xmodal_images")
    for content in (red, green, blue, yellow):
        key = sources.content_id(content)
        path = Path(rows[key]["image"])
        assert path == images / key[:2] / f"{key}.png" and path.read_bytes() == content
    assert rows[sources.content_id(red)]["captions"] == ["red again"]  # the later row of the same bytes
    assert rows[sources.content_id(red)]["concept"] == "train-00000/train-00000.parquet: row 5"
    reasons = letters(report)
    assert reasons[f"{source}: row 2"].startswith("cannot decode image")
    assert reasons[f"{source}: row 3"] == "empty file" and rows[sources.content_id(yellow)]["captions"] == []
    written = {path: path.stat().st_mtime_ns for path in images.rglob("*.png")}
    assert len(written) == 4

    again = index("image", source, repository, db)
    assert again.rows_written == 4 and stored(db, "xmodal_images", ["id"]).keys() == rows.keys()
    assert {path: path.stat().st_mtime_ns for path in images.rglob("*.png")} == written  # not written again


def test_webdataset_images_and_captions(repository, ray_local, tmp_path, db):
    folder = tmp_path / "pngs"
    red, green = png(folder, "red"), png(folder, "green")
    shards = tmp_path / "shards"
    shards.mkdir()
    tinymodel.write_shard(shards / "shard-000.tar", [
        ("a", {"png": red, "txt": b"red ellipse\na red face\n"}),
        ("b", {"png": NOT_AN_IMAGE, "txt": b"broken"}),
        ("c", {"png": b"", "txt": b"zero bytes"}),
    ])
    tinymodel.write_shard(shards / "shard-001.tar", [
        ("d", {"jpg": green, "json": json.dumps({"captions": ["green ellipse", "a green face"]}).encode()}),
        ("e", {"txt": b"a caption without its image"}),
        ("f", {"png": png(folder, "blue"), "txt": b""}),  # an image without captions
    ])
    report = index("image", shards, repository, db, shard_size=2)
    assert (report.items_read, report.rows_written, report.dead_letters, report.shards) == (6, 3, 3, 3)
    rows = stored(db, "xmodal_images", ["image", "captions", "concept"])
    images = image_store_path(str(db), "xmodal_images")
    red_key, green_key = sources.content_id(red), sources.content_id(green)
    assert rows[red_key]["captions"] == ["red ellipse", "a red face"]
    assert rows[red_key]["concept"] == "shards/shard-000.tar:a"
    # the file keeps the member's extension, as import names it
    assert Path(rows[green_key]["image"]) == images / green_key[:2] / f"{green_key}.jpg"
    assert Path(rows[green_key]["image"]).read_bytes() == green
    reasons = letters(report)
    assert reasons[f"{shards}/shard-000.tar:b.png"].startswith("cannot decode image")
    assert reasons[f"{shards}/shard-000.tar:c.png"] == "empty file"
    assert reasons[f"{shards}/shard-001.tar:e"] == "no image in the sample (expected jpg/jpeg/png/webp)"
    blue_key = sources.content_id((folder / "blue.png").read_bytes())
    assert rows[blue_key]["captions"] == [] and f"{shards}/shard-001.tar:f.png" not in reasons
    again = index("image", shards, repository, db, shard_size=2)
    assert again.rows_written == 3 and stored(db, "xmodal_images", ["id"]).keys() == rows.keys()
    assert sorted(p.name for p in images.rglob("*.*")) == sorted([f"{red_key}.png", f"{green_key}.jpg",
                                                                  f"{blue_key}.png"])

    captions = index("caption", shards, repository, db)  # the image bytes are not read for captions
    assert (captions.items_read, captions.rows_written, captions.dead_letters) == (8, 7, 1)
    by_caption = {row["caption"]: row for row in stored(db, "xmodal_captions", ["caption", "image", "concept"]).values()}
    assert by_caption["a caption without its image"]["image"] == f"{shards}/shard-001.tar:e"
    assert by_caption["a green face"]["image"] == f"{shards}/shard-001.tar:d.jpg"
    assert by_caption["a green face"]["concept"] == rows[green_key]["concept"] == "shards/shard-001.tar:d"

    from xmodal.indexer.manage import delete_collection

    assert str(images) in delete_collection(str(db), "xmodal_images") and not images.exists()


# ---- resuming a killed run ----------------------------------------------------------------


def test_a_killed_webdataset_run_resumes_to_the_rows_of_an_uninterrupted_one(repository, ray_local, tmp_path, db):
    import ray

    folder = tmp_path / "pngs"
    samples = []
    for i in range(96):
        if i % 16 == 15:
            image = NOT_AN_IMAGE
        else:
            image = tinymodel.write_png(folder / f"{i}.png", (i % 256, 255 - i % 256, (i * 7) % 256),
                                        "ellipse" if i % 2 else "rectangle").read_bytes()
        samples.append((f"{i:04d}", {"png": image, "txt": f"item {i}".encode()}))
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(3):  # a shard of the run (6 samples) may straddle two tar files
        tinymodel.write_shard(shards / f"part-{n}.tar", samples[32 * n:32 * (n + 1)])
    command = [sys.executable, "-m", "xmodal.cli", "index", "--input", str(shards), "--local",
               "--model-repository", str(repository), "--milvus-uri", str(db), "--collection", "resumed",
               "--shard-size", "6", "--write-batch", "6", "--batch-size", "3", "--json",
               "--address", ray.get_runtime_context().gcs_address]
    progress_file = progress_path(str(db), "resumed")
    at_kill = tinymodel.kill_part_way(command, db, "resumed", tmp_path / "killed.log")
    assert 1 <= len(at_kill["finished"]) < at_kill["shards"] == 16 and not at_kill["complete"], (
        "the run was not killed part-way:\n" + (tmp_path / "killed.log").read_text())
    assert at_kill["input"]["format"] == "webdataset"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["shards_skipped"] == len(at_kill["finished"]) and report["fresh_start"] is None
    assert "resuming: " in rerun.stderr and json.loads(progress_file.read_text())["complete"]

    reference = index("image", shards, repository, db, collection="reference", shard_size=6)
    assert (reference.rows_written, reference.dead_letters) == (90, 6)
    resumed = stored(db, "resumed", ["image", "captions"])
    reference_rows = stored(db, "reference", ["image", "captions"])
    assert len(resumed) == 90 and {k: r["captions"] for k, r in resumed.items()} == {
        k: r["captions"] for k, r in reference_rows.items()}
    images = image_store_path(str(db), "resumed")
    assert all(Path(row["image"]) == images / key[:2] / f"{key}.png" for key, row in resumed.items())
    assert report["dead_letters"] == 6
    assert (Path(deadletter_path(str(db), "resumed")).read_text().count("\n") == 6)  # none twice
