"""The input formats' shards in their own units (Parquet rows, tar member headers, CSV records,
Karpathy rows), the checks made before any work, and the command line's input options:
no Ray, no Triton, no Milvus."""
from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tinymodel
from tinymodel import png
from xmodal import cli
from xmodal.indexer import IndexJob, sources
from xmodal.indexer.formats import Source, input_spec


def test_parquet_shards_start_inside_row_groups_and_span_files(tmp_path):
    for n in range(2):
        pq.write_table(pa.table({"img": [f"{n}-{i}.png" for i in range(7)],
                                 "caption": [f"file {n} row {i}" for i in range(7)]}),
                       tmp_path / f"part-{n}.parquet", row_group_size=3)
    plan = sources.scan(Source(tmp_path, image_column="img"), kind="image", shard_size=4)
    assert (plan.spec.format, plan.items) == ("parquet", 14)
    assert [(Path(s.files[0]).name, s.offset, len(s.files)) for s in plan.shards] == [
        ("part-0.parquet", 0, 1), ("part-0.parquet", 4, 2), ("part-1.parquet", 1, 1), ("part-1.parquet", 5, 1)]
    read = [item for shard in plan.shards for item in sources.read_shard(plan.spec, shard)]
    assert [json.loads(item["captions"])[0] for item in read] == [
        f"file {n} row {i}" for n in range(2) for i in range(7)]
    assert read[8]["path"] == str(tmp_path / "1-1.png")  # paths are relative to the file's folder
    assert [item["item"] for item in read] == list(range(14))


def test_parquet_image_structs_hold_bytes_or_a_path(tmp_path):
    red = png(tmp_path, "red")
    png(tmp_path, "blue")
    source = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": [{"bytes": red, "path": "red.png"}, {"bytes": None, "path": "blue.png"},
                                       {"bytes": None, "path": None}], "text": ["r", "b", "c"]}), source)
    plan = sources.scan(Source(source), kind="image")  # the scan reads no image: the read must agree with it
    items = sources.read_shard(plan.spec, plan.shards[0])
    assert [(i["path"], i["in_source"], i["data"], i["error"]) for i in items] == [
        (f"{source}: row 0", True, red, ""), (str(tmp_path / "blue.png"), False, b"", ""),
        (f"{source}: row 2", True, b"", "image 'image' has neither bytes nor a path")]
    assert {i["concept"] for i in items} == {f"hf/hf.parquet: row {n}" for n in range(3)}


def test_tar_shards_start_at_the_member_headers_plain_or_gzipped(tmp_path):
    samples = [(f"{i:03d}", {"jpg": b"not read by the scan %d" % i, "txt": f"caption {i}".encode()})
               for i in range(5)]
    plain = tmp_path / "plain" / "data.tar"
    plain.parent.mkdir()
    tinymodel.write_shard(plain, samples)
    gzipped = tmp_path / "gz" / "data.tar.gz"
    gzipped.parent.mkdir()
    gzipped.write_bytes(gzip.compress(plain.read_bytes()))
    with tarfile.open(plain) as archive:
        headers = {member.name: member.offset for member in archive.getmembers()}
    for source in (plain, gzipped):
        plan = sources.scan(Source(source), kind="image", shard_size=2)
        assert plan.spec.format == "webdataset"
        assert [(s.offset, s.line) for s in plan.shards] == [
            (headers["000.jpg"], 0), (headers["002.jpg"], 2), (headers["004.jpg"], 4)]
        second = sources.read_shard(plan.spec, plan.shards[1])
        assert [item["item"] for item in second] == [2, 3]
        assert [item["data"] for item in second] == [b"not read by the scan 2", b"not read by the scan 3"]
        assert second[0]["path"] == f"{source}:002.jpg" and second[0]["in_source"]


def test_csv_shards_start_at_record_offsets(tmp_path):
    source = tmp_path / "t.tsv"
    source.write_bytes(b"\xef\xbb\xbfimage\tcaption\n"  # a byte-order mark, tab-separated
                       b"a.png\tone\n" b"a.png\ttwo\n" b'b.png\t"three\nlines\nlong"\n' b"\n" b"c.png\tfour\n")
    plan = sources.scan(Source(source), kind="caption", shard_size=2)
    raw = source.read_bytes()
    assert [(s.line, s.skip, raw[s.offset:].split(b"\t")[0]) for s in plan.shards] == [
        (2, 0, b"a.png"), (4, 0, b"b.png"), ]  # a.png's two lines are one row: its captions one shard
    assert [i["caption"] for s in plan.shards for i in sources.read_shard(plan.spec, s)] == [
        "one", "two", "three\nlines\nlong", "four"]


