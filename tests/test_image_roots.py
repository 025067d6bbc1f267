"""Image paths stay under their corpus root (issue 18, item 9): the readers refuse rows naming a file
elsewhere (`../`, an absolute path, a symlink leading out) unless its directory is allowed on
purpose, the indexer records the roots its rows' images lie under with the collection, and
`xmodal web` serves a row's image only from under those roots, whoever wrote the row.

Real files, real milvus-lite (and the Milvus server for the record), the session's tiny
tritonserver for the page; no mocks."""
from __future__ import annotations

import csv
import http.client
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tinymodel
from xmodal import contract, store
from xmodal.client import Client
from xmodal.files import ImageRoots
from xmodal.indexer import IndexJob, formats, sources
from xmodal.indexer.formats import Source
from xmodal.manifest import read_manifest
from xmodal.readers import import_corpus, walk_folder

pytestmark = pytest.mark.timeout(240)

SECRET = b"the content of a file nobody indexed on purpose"


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """corpus/ (the corpus root: images/red.png, and links/outside.png, a symlink to a PNG
    outside it), elsewhere/blue.png (a PNG outside it) and secret.txt (not an image at all)."""
    corpus = tmp_path / "corpus"
    red = tinymodel.write_png(corpus / "images" / "red.png", tinymodel.COLOURS["red"])
    elsewhere = tinymodel.write_png(tmp_path / "elsewhere" / "blue.png", tinymodel.COLOURS["blue"])
    (corpus / "links").mkdir()
    (corpus / "links" / "outside.png").symlink_to(elsewhere)
    (corpus / "links" / "inside.png").symlink_to(red)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    return {"corpus": corpus, "red": red, "elsewhere": elsewhere, "secret": secret}


def manifest_line(image: str, concept: str = "red") -> str:
    return json.dumps({"id": f"tiny/{concept}", "concept": concept, "style": "tiny", "split": "test",
                       "image": image, "captions": [f"a {concept} thing"]}) + "\n"


# ---- the one check ---------------------------------------------------------------------------


def test_a_path_lies_under_a_root_once_symlinks_are_followed(layout):
    corpus = layout["corpus"]
    roots = ImageRoots([corpus])
    assert roots.place(corpus / "images" / "red.png") == layout["red"].resolve()
    assert roots.place(corpus / "links" / "inside.png") == layout["red"].resolve()  # a link that stays inside
    assert corpus / "links" / "outside.png" not in roots  # a link leading out
    assert corpus / "images" / ".." / ".." / "elsewhere" / "blue.png" not in roots
    assert layout["elsewhere"] not in roots and "/etc/passwd" not in roots
    assert f"file://{corpus}/images/red.png" in roots and f"file://{layout['elsewhere']}" not in roots
    assert corpus / "links" / "outside.png" in ImageRoots([corpus, layout["elsewhere"].parent])
    loop = corpus / "loop.png"
    loop.symlink_to(loop)
    assert loop not in roots


def test_a_uri_lies_under_a_root_uri_of_the_same_filesystem():
    roots = ImageRoots(["s3://bucket/store/", "file:///srv/images"])
    assert "s3://bucket/store/ab/abcd.png" in roots
    for outside in ("s3://bucket/other/ab.png", "s3://other-bucket/store/ab.png", "gs://bucket/store/ab.png",
                    "s3://bucket/store/../secret", "s3://bucket/store/%2e%2e/secret",
                    "s3://bucket/store/ab.png?endpoint_override=elsewhere", "s3://bucket/storefront/ab.png"):
        assert outside not in roots, outside
    assert "/srv/images/a.png" in roots and "/srv/imagesx/a.png" not in roots  # file:// is its local path


# ---- read time: the manifest ---------------------------------------------------------------


@pytest.mark.parametrize("image", ["../elsewhere/blue.png", "ABSOLUTE", "links/outside.png"],
                         ids=["dot-dot", "absolute", "symlink-leading-out"])
