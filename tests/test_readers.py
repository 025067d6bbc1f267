from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tinymodel

from xmodal.manifest import read_manifest
from xmodal.readers import detect_format, hash_split, import_corpus, wds_key

COLOURS = ["red", "green", "blue", "yellow"]


def png_bytes(colour: str, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus" / "images"
    folder.mkdir(parents=True)
    for colour in COLOURS:
        (folder / f"{colour}.png").write_bytes(png_bytes(colour))
    return folder


def skipped(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]


# --- pure pieces ---------------------------------------------------------------------------


def test_hash_split_is_deterministic_and_near_the_fraction() -> None:
    ids = [f"corpus/{i}.jpg" for i in range(2000)]
    first = [hash_split(i, test_fraction=0.1) for i in ids]
    assert first == [hash_split(i, test_fraction=0.1) for i in ids]
    assert 150 < first.count("test") < 250
    three = [hash_split(i, test_fraction=0.1, val_fraction=0.1) for i in ids]
    assert 150 < three.count("val") < 250
    assert [s for s in three if s == "test"] == [s for s in first if s == "test"]  # val carved out of train only
    assert first != [hash_split(i, test_fraction=0.1, seed=1) for i in ids]


def test_formats_are_detected_from_names(tmp_path: Path) -> None:
    assert detect_format(tmp_path / "captions.csv") == "csv"
    assert detect_format(tmp_path / "captions.jsonl") == "jsonl"
    assert detect_format(tmp_path / "dataset_flickr30k.json") == "karpathy"
    assert detect_format(tmp_path / "train-00000.parquet") == "parquet"
    assert detect_format(tmp_path / "shards" / "shard-*.tar") == "webdataset"
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    assert detect_format(tmp_path / "shards") == "webdataset"
    with pytest.raises(ValueError, match="cannot tell its format"):
        detect_format(tmp_path / "notes.txt")
    assert wds_key("dir/abc.seg.jpg") == ("dir/abc", "seg.jpg")


# --- csv / jsonl ---------------------------------------------------------------------------


def test_csv_merges_rows_per_image_and_records_a_missing_image(image_dir: Path, tmp_path: Path) -> None:
    source = image_dir.parent / "captions.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "category"])
        writer.writerow(["images/red.png", "a red square", "warm"])
        writer.writerow(["images/green.png", "a green square", "cool"])
        writer.writerow(["images/red.png", "something red", "warm"])
        writer.writerow(["images/missing.png", "not there", ""])
        writer.writerow(["images/blue.png", "a blue square", ""])
    out = tmp_path / "out"

    manifest = import_corpus(source, out, progress=False)

    assert manifest == out / "manifest.jsonl"
    rows = read_manifest(manifest, allowed_image_roots=[image_dir.parent])  # the images stay beside the CSV
    assert [r.id for r in rows] == ["captions/images/red.png", "captions/images/green.png", "captions/images/blue.png"]
    red = rows[0]
    assert red.captions == ["a red square", "something red"]
    assert (red.concept, red.style, red.group) == (red.id, "captions", "warm")
    assert red.image == image_dir / "red.png"
    assert rows[2].group is None
    assert {r.split for r in rows} <= {"train", "test"}
    [miss] = skipped(out)
    assert miss["path"].endswith("images/missing.png") and "not found" in miss["reason"]

    again = import_corpus(source, tmp_path / "again", progress=False)
    assert [r.split for r in read_manifest(again, allowed_image_roots=[image_dir])] == [r.split for r in rows]


def test_csv_captions_column_split_and_image_root(image_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "elsewhere.csv"
    source.write_text(
        'image,captions,split\n'
        'red.png,"[""red"", ""crimson""]",restval\n'
        'green.png,"[""green""]",test\n',
        encoding="utf-8",
    )
    rows = read_manifest(import_corpus(source, tmp_path / "out", image_root=image_dir, style="colours", progress=False),
                         allowed_image_roots=[image_dir])
    assert [(r.id, r.captions, r.split) for r in rows] == [
        ("colours/red.png", ["red", "crimson"], "train"),
        ("colours/green.png", ["green"], "test"),
    ]
    forced = read_manifest(
        import_corpus(source, tmp_path / "forced", image_root=image_dir, split="test", progress=False),
        allowed_image_roots=[image_dir],
    )
    assert {r.split for r in forced} == {"test"}


def test_csv_errors_name_file_and_line(image_dir: Path, tmp_path: Path) -> None:
    no_caption = tmp_path / "no_caption.csv"
    no_caption.write_text("image,text\nred.png,red\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_caption\.csv:1: missing column 'caption' or 'captions'"):
        import_corpus(no_caption, tmp_path / "out", image_root=image_dir, progress=False)

    no_image = tmp_path / "no_image.csv"
    no_image.write_text("path,caption\nred.png,red\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_image\.csv:1: missing column 'image'"):
        import_corpus(no_image, tmp_path / "out", image_root=image_dir, progress=False)

    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\nred.png,red\ngreen.png,  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.csv:3: empty caption"):
        import_corpus(empty, tmp_path / "out", image_root=image_dir, progress=False)


def test_jsonl_reads_lists_and_names_bad_lines(image_dir: Path, tmp_path: Path) -> None:
    source = image_dir.parent / "pairs.jsonl"
    source.write_text(
        json.dumps({"image": "images/red.png", "captions": ["red", "scarlet"], "category": "warm"}) + "\n\n"
        + json.dumps({"image": "images/blue.png", "caption": "blue"}) + "\n",
        encoding="utf-8",
    )
    rows = read_manifest(import_corpus(source, tmp_path / "out", progress=False), allowed_image_roots=[image_dir])
    assert [(r.id, r.captions, r.group) for r in rows] == [
        ("pairs/images/red.png", ["red", "scarlet"], "warm"),
        ("pairs/images/blue.png", ["blue"], None),
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "red.png", "caption": "red"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        import_corpus(bad, tmp_path / "out", image_root=image_dir, progress=False)
    no_caption = tmp_path / "no_caption.jsonl"
    no_caption.write_text(json.dumps({"image": "red.png"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_caption\.jsonl:1: missing 'caption' or 'captions'"):
        import_corpus(no_caption, tmp_path / "out", image_root=image_dir, progress=False)
    no_image = tmp_path / "no_image.jsonl"
    no_image.write_text(json.dumps({"caption": "red"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_image\.jsonl:1: missing key 'image'"):
        import_corpus(no_image, tmp_path / "out", image_root=image_dir, progress=False)


# --- Karpathy ------------------------------------------------------------------------------


def test_karpathy_keeps_splits_and_filepaths(image_dir: Path, tmp_path: Path) -> None:
    (image_dir / "val2014").mkdir()
    (image_dir / "val2014" / "yellow.png").write_bytes(png_bytes("yellow"))
    source = tmp_path / "dataset_flickr30k.json"
    source.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": "red.png", "split": "train", "sentences": [{"raw": "A red square ."}, {"raw": "Red."}]},
        {"filename": "green.png", "split": "restval", "sentences": [{"raw": "green", "tokens": ["green"]}]},
        {"filename": "blue.png", "split": "test", "sentences": [{"tokens": ["a", "blue", "one"]}]},
        {"filepath": "val2014", "filename": "yellow.png", "split": "val", "sentences": [{"raw": "yellow"}]},
        {"filename": "gone.png", "split": "train", "sentences": [{"raw": "nothing"}]},
    ]}), encoding="utf-8")

    rows = read_manifest(import_corpus(source, tmp_path / "out", image_root=image_dir, progress=False),
                         allowed_image_roots=[image_dir])

    assert [(r.id, r.split, r.captions) for r in rows] == [
        ("flickr30k/red.png", "train", ["A red square .", "Red."]),
        ("flickr30k/green.png", "train", ["green"]),
        ("flickr30k/blue.png", "test", ["a blue one"]),
        ("flickr30k/val2014/yellow.png", "val", ["yellow"]),
    ]
    assert rows[3].image == image_dir / "val2014" / "yellow.png"
    [miss] = skipped(tmp_path / "out")
    assert miss["path"].endswith("gone.png")


def test_karpathy_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "dataset_coco.json"
    broken.write_text('{"images": [\n{"filename": "a.jpg",\n}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"dataset_coco\.json:3: not valid JSON"):
        import_corpus(broken, tmp_path / "out", progress=False)
    no_sentences = tmp_path / "dataset_x.json"
    no_sentences.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": []}]}))
    with pytest.raises(ValueError, match=r"dataset_x\.json: images\[0\] \(a\.jpg\): missing 'sentences'"):
        import_corpus(no_sentences, tmp_path / "out", progress=False)


# --- Parquet -------------------------------------------------------------------------------


def test_parquet_image_structs_are_written_once_by_content(tmp_path: Path) -> None:
    red = png_bytes("red")
    table = pa.table({
        "image": [{"bytes": red, "path": "red.png"}, {"bytes": jpeg_bytes("green"), "path": None},
                  {"bytes": red, "path": "red-again.png"}, {"bytes": b"not an image", "path": None}],
        "caption": ["red", "green", "also red", "junk"],
        "split": ["train", "test", "train", None],
    })
    source = tmp_path / "train-00000.parquet"
    pq.write_table(table, source, row_group_size=2)  # several record batches

    out = tmp_path / "out"
    rows = read_manifest(import_corpus(source, out, progress=False))

    assert len(rows) == 2
    assert rows[0].captions == ["red", "also red"]
    assert rows[0].image.parent.parent == out / "images"
    assert rows[0].image.suffix == ".png" and rows[1].image.suffix == ".jpg"
    assert rows[0].image.name.startswith(rows[0].id.split("/")[1])
    assert rows[0].image.read_bytes() == red
    assert [r.split for r in rows] == ["train", "test"]
    [junk] = skipped(out)
    assert "row 3" in junk["path"] and "not a recognised image" in junk["reason"]
    mtime = rows[0].image.stat().st_mtime_ns
    import_corpus(source, out, progress=False)
    assert rows[0].image.stat().st_mtime_ns == mtime  # not rewritten


def test_parquet_binary_and_path_columns_with_named_columns(image_dir: Path, tmp_path: Path) -> None:
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"jpg": pa.array([png_bytes("blue")], pa.binary()), "txt": [["blue", "navy"]]}), binary)
    [row] = read_manifest(import_corpus(binary, tmp_path / "a", progress=False))
    assert row.captions == ["blue", "navy"] and row.image.suffix == ".png"

    paths = image_dir.parent / "paths.parquet"
    pq.write_table(pa.table({"file": ["images/red.png", "images/none.png"], "alt": ["red", "nothing"]}), paths)
    with pytest.raises(ValueError, match=r"paths\.parquet: no caption column"):
        import_corpus(paths, tmp_path / "b", progress=False)
    manifest = import_corpus(paths, tmp_path / "b", image_column="file", caption_column="alt", progress=False)
    [row] = read_manifest(manifest, allowed_image_roots=[image_dir])
    assert row.image == image_dir / "red.png"
    assert len(skipped(tmp_path / "b")) == 1


def test_parquet_empty_caption_names_the_row(tmp_path: Path) -> None:
    source = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [png_bytes("red"), png_bytes("blue")], "caption": ["red", ""]}), source)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 1: empty caption"):
        import_corpus(source, tmp_path / "out", progress=False)


