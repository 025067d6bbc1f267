"""The indexer's streaming reader and its writer, without Triton or Milvus: shards of a manifest
found by byte offset, read back in order, and the writer's bookkeeping of finished shards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import tinymodel
from xmodal import contract
from xmodal.indexer import sources
from xmodal.indexer.pipeline import _Writer


def manifest_of(directory: Path, records: list[dict]) -> Path:
    path = directory / "manifest.jsonl"
    # a blank line and rows of another split between the selected ones: the offsets must skip them
    lines = []
    for i, record in enumerate(records):
        lines.append(json.dumps(record))
        if i % 3 == 1:
            lines.append("")
            lines.append(json.dumps({**record, "id": record["id"] + "-train", "split": "train"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def caption_records(count_: int) -> list[dict]:
    records = []
    for i in range(count_):
        record = tinymodel.record(f"images/{i:03d}.png", f"c{i:03d}")
        record["captions"] = [f"caption {i}", f"caption {i} again", "shared caption"]
        records.append(record)
    return records


def test_scan_numbers_items_and_finds_each_shard_in_the_file(tmp_path):
    records = [tinymodel.record(f"images/{i:03d}.png", f"c{i:03d}") for i in range(11)]
    manifest = manifest_of(tmp_path, records)
    plan = sources.scan(manifest, kind="image", split="test", shard_size=4)
    assert (plan.items, [s.items for s in plan.shards]) == (11, [4, 4, 3])
    raw = manifest.read_bytes()
    for shard in plan.shards:
        # each shard starts at the byte offset of its first item's line, and says which line that is
        line = raw[shard.offset:].split(b"\n", 1)[0]
        assert json.loads(line)["concept"] == f"c{shard.first_item:03d}"
        assert raw[:shard.offset].count(b"\n") + 1 == shard.line
    items = [item for shard in plan.shards for item in sources.read_shard(plan.spec, shard)]
    assert [item["item"] for item in items] == list(range(11))
    assert [item["concept"] for item in items] == [r["concept"] for r in records]
    assert all(item["path"] == str(tmp_path / r["image"]) for item, r in zip(items, records))
    # the same input scanned again hashes the same; another shard size or limit does not
    assert sources.scan(manifest, kind="image", split="test", shard_size=4).items_sha256 == plan.items_sha256
    limited = sources.scan(manifest, kind="image", split="test", shard_size=4, limit=5)
    assert (limited.items, [s.items for s in limited.shards]) == (5, [4, 1])
    assert limited.items_sha256 != plan.items_sha256
    assert [i["item"] for i in sources.read_shard(limited.spec, limited.shards[1])] == [4]


def test_caption_shards_cut_rows_and_send_each_text_once_per_shard(tmp_path):
    manifest = manifest_of(tmp_path, caption_records(5))  # 15 captions; "shared caption" in every row
    plan = sources.scan(manifest, kind="caption", split="test", shard_size=4)
    assert plan.items == 15 and [s.items for s in plan.shards] == [4, 4, 4, 3]
    # shard 1 starts inside row 1 (its second caption), shard 2 inside row 2 (its third)
    assert [(s.first_item, s.skip) for s in plan.shards] == [(0, 0), (4, 1), (8, 2), (12, 0)]
    read = {shard.number: sources.read_shard(plan.spec, shard) for shard in plan.shards}
    assert [len(read[s.number]) for s in plan.shards] == [s.emitted for s in plan.shards] == [4, 4, 3, 3]
    assert [(i["item"], i["caption"]) for i in read[0]] == [
        (0, "caption 0"), (1, "caption 0 again"), (2, "shared caption"), (3, "caption 1")]
    assert [(i["item"], i["caption"]) for i in read[1]] == [
        (4, "caption 1 again"), (5, "shared caption"), (6, "caption 2"), (7, "caption 2 again")]
    # shard 2 holds "shared caption" twice (items 8 and 11): sent once, as its last occurrence
    assert [(i["item"], i["caption"]) for i in read[2]] == [
        (9, "caption 3"), (10, "caption 3 again"), (11, "shared caption")]
    assert {i["id"] for i in read[0] if i["caption"] == "shared caption"} == {sources.caption_key("shared caption")}
    assert all(i["data"] == i["caption"].encode() and not i["error"] for s in read.values() for i in s)


def test_a_manifest_changed_under_a_run_fails_its_read(tmp_path):
    records = [tinymodel.record(f"images/{i:03d}.png", f"c{i:03d}") for i in range(6)]
    manifest = manifest_of(tmp_path, records)
    plan = sources.scan(manifest, kind="image", split="test", shard_size=4)
    manifest.write_text(manifest.read_text().replace('"c005"', '"c555"'))
    assert len(sources.read_shard(plan.spec, plan.shards[0])) == 4  # untouched
    with pytest.raises(ValueError, match="changed during the run .shard 1"):
        sources.read_shard(plan.spec, plan.shards[1])


def test_a_bad_manifest_stops_the_scan_naming_the_line(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_bytes(json.dumps(tinymodel.record("a.png", "a")).encode() + b"\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        sources.scan(manifest, kind="image", split=None)
    manifest.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match=r"is not UTF-8 text: line 1"):
        sources.scan(manifest, kind="caption", split=None)


@pytest.mark.slow
def test_the_datasource_reads_only_the_shards_asked_in_order(ray_local, tmp_path):
    records = [tinymodel.record(f"images/{i:03d}.png", f"c{i:03d}") for i in range(23)]
    odd = tinymodel.record("images/odd.png", "odd \udcff")  # text Arrow cannot hold travels as a stand-in
    manifest = manifest_of(tmp_path, [*records, odd])
    plan = sources.scan(manifest, kind="image", split="test", shard_size=5)
    assert len(plan.shards) == 5
    todo = [shard for shard in plan.shards if shard.number in (1, 3, 4)]
    ds = sources.dataset(plan.spec, todo, block_rows=2)
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    numbers = [int(n) for batch in ds.iter_batches(batch_size=None, batch_format="numpy") for n in batch["item"]]
    assert numbers == [*range(5, 10), *range(15, 24)]
    last = list(ds.iter_rows())[-1]
    assert last["item"] == 23 and last["error"].startswith("concept is not valid UTF-8 text")
    assert json.loads(last["letter"]) == {"path": str(tmp_path / "images/odd.png")}
    assert last["concept"] == "odd \\udcff"


class FakeClient:
    def __init__(self):
        self.upserts, self.flushes = [], 0

    def upsert(self, collection, rows):
        keys = [row["id"] for row in rows]
        assert len(keys) == len(set(keys)), "an upsert may not repeat a key"
        self.upserts.append(keys)

    def flush(self, collection):
        self.flushes += 1


def test_the_writer_keeps_only_the_shards_in_flight(tmp_path):
    from xmodal.indexer import state

    records = state.FileRecords(str(tmp_path / "x.db"), "c")
    progress = state.Progress(records, {}, 3)
    client = FakeClient()
    writer = _Writer(client, "c", progress, batch_rows=3, flush=True)
    assert not writer.add(0, "a", {"id": "a", "n": 1})
    assert writer.add(0, "a", {"id": "a", "n": 2})  # a duplicate within the shard
    writer.shard_done(0)
    assert writer.shard_keys == {} and progress.finished == set()  # not before its rows are written
    assert not writer.add(1, "a", {"id": "a", "n": 3})  # the same key in another shard: counted again
    assert not writer.add(1, "b", {"id": "b"}) and not writer.add(1, "c", {"id": "c"})
    assert client.upserts == [["a", "b", "c"]] and progress.finished == {0} and client.flushes == 1
    assert writer.pending == {} and writer.rows == 4 and list(writer.shard_keys) == [1]
    writer.shard_done(1)
    writer.write()
    assert progress.finished == {0, 1} and writer.shard_keys == {}
    assert json.loads(records.progress_file.read_text())["finished"] == [0, 1]


def test_image_rows_of_the_same_bytes_merge_into_one_that_keeps_every_path():
    def row(path: str, mtime: int, captions: list[str]) -> dict:
        return {"id": "k", "image": path, "captions": contract.json_list(captions), "concept": f"s{path}",
                "style": "s", "relative_path": path.lstrip("/"), "folder": "", "size": 3, "mtime": mtime, "width": 1,
                "height": 1, "paths": contract.json_list([path]), "global": [1.0, 0.0]}

    merged, added = contract.IMAGE_KIND.merge(row("/a.png", 1, ["first"]), row("/b.png", 2, ["second"]))
    assert (merged["paths"], added) == ({"values": ["/a.png", "/b.png"]}, 1)
    assert (merged["image"], merged["mtime"], merged["captions"], merged["concept"]) == (
        "/a.png", 1, {"values": ["first"]}, "s/a.png")
    again, added = contract.IMAGE_KIND.merge(merged, row("/a.png", 5, ["edited"]))  # the first path, read again
    assert (again["paths"], added) == ({"values": ["/a.png", "/b.png"]}, 0)
    assert (again["mtime"], again["captions"]) == (5, {"values": ["edited"]})
    # a row written before rows kept their lists as objects: read as the same list
    old = {**row("/a.png", 1, ["first"]), "captions": ["first"], "paths": ["/a.png"]}
    merged, added = contract.IMAGE_KIND.merge(old, row("/b.png", 2, ["second"]))
    assert (merged["paths"], merged["captions"], added) == ({"values": ["/a.png", "/b.png"]}, {"values": ["first"]}, 1)
    assert contract.CAPTION_KIND.merge is None  # a caption's later row replaces the earlier