def test_a_manifest_line_naming_a_file_outside_its_directory_is_refused(layout, image):
    corpus = layout["corpus"]
    image = str(layout["elsewhere"]) if image == "ABSOLUTE" else image
    manifest = corpus / "manifest.jsonl"
    manifest.write_text(manifest_line("images/red.png") + manifest_line(image, "blue"), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"manifest\.jsonl:2: image .*(blue|outside)\.png is outside the corpus "
                                         rf"root {corpus}.*--allow-image-root"):
        read_manifest(manifest)

    rows = read_manifest(manifest, allowed_image_roots=[layout["elsewhere"].parent])  # on purpose
    assert [row.concept for row in rows] == ["red", "blue"]
    assert rows[1].image.resolve() == layout["elsewhere"].resolve()
    # the indexer reads a manifest by the same rule: it stops before any work, naming the line
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: image .* is outside the corpus root"):
        sources.scan(manifest, kind="image", split=None)
    plan = sources.scan(manifest, kind="image", split=None, allowed_image_roots=[layout["elsewhere"].parent])
    assert plan.items == 2
    assert plan.image_roots == (str(corpus.resolve()), str(layout["elsewhere"].parent.resolve()))


def test_an_absolute_path_inside_the_manifests_directory_is_read(layout):
    manifest = layout["corpus"] / "manifest.jsonl"
    manifest.write_text(manifest_line(str(layout["red"])), encoding="utf-8")
    [row] = read_manifest(manifest)
    assert row.image == layout["red"]


# ---- read time: the formats users bring ----------------------------------------------------


def write_source(kind: str, corpus: Path, images: list[str]) -> Path:
    if kind == "csv":
        source = corpus / "captions.csv"
        with source.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "caption"])
            writer.writerows([image, f"picture {i}"] for i, image in enumerate(images))
    elif kind == "jsonl":
        source = corpus / "captions.jsonl"
        source.write_text("".join(json.dumps({"image": image, "caption": f"picture {i}"}) + "\n"
                                  for i, image in enumerate(images)), encoding="utf-8")
    else:
        source = corpus / "captions.parquet"
        pq.write_table(pa.table({"image_path": images, "caption": [f"picture {i}" for i in range(len(images))]}),
                       source)
    return source


# where each format names its second row
WHERE = {"csv": r"captions\.csv:3", "jsonl": r"captions\.jsonl:2", "parquet": r"captions\.parquet: row 1"}


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("image", ["../elsewhere/blue.png", "ABSOLUTE", "links/outside.png"],
                         ids=["dot-dot", "absolute", "symlink-leading-out"])
def test_an_imported_row_naming_a_file_outside_the_corpus_root_is_refused(layout, tmp_path, kind, image):
    corpus = layout["corpus"]
    image = str(layout["elsewhere"]) if image == "ABSOLUTE" else image
    source = write_source(kind, corpus, ["images/red.png", image])
    with pytest.raises(ValueError, match=rf"{WHERE[kind]}: image .*(blue|outside)\.png is outside the corpus root "
                                         rf"{corpus}"):
        import_corpus(source, tmp_path / "out", progress=False)

    out = tmp_path / "allowed"
    manifest = import_corpus(source, out, progress=False, allowed_image_roots=[layout["elsewhere"].parent])
    rows = read_manifest(manifest, allowed_image_roots=[corpus, layout["elsewhere"].parent])
    assert [row.image.resolve() for row in rows] == [layout["red"].resolve(), layout["elsewhere"].resolve()]
    with pytest.raises(ValueError, match="is outside the corpus root"):  # the manifest's images stayed where they were
        read_manifest(manifest)