# --- WebDataset ----------------------------------------------------------------------------


def test_webdataset_directory_of_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    tinymodel.write_shard(shards / "shard-000.tar", [
        ("000", {"jpg": jpeg_bytes("red"), "txt": b"a red square\n"}),
        ("001", {"png": png_bytes("green"), "json": json.dumps({"caption": "green", "category": "cool"}).encode()}),
    ])
    tinymodel.write_shard(shards / "shard-001.tar", [
        ("002", {"webp": png_bytes("blue"),
                 "json": json.dumps({"captions": ["blue", "navy"], "split": "test"}).encode()}),
        ("003", {"txt": b"an image that is not there"}),
    ])
    out = tmp_path / "out"

    rows = read_manifest(import_corpus(shards, out, progress=False))

    assert [r.captions for r in rows] == [["a red square"], ["green"], ["blue", "navy"]]
    assert [r.image.suffix for r in rows] == [".jpg", ".png", ".webp"]
    assert rows[1].group == "cool" and rows[2].split == "test"
    assert all(r.image.is_file() and r.image.is_relative_to(out / "images") for r in rows)
    [miss] = skipped(out)
    assert miss["path"].endswith("shard-001.tar:003") and "no image" in miss["reason"]

    by_glob = read_manifest(import_corpus(shards / "shard-00[0].tar", tmp_path / "glob", progress=False))
    assert [r.id for r in by_glob] == [r.id for r in rows[:2]]


def test_webdataset_sample_without_caption_names_shard_and_key(tmp_path: Path) -> None:
    shard = tmp_path / "bad.tar"
    tinymodel.write_shard(shard, [("000", {"jpg": jpeg_bytes("red"), "txt": b"red"}), ("001", {"jpg": jpeg_bytes("blue")})])
    with pytest.raises(ValueError, match=r"bad\.tar:001: no caption"):
        import_corpus(shard, tmp_path / "out", progress=False)
    tinymodel.write_shard(shard, [("000", {"jpg": jpeg_bytes("red"), "json": b"{oops"})])
    with pytest.raises(ValueError, match=r"bad\.tar:000\.json: not valid JSON"):
        import_corpus(shard, tmp_path / "out", progress=False)
