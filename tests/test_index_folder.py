"""`xmodal index --input DIR`: a folder of images is a corpus (walked recursively, captions
optional from sidecars), and inputs of the other formats without captions index their images.
The walk and the shards without Ray or Milvus; end to end with real local Ray, the tiny model
embedded in-process (``model_repository=``), milvus-lite, and the client searching through the
real tritonserver."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tinymodel
from tinymodel import COLOURS, write_png
from xmodal import store
from xmodal.client import Client
from xmodal.client.table import format_hits
from xmodal.client.web import SearchApp, hit_json
from xmodal.indexer import IndexJob, sources
from xmodal.indexer.formats import Source

pytestmark = pytest.mark.timeout(180)


def photo(path: Path, colour: str, shape: str = "ellipse", size: int = 24) -> bytes:
    return write_png(path, COLOURS[colour], shape, size).read_bytes()


@pytest.fixture
def tree(tmp_path) -> dict:
    """photos/ nested, with sidecars and without, unicode and space names, hidden entries, a
    file that is no image, an orphan sidecar, links inside and out of the tree."""
    root = tmp_path / "photos"
    outside = tmp_path / "elsewhere"
    contents = {
        "red.png": photo(root / "red.png", "red"),
        "2024/holidays/green.png": photo(root / "2024/holidays/green.png", "green", "rectangle"),
        "2024/holidays/blue sky é.png": photo(root / "2024/holidays/blue sky é.png", "blue"),
        "2024/yellow.PNG": photo(root / "2024/yellow.PNG", "yellow", "rectangle", size=40),
    }
    (root / "red.txt").write_text("a red ellipse\n\nround and red\n", encoding="utf-8")
    (root / "2024/holidays/green.json").write_text(json.dumps({"caption": "green rectangle", "url": "x"}))
    photo(root / ".hidden.png", "purple")
    photo(root / ".cache" / "purple.png", "purple")
    (root / "notes.md").write_text("not an image")
    (root / "orphan.txt").write_text("a caption with no image")
    photo(outside / "black.png", "black")
    os.symlink(outside / "black.png", root / "outside.png")
    os.symlink(outside, root / "outside-dir")
    os.symlink(root / "2024" / "yellow.PNG", root / "2024" / "alias.png")  # inside the tree: read
    return {"root": root, "contents": contents}


def test_a_folder_is_walked_in_a_stable_order_with_sidecar_captions_and_skips_counted(tree):
    root = tree["root"]
    plan = sources.scan(Source(root), kind="image", shard_size=2)  # format from the path: a folder
    assert (plan.spec.format, plan.spec.style, plan.items) == ("folder", "photos", 5)
    assert (plan.hidden_skipped, plan.not_images_skipped, plan.outside_links_skipped) == (2, 2, 2)
    items = [item for shard in plan.shards for item in sources.read_shard(plan.spec, shard)]
    assert [item["path"] for item in items] == [str(root / name) for name in (
        "2024/alias.png", "2024/holidays/blue sky é.png", "2024/holidays/green.png", "2024/yellow.PNG", "red.png")]
    assert [json.loads(item["captions"]) for item in items] == [
        [], [], ["green rectangle"], [], ["a red ellipse", "round and red"]]
    assert [item["concept"] for item in items][1] == "photos/2024/holidays/blue sky é.png"
    assert not any(item["error"] for item in items)  # no caption is no error
    # the caption collection: the sidecars' captions only
    captions = sources.scan(Source(root), kind="caption")
    assert captions.items == 3
    read = sources.read_shard(captions.spec, captions.shards[0])
    assert sorted(item["caption"] for item in read) == ["a red ellipse", "green rectangle", "round and red"]


def test_the_scan_digest_covers_each_file_and_its_sidecars(tree):
    root = tree["root"]

    def digest() -> str:
        return sources.scan(Source(root), kind="image").items_sha256

    first = digest()
    assert digest() == first
    stat = (root / "2024/yellow.PNG").stat()
    os.utime(root / "2024/yellow.PNG", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = digest()
    assert touched != first
    (root / "2024/holidays/green.json").write_text(json.dumps({"caption": "a green box"}))
    assert digest() != touched
    photo(root / "deeper/still/new.png", "black")
    assert sources.scan(Source(root), kind="image").items == 6


def test_a_folder_takes_no_table_options_and_a_bad_sidecar_is_a_dead_letter(tree):
    root = tree["root"]
    with pytest.raises(ValueError, match="not for a folder of images"):
        sources.scan(Source(root, caption_column="text"), kind="image")
    with pytest.raises(ValueError, match="no such folder"):
        sources.scan(Source(root / "absent", format="folder"), kind="image")
    (root / "red.json").write_text("{not json")
    plan = sources.scan(Source(root), kind="image")
    items = sources.read_shard(plan.spec, plan.shards[0])
    assert [item["error"] for item in items if item["error"]] == [
        f"{root / 'red'}.json: not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))"]


def test_inputs_without_captions_index_their_images(tmp_path):
    photo(tmp_path / "images/red.png", "red")
    photo(tmp_path / "images/blue.png", "blue")
    (tmp_path / "only.csv").write_text("image\nimages/red.png\nimages/blue.png\n")
    (tmp_path / "only.jsonl").write_text('{"image": "images/red.png"}\n{"image": "images/blue.png", "caption": ""}\n')
    pq.write_table(pa.table({"image": ["images/red.png", "images/blue.png"]}), tmp_path / "only.parquet")
    with tarfile.open(tmp_path / "only.tar", "w") as archive:
        for key in ("red", "blue"):
            data = (tmp_path / f"images/{key}.png").read_bytes()
            member = tarfile.TarInfo(f"{key}.png")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    for name in ("only.csv", "only.jsonl", "only.parquet", "only.tar"):
        plan = sources.scan(Source(tmp_path / name), kind="image")
        items = sources.read_shard(plan.spec, plan.shards[0])
        assert [(item["error"], json.loads(item["captions"])) for item in items] == [("", [])] * 2, name
        # captions still need captions: the table's header says there are none
    with pytest.raises(ValueError, match="missing column 'caption' or 'captions'"):
        sources.scan(Source(tmp_path / "only.csv"), kind="caption")
    # a caption column named but absent is still an error
    with pytest.raises(ValueError, match=r"only\.parquet: no caption column 'text'"):
        sources.scan(Source(tmp_path / "only.parquet", caption_column="text"), kind="image")


@pytest.mark.slow
def test_a_folder_end_to_end_indexed_and_searched(tree, tiny_repository, tiny_triton, ray_local, tmp_path):
    _, repository = tiny_repository
    root, contents = tree["root"], tree["contents"]
    db = tmp_path / "milvus" / "xmodal.db"
    try:
        report = IndexJob(input=root, model_repository=repository, milvus_uri=str(db), batch_size=4,
                          progress=False).run()
        assert (report.items_read, report.rows_written, report.dead_letters, report.duplicates) == (5, 4, 0, 1)
        assert (report.hidden_skipped, report.not_images_skipped, report.outside_links_skipped) == (2, 2, 2)
        assert "files left out: 2 hidden, 2 not images, 2 links leaving the folder" in str(report)
        captions = IndexJob(kind="caption", input=root, model_repository=repository, milvus_uri=str(db),
                            progress=False).run()
        assert (captions.items_read, captions.rows_written, captions.dead_letters) == (3, 3, 0)
        again = IndexJob(input=root, model_repository=repository, milvus_uri=str(db), batch_size=4,
                         progress=False).run()
        assert report.paths_merged == 1  # yellow.PNG beside alias.png, the link to it walked first
        # the same files again: nothing read or written (the collection's record of the folder)
        assert (again.files_unchanged, again.items_read, again.rows_written, again.paths_merged) == (5, 0, 0, 0)

        blue = root / "2024/holidays/blue sky é.png"
        with Client(tiny_triton.url, db) as client:
            hits = client.search_image(blue, k=4)
            assert (hits[0].image, hits[0].captions, hits[0].title) == (str(blue), [], "blue sky é.png")
            assert hits[0].id == sources.content_id(contents["2024/holidays/blue sky é.png"])
            by_image = {hit.image: hit for hit in client.search_text("green rectangle", k=4)}
            assert len(by_image) == 4
            assert by_image[str(root / "2024/holidays/green.png")].title == "green rectangle"
            assert by_image[str(root / "red.png")].captions == ["a red ellipse", "round and red"]
            assert "blue sky é.png" in format_hits(hits)
            shown = hit_json(hits[0])  # what the web page shows
            assert (shown["title"], shown["caption"], shown["captions"]) == ("blue sky é.png", "", [])
            served = SearchApp(client).handle("GET", shown["image_url"], {}, b"")  # `xmodal web`'s thumbnail
            assert (served.status, served.body) == (200, contents["2024/holidays/blue sky é.png"])
            texts = client.search_captions(blue, k=3)
            assert {hit.captions[0] for hit in texts} == {"a red ellipse", "green rectangle", "round and red"}

            # what users filter on: the file's place, size, time and pixels
            assert (hits[0].relative_path, hits[0].folder) == ("2024/holidays/blue sky é.png", "2024/holidays")
            assert (hits[0].size, hits[0].width, hits[0].height) == (len(contents["2024/holidays/blue sky é.png"]), 24, 24)
            assert hits[0].mtime == int(blue.stat().st_mtime)
            assert (shown["folder"], shown["width"], shown["height"]) == ("2024/holidays", 24, 24)
            in_folder = client.search_text("green rectangle", k=4, filter='folder == "2024/holidays"')
            assert {hit.relative_path for hit in in_folder} == {"2024/holidays/green.png", "2024/holidays/blue sky é.png"}
            from urllib.parse import urlencode

            page = SearchApp(client).handle(  # the web page's filter box
                "GET", "/api/search?" + urlencode({"q": "green rectangle", "k": 4, "filter": 'folder == "2024/holidays"'}),
                {}, b"")
            assert page.status == 200
            assert {hit["relative_path"] for hit in json.loads(page.body)["hits"]} == {
                "2024/holidays/green.png", "2024/holidays/blue sky é.png"}
            wide = client.search_image(blue, k=4, filter="width >= 40")
            # alias.png links to yellow.PNG: one row for their bytes, described by the first path walked
            assert [(hit.relative_path, hit.folder, hit.width, hit.height) for hit in wide] == [
                ("2024/alias.png", "2024", 40, 40)]
            assert wide[0].paths == [str(root / "2024/alias.png"), str(root / "2024/yellow.PNG")]
            assert hits[0].paths == [str(blue)]
            at_root = client.search_image(blue, k=4, filter='folder == ""')
            assert [hit.relative_path for hit in at_root] == ["red.png"]
            recent = client.search_image(blue, k=4, filter=f"mtime >= {int(blue.stat().st_mtime)} and size > 0")
            assert len(recent) == 4
    finally:
        store.release_local(db)


@pytest.mark.slow
def test_the_command_line_indexes_a_folder_locally(tree, tiny_repository, ray_local, tmp_path, capsys):
    from xmodal import cli

    _, repository = tiny_repository
    root = tree["root"]
    assert cli.main(["index", "--input", str(root), "--image-root", str(tmp_path), "--local"]) == 1
    assert "not for a folder of images" in capsys.readouterr().err
    db = tmp_path / "cli" / "xmodal.db"
    try:
        assert cli.main(["index", "--input", str(root), "--local", "--model-repository", str(repository),
                         "--milvus-uri", str(db), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["items_read"], report["rows_written"], report["dead_letters"]) == (5, 4, 0)
        assert (report["hidden_skipped"], report["not_images_skipped"], report["outside_links_skipped"]) == (2, 2, 2)
    finally:
        store.release_local(db)


def test_a_folders_svg_drawings_are_rendered_and_read_nothing_outside(tmp_path):
    """An SVG is walked as an image, embedded as rendered (xmodal/svg.py), keyed and shown by its
    own file; a broken one is a dead letter; what an SVG references outside itself is not read."""
    from PIL import Image

    root = tmp_path / "drawings"
    root.mkdir()
    secret = photo(tmp_path / "secret.png", "red", "rectangle")  # outside the folder
    (root / "square.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 20 10">'
                                     '<rect width="20" height="10" fill="#2040e0"/></svg>')
    (root / "broken.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle r=')
    (root / "peek.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" viewBox="0 0 10 10">'
        f'<image xlink:href="file://{tmp_path / "secret.png"}" width="10" height="10"/>'
        '<image xlink:href="http://127.0.0.1:9/secret.png" width="10" height="10"/></svg>')
    plan = sources.scan(Source(root), kind="image")
    assert (plan.items, plan.not_images_skipped) == (3, 0)
    items = sources.read_shard(plan.spec, plan.shards[0])
    batch = {key: np.array([item[key] for item in items], dtype=object) for key in items[0]}
    read = sources.read_images(batch)
    by_name = {Path(path).name: i for i, path in enumerate(read["path"])}
    broken, peek, square = (by_name[name] for name in ("broken.svg", "peek.svg", "square.svg"))
    assert read["error"][broken].startswith("cannot render SVG: ParseError")
    assert read["error"][square] == read["error"][peek] == ""
    assert read["id"][square] == sources.content_id((root / "square.svg").read_bytes())  # keyed by its file
    drawing = Image.open(io.BytesIO(read["data"][square])).convert("RGBA")
    assert drawing.size == (256, 256)
    assert drawing.getpixel((128, 128)) == (32, 64, 224, 255)  # the drawing, its aspect kept:
    assert drawing.getpixel((128, 10))[3] == 0  # transparent above the 2:1 rectangle
    colours = Image.open(io.BytesIO(read["data"][peek])).convert("RGBA").getcolors(1 << 16)
    assert all(alpha == 0 for _, (_, _, _, alpha) in colours), "the SVG showed a file from outside the folder"
    assert secret  # the file was there to be read


@pytest.mark.slow
def test_identical_files_are_one_row_that_keeps_every_path(tiny_repository, ray_local, tmp_path):
    """Byte-identical files under several paths, in different shards and upserts: one row, every
    path kept in walk order, the row described by the first; a rerun adds no path twice."""
    _, repository = tiny_repository
    root = tmp_path / "copies"
    same = photo(root / "a.png", "red")
    for name in ("b/copy.png", "c/d/copy again.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(same)
    photo(root / "other.png", "blue")
    db = tmp_path / "milvus" / "xmodal.db"
    job = IndexJob(input=root, model_repository=repository, milvus_uri=str(db), batch_size=1, shard_size=1,
                   write_batch=1, progress=False)
    try:
        first = job.run()
        assert (first.items_read, first.duplicates, first.paths_merged) == (4, 0, 2)  # one a shard: none within one
        again = IndexJob(input=root, model_repository=repository, milvus_uri=str(db), progress=False,
                         restart=True).run()
        assert (again.duplicates, again.paths_merged) == (2, 0)  # one shard; the row already keeps every path
        client = store.connect(db)
        rows = {row["id"]: tinymodel.decoded(row) for row in client.query(
            "xmodal_images", filter="", limit=10, output_fields=["image", "paths", "relative_path", "folder"])}
        client.close()
        row = rows[sources.content_id(same)]
        assert row["paths"] == [str(root / "a.png"), str(root / "b/copy.png"), str(root / "c/d/copy again.png")]
        assert (row["image"], row["relative_path"], row["folder"]) == (str(root / "a.png"), "a.png", "")
        assert len(rows) == 2
    finally:
        store.release_local(db)


def rows_of(db: Path, collection: str, limit: int = 100) -> dict[str, tuple]:
    client = store.connect(db)
    try:
        rows = client.query(collection, filter="", limit=limit, output_fields=["image", "paths", "relative_path", "captions"])
        return {row["id"]: (row["image"], row["paths"], row["relative_path"], row["captions"])
                for row in map(tinymodel.decoded, rows)}
    finally:
        client.close()


@pytest.mark.slow
def test_a_folder_indexed_again_does_only_what_changed_and_sync_removes_what_is_gone(
        tiny_repository, ray_local, tmp_path):
    _, repository = tiny_repository
    root = tmp_path / "album"
    red = photo(root / "a.png", "red")
    green = photo(root / "b.png", "green")
    photo(root / "sub" / "c.png", "blue")
    (root / "d.png").write_bytes(red)  # a.png's bytes: one row, two paths
    (root / "d.txt").write_text("the copy\n")
    db = tmp_path / "milvus" / "xmodal.db"

    def index(**options):
        return IndexJob(input=root, model_repository=repository, milvus_uri=str(db), progress=False,
                        **options).run()

    try:
        first = index()
        assert (first.files_added, first.files_unchanged, first.rows_written, first.paths_merged) == (4, 0, 3, 1)
        unchanged = index()
        assert (unchanged.files_unchanged, unchanged.items_read, unchanged.rows_written) == (4, 0, 0)  # nothing read

        yellow = photo(root / "b.png", "yellow", "rectangle")  # changed in place: other bytes
        os.utime(root / "b.png", ns=(1, 1))  # and another time, whatever the clock's resolution
        photo(root / "e.png", "purple")  # added
        (root / "a.png").unlink()  # gone, its bytes still in d.png
        (root / "sub" / "c.png").unlink()  # gone
        kept = index()
        assert (kept.files_added, kept.files_changed, kept.files_unchanged, kept.files_removed) == (1, 1, 1, 0)
        assert kept.items_read == 2
        rows = rows_of(db, "xmodal_images")
        assert sources.content_id(green) not in rows  # b.png's old bytes: no path left
        assert rows[sources.content_id(yellow)][:2] == (str(root / "b.png"), [str(root / "b.png")])
        assert rows[sources.content_id(red)][1] == [str(root / "a.png"), str(root / "d.png")]  # without --sync

        synced = index(sync=True)
        assert (synced.files_added, synced.files_changed, synced.files_unchanged, synced.files_removed) == (0, 0, 3, 2)
        assert "3 unchanged, 0 changed, 2 removed" in str(synced)
        fresh = IndexJob(input=root, model_repository=repository, milvus_uri=str(db), collection="fresh",
                         progress=False).run()
        assert fresh.files_added == 3
        assert rows_of(db, "xmodal_images") == rows_of(db, "fresh")
        assert rows_of(db, "fresh")[sources.content_id(red)] == (str(root / "d.png"), [str(root / "d.png")], "d.png",
                                                                ["the copy"])
    finally:
        store.release_local(db)


@pytest.mark.slow
def test_a_sync_killed_part_way_and_run_again_ends_as_an_uninterrupted_one(tiny_repository, ray_local, tmp_path):
    import ray

    from xmodal.indexer import progress_path

    _, repository = tiny_repository
    tinymodel.many_images(tmp_path, 120, bad_every=25)
    root = tmp_path / "images" / "many"
    db = tmp_path / "milvus" / "xmodal.db"
    IndexJob(input=root, model_repository=repository, milvus_uri=str(db), progress=False).run()
    store.release_local(db)  # the command's process opens the database
    for i in range(0, 120, 4):  # changed in place
        write_png(root / f"{i:04d}.png", (i, 40, 200 - i), "ellipse", size=20)
        os.utime(root / f"{i:04d}.png", ns=(1, 1))
    for i in range(1, 120, 12):  # gone
        (root / f"{i:04d}.png").unlink()
    for i in range(40):  # added
        write_png(root / "new" / f"{i:04d}.png", (200, i * 5, 30), "rectangle", size=18)
    command = [sys.executable, "-m", "xmodal.cli", "index", "--input", str(root), "--local", "--model-repository",
               str(repository), "--milvus-uri", str(db), "--sync", "--shard-size", "4", "--write-batch", "4",
               "--batch-size", "4", "--json", "--address", ray.get_runtime_context().gcs_address]
    progress = progress_path(str(db), "xmodal_images")
    progress.unlink()  # the first run's: the kill waits for the sync's first finished shard
    at_kill = tinymodel.kill_part_way(command, db, "xmodal_images", tmp_path / "killed.log")
    assert 1 <= len(at_kill["finished"]) < at_kill["shards"] and not at_kill["complete"], (
        "the sync was not killed part-way:\n" + (tmp_path / "killed.log").read_text())
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["files_removed"] == 0 and report["files_unchanged"] > 0  # the killed run removed the gone ones

    try:
        fresh = IndexJob(input=root, model_repository=repository, milvus_uri=str(db), collection="fresh",
                         progress=False).run()
        assert fresh.files_added == 120 - 10 + 40
        assert rows_of(db, "xmodal_images", 500) == rows_of(db, "fresh", 500)
    finally:
        store.release_local(db)
