from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from xmodal.manifest import ManifestRow, read_manifest, write_manifest


def record(style: str, concept: str, split: str, **overrides: object) -> dict:
    row = {
        "id": f"{style}/{concept}",
        "concept": concept,
        "style": style,
        "split": split,
        "image": f"images/{style}/{concept}.png",
        "captions": ["grinning face", "grinning face: face, grin"],
        "group": "smileys-emotion",
        "subgroup": "face-smiling",
    }
    row.update(overrides)
    return row


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def three_styles(tmp_path: Path) -> Path:
    rows = [
        record("google", "1f600", "train"),
        record("twitter", "1f600", "train"),
        record("openmoji", "1f600", "test"),
        record("google", "1f603", "train"),
    ]
    return write_lines(tmp_path / "manifest.jsonl", [json.dumps(r) for r in rows])


def test_reads_rows_with_image_resolved_against_manifest_dir(three_styles: Path) -> None:
    rows = read_manifest(three_styles)
    assert [r.id for r in rows] == ["google/1f600", "twitter/1f600", "openmoji/1f600", "google/1f603"]
    first = rows[0]
    assert first.image == three_styles.resolve().parent / "images" / "google" / "1f600.png"
    assert first.image.is_absolute()
    assert first.captions[0] == "grinning face"
    assert (first.group, first.subgroup) == ("smileys-emotion", "face-smiling")


def test_filters_by_split_style_and_limit(three_styles: Path) -> None:
    assert [r.style for r in read_manifest(three_styles, split="test")] == ["openmoji"]
    assert [r.id for r in read_manifest(three_styles, styles={"google"})] == ["google/1f600", "google/1f603"]
    assert [r.id for r in read_manifest(three_styles, styles="twitter")] == ["twitter/1f600"]
    assert len(read_manifest(three_styles, split="train", limit=2)) == 2
    assert read_manifest(three_styles, split="validation") == []


def test_group_and_subgroup_may_be_null_or_absent(tmp_path: Path) -> None:
    absent = record("openmoji", "1f1e6", "test", captions=["regional indicator A"])
    del absent["group"], absent["subgroup"]
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(absent), "", json.dumps(record("google", "1f600", "train", group=None))])
    rows = read_manifest(path)
    assert [(r.group, r.subgroup) for r in rows] == [(None, None), (None, "face-smiling")]


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(record("google", "1f600", "train")), "", '{"id": "google/1f603",'])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: not valid JSON"):
        read_manifest(path)


def test_missing_key_is_named(tmp_path: Path) -> None:
    broken = record("google", "1f600", "train")
    del broken["style"]
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(broken)])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: missing key 'style'"):
        read_manifest(path)


@pytest.mark.parametrize("captions", [[], [""], "grinning face"])
def test_empty_or_malformed_captions_are_rejected(tmp_path: Path, captions: object) -> None:
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(record("google", "1f600", "train", captions=captions))])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: 'captions'"):
        read_manifest(path)


def test_a_line_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", ['["google/1f600"]'])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: expected a JSON object"):
        read_manifest(path)


def test_write_then_read_round_trips_with_relative_image_paths(tmp_path: Path) -> None:
    manifest = tmp_path / "emoji" / "manifest.jsonl"
    image = tmp_path / "emoji" / "images" / "google" / "1f600.png"
    row = ManifestRow(
        id="google/1f600", concept="1f600", style="google", split="train", image=image,
        captions=["grinning face", "grinning face: grin"], group="smileys-emotion", subgroup="face-smiling",
    )
    write_manifest(manifest, [row])

    on_disk = json.loads(manifest.read_text(encoding="utf-8"))
    assert on_disk["image"] == "images/google/1f600.png"
    assert list(on_disk) == ["id", "concept", "style", "split", "image", "captions", "group", "subgroup"]
    [back] = read_manifest(manifest)
    assert back == ManifestRow(**{**row.__dict__, "image": image.resolve()})
    assert [p.name for p in manifest.parent.iterdir()] == ["manifest.jsonl"]  # no temp file left behind