def test_karpathy_rows_travel_with_their_shards(tmp_path):
    source = tmp_path / "dataset_x.json"
    source.write_text(json.dumps({"images": [
        {"filename": f"{i}.png", "split": "test", "sentences": [{"raw": f"c{i} {n}"} for n in "abc"]}
        for i in range(3)]}))
    plan = sources.scan(Source(source), kind="caption", shard_size=2)
    # a row whose captions straddle two shards travels with both (its captions cut by `skip`)
    assert [(len(s.rows), s.skip) for s in plan.shards] == [(1, 0), (2, 2), (1, 1), (1, 0), (1, 2)]
    assert [i["caption"] for s in plan.shards for i in sources.read_shard(plan.spec, s)] == [
        f"c{i} {n}" for i in range(3) for n in "abc"]


def test_inputs_are_found_and_checked_before_any_work(tmp_path):
    pq.write_table(pa.table({"photo": [b"x"], "caption": ["c"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    assert input_spec(Source(tmp_path / "a.parquet"), kind="image").format == "parquet"
    assert input_spec(Source(tmp_path / "*.parquet"), kind="image").style == tmp_path.name.lower().replace("_", "-")
    with pytest.raises(ValueError, match=r"a\.parquet: no image column"):
        sources.scan(Source(tmp_path / "a.parquet"), kind="image")
    with pytest.raises(ValueError, match=r"b\.parquet: not a readable Parquet file"):
        sources.scan(Source(tmp_path / "b.parquet", image_column="photo"), kind="image")
    (tmp_path / "bad.tar").write_bytes(b"no tar" * 200)
    with pytest.raises(ValueError, match=r"bad\.tar: not a readable tar shard"):
        sources.scan(Source(tmp_path / "bad.tar"), kind="caption")
    with pytest.raises(ValueError, match="cannot tell its format"):
        input_spec(Source(tmp_path / "notes.txt"), kind="image")
    with pytest.raises(ValueError, match="not both or neither"):
        IndexJob(manifest=tmp_path / "m.jsonl", input=tmp_path / "a.parquet", progress=False).run()
    # the split of a source without splits: every row, unless one is asked for
    assert input_spec(Source(tmp_path / "a.parquet"), kind="image").split is None
    assert input_spec(Source(tmp_path / "a.parquet"), kind="image", split="validation").split == "val"
    assert input_spec(Source(tmp_path / "m.jsonl", format="manifest"), kind="image").split == "test"


def test_a_source_changed_during_the_run_fails_its_read(tmp_path):
    source = tmp_path / "data.parquet"
    pq.write_table(pa.table({"image": [b"one", b"two", b"three"], "caption": ["a", "b", "c"]}), source)
    plan = sources.scan(Source(source), kind="image", shard_size=2)
    # other image bytes, the same captions: the scan did not read the bytes, the file's stamp tells
    pq.write_table(pa.table({"image": [b"one", b"two", b"three!"], "caption": ["a", "b", "c"]}), source)
    with pytest.raises(ValueError, match=r"parquet input .*data\.parquet changed during the run \(shard 1"):
        sources.read_shard(plan.spec, plan.shards[1])
    # the resume identity: a run over another format or options of the same file is another input
    identity = plan.spec.identity()
    assert identity["input"]["format"] == "parquet" and identity["manifest"] == str(source)
    other = sources.scan(Source(source, image_column="image", name="other"), kind="image", shard_size=2)
    assert other.spec.identity() != identity


def test_the_command_line_takes_one_input(tmp_path, capsys):
    manifest, _ = tinymodel.write_corpus(tmp_path)
    assert cli.main(["index", "--manifest", str(manifest), "--input", str(tmp_path / "x.csv")]) == 1
    assert "either --manifest" in capsys.readouterr().err
    assert cli.main(["index", "--manifest", str(manifest), "--image-column", "jpg"]) == 1
    assert "--image-column go with --input" in capsys.readouterr().err
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    assert cli.main(["index", "--input", str(tmp_path / "x.parquet"), "--triton-url", "127.0.0.1:1"]) == 1
    assert "x.parquet: not a readable Parquet file" in capsys.readouterr().err