def test_a_corpus_imported_into_the_data_directory_reads_from_where_its_import_was_told(layout, tmp_path,
                                                                                         monkeypatch):
    """`xmodal data import captions.csv --name mine` then `xmodal train --data mine`: the images stay
    beside the CSV, and the import recorded that root beside the manifest it wrote into the data
    directory. The same manifest and record copied anywhere else widen nothing."""
    import shutil

    monkeypatch.setenv("XMODAL_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("XMODAL_ALLOWED_IMAGE_ROOTS", raising=False)
    source = write_source("csv", layout["corpus"], ["images/red.png"])
    manifest = import_corpus(source, tmp_path / "data" / "mine", progress=False)
    [row] = read_manifest(manifest)
    assert row.image.resolve() == layout["red"].resolve()

    copied = tmp_path / "copied"
    shutil.copytree(manifest.parent, copied)
    with pytest.raises(ValueError, match="is outside the corpus root"):
        read_manifest(copied / manifest.name)


def test_the_indexer_sends_a_row_naming_a_file_outside_to_the_dead_letters(layout):
    """A big input's bad row does not stop the run: the scan keeps it as a malformed row (a dead
    letter), the others are read, and the roots to record are the corpus root's."""
    corpus = layout["corpus"]
    source = write_source("csv", corpus, ["images/red.png", "../elsewhere/blue.png", "links/outside.png",
                                          "links/inside.png"])
    plan = sources.scan(Source(source), kind="image")
    assert plan.items == 4 and plan.image_roots == (str(corpus.resolve()),)
    rows = [row for *_, row in formats.rows(plan.spec, [str(source)])]
    assert [bool(row.problem) for row in rows] == [False, True, True, False]
    assert "captions.csv:3: image" in rows[1].problem and "is outside the corpus root" in rows[1].problem
    item = sources._image_item(1, rows[1])
    assert item["error"] == rows[1].problem  # what its dead letter says

    allowed = sources.scan(Source(source), kind="image", allowed_image_roots=[layout["elsewhere"].parent])
    assert [bool(row.problem) for *_, row in formats.rows(allowed.spec, [str(source)])] == [False] * 4
    assert allowed.image_roots[-1] == str(layout["elsewhere"].parent.resolve())


def test_a_folders_links_into_an_allowed_directory_are_followed(layout):
    corpus = layout["corpus"]
    walk = walk_folder(corpus)
    assert sorted(image.name for image in walk.images) == ["inside.png", "red.png"] and walk.outside_links == 1
    allowed = walk_folder(corpus, [layout["elsewhere"].parent])
    assert sorted(image.name for image in allowed.images) == ["inside.png", "outside.png", "red.png"]
    assert allowed.outside_links == 0


def test_an_allowed_image_root_must_be_a_directory(layout, tmp_path):
    with pytest.raises(ValueError, match="allowed_image_roots: .* is not a directory"):
        IndexJob(manifest=layout["corpus"] / "manifest.jsonl", model_repository=tmp_path,
                 allowed_image_roots=[tmp_path / "nowhere"])


# ---- the collection's record ---------------------------------------------------------------


def test_the_collection_records_roots_across_runs_without_repeats(milvus_backend, tmp_path):
    client = store.connect(milvus_backend)
    try:
        store.ensure_collection(client, "images", tinymodel.make_card("roots00000000000"))
        assert store.collection_image_roots(client, "images") == []
        first, second = tmp_path / "first", tmp_path / "second"
        assert store.record_image_roots(client, "images", [first]) == [str(first.resolve())]
        store.record_image_roots(client, "images", [second, first, first / "nested", "s3://bucket/store/"])
        expected = [str(first.resolve()), str(second.resolve()), "s3://bucket/store"]
        assert store.collection_image_roots(client, "images") == expected
        assert store.record_image_roots(client, "images", [second]) == expected
        assert store.collection_model(client, "images")["fingerprint"] == "roots00000000000"  # the model stays
        store.drop_collection(client, "images")
        store.ensure_collection(client, "images", tinymodel.make_card("roots00000000000"))
        assert store.collection_image_roots(client, "images") == []  # a new collection holds no rows
    finally:
        client.close()


# ---- serve time: xmodal web ----------------------------------------------------------------


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_triton, ray_local):
    """The tiny corpus indexed through Triton into milvus-lite, and `xmodal web` over it; beside
    it a file that is no image, a PNG outside the corpus, and symlinks to both inside it."""
    directory = tmp_path_factory.mktemp("roots")
    corpus = directory / "corpus"
    manifest, images = tinymodel.write_corpus(corpus)
    secret = directory / "secret.txt"
    secret.write_bytes(SECRET)
    outside_png = tinymodel.write_png(directory / "elsewhere" / "grey.png", (128, 128, 128))
    (corpus / "images" / "tiny" / "secret.png").symlink_to(secret)
    (corpus / "images" / "tiny" / "grey.png").symlink_to(outside_png)
    db = directory / "milvus" / "xmodal.db"
    report = IndexJob(manifest=manifest, triton_url=tiny_triton.url, milvus_uri=str(db), batch_size=4,
                      progress=False).run()
    assert report.rows_written == len(images)
    with Client(tiny_triton.url, db) as client, tinymodel.web_page(client) as server:
        yield {"client": client, "db": db, "corpus": corpus, "images": images, "secret": secret,
               "outside_png": outside_png, "port": server.server_address[1], "manifest": manifest,
               "triton_url": tiny_triton.url}
    store.release_local(db)


def get(page, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", page["port"], timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def write_row(page, row_id: str, image: str) -> None:
    """A row naming `image`, upserted straight into the collection, as anyone with write access to
    a shared collection could (its vector and fields copied from an indexed row)."""
    client = store.connect(page["db"])
    try:
        [row] = client.query("xmodal_images", filter='id != ""', output_fields=["*"], limit=1)
        row = {name: value.tolist() if hasattr(value, "tolist") else value for name, value in row.items()}
        row.update(id=row_id, image=image, paths=contract.json_list([image]))
        store.upsert_rows(client, "xmodal_images", [row])
        client.flush("xmodal_images")
    finally:
        client.close()


def test_the_indexer_records_the_manifests_directory(page):
    client = store.connect(page["db"])
    try:
        assert store.collection_image_roots(client, "xmodal_images")[0] == str(page["corpus"].resolve())
    finally:
        client.close()


def test_the_page_serves_rows_under_the_recorded_roots_only(page):
    corpus = page["corpus"]
    hit = page["client"].search_text("red ellipse", k=1)[0]
    status, body = get(page, f"/image/{hit.id}")
    assert status == 200 and body == Path(hit.image).read_bytes()

    # written straight into the collection: under the root, a file the indexer never saw is served
    extra = tinymodel.write_png(corpus / "images" / "tiny" / "written-later.png", (10, 20, 30))
    write_row(page, "a" * 32, str(extra))
    status, body = get(page, f"/image/{'a' * 32}")
    assert status == 200 and body == extra.read_bytes()

    attacks = {
        "b" * 32: str(page["secret"]),  # an absolute path elsewhere
        "c" * 32: str(corpus / "images" / ".." / ".." / "secret.txt"),  # ../ out of the root
        "d" * 32: str(corpus / "images" / "tiny" / "secret.png"),  # a symlink in the root leading out
        "e" * 32: str(corpus / "images" / "tiny" / "grey.png"),  # the same, to an image
        "f" * 32: f"file://{page['secret']}",  # a URI of a local file elsewhere
        "0" * 31 + "1": "/etc/passwd",
        "0" * 31 + "2": "images/tiny/red.png",  # relative: wherever the server runs
    }
    for row_id, image in attacks.items():
        write_row(page, row_id, image)
    for row_id, image in attacks.items():
        status, body = get(page, f"/image/{row_id}")
        assert status == 404, image
        assert json.loads(body) == {"error": "no such image"}, image  # no content, no path
        assert SECRET not in body and b"/" not in body


def test_a_root_recorded_after_the_page_started_is_served(page):
    """Another run, allowed a directory outside the corpus, records it beside the first run's
    root (once, however often it runs): the page, already running, serves its images from then on."""
    elsewhere = page["outside_png"].parent
    row_id = "9" * 32
    write_row(page, row_id, str(page["outside_png"]))
    assert get(page, f"/image/{row_id}")[0] == 404
    for _ in range(2):
        IndexJob(manifest=page["manifest"], allowed_image_roots=[elsewhere], triton_url=page["triton_url"],
                 milvus_uri=str(page["db"]), batch_size=4, progress=False).run()
    client = store.connect(page["db"])
    try:
        assert store.collection_image_roots(client, "xmodal_images") == [str(page["corpus"].resolve()),
                                                                          str(elsewhere.resolve())]
    finally:
        client.close()
    status, body = get(page, f"/image/{row_id}")
    assert status == 200 and body == page["outside_png"].read_bytes()


def test_the_environment_allows_roots_for_the_commands_without_the_flag(layout, tmp_path, monkeypatch, capsys):
    """`xmodal train --data NAME` reads a manifest that `xmodal data import` wrote with its images
    left beside the CSV: $XMODAL_ALLOWED_IMAGE_ROOTS allows them, and the import says so."""
    corpus = layout["corpus"]
    manifest = import_corpus(write_source("csv", corpus, ["images/red.png"]), tmp_path / "data" / "captions",
                             progress=False)
    assert f"XMODAL_ALLOWED_IMAGE_ROOTS={corpus.resolve()}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="XMODAL_ALLOWED_IMAGE_ROOTS"):
        read_manifest(manifest)
    monkeypatch.setenv("XMODAL_ALLOWED_IMAGE_ROOTS", f"{tmp_path / 'unrelated'}:{corpus}")
    [row] = read_manifest(manifest)
    assert row.image == layout["red"]
    assert formats.input_spec(Source(manifest, format=formats.MANIFEST), kind="image").allowed_image_roots == (
        str((tmp_path / "unrelated").resolve()), str(corpus.resolve()))
