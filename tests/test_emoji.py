from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from xmodal.files import SkipLog
from xmodal.training.emoji import (
    NPM_CACHE_ENV,
    STYLE_SOURCES,
    DataFetchError,
    NpmPackage,
    build_captions,
    concept_key,
    concepts_from_emojibase,
    fetch_emoji,
    npm_pack,
    read_tar_files,
    render_svg_or_skip,
    style_files,
)
from xmodal.manifest import read_manifest

GOOD_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
    b'<circle cx="36" cy="36" r="30" fill="#FCEA2B"/></svg>'
)


# --- pure functions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hexcode", "key"),
    [
        ("1F600", "1f600"),
        ("0023-FE0F-20E3", "0023-20e3"),
        ("0023-fe0f-20e3", "0023-20e3"),
        ("2764-FE0F", "2764"),
        ("1F3F3-FE0F-200D-1F308", "1f3f3-200d-1f308"),
        ("1F636-200D-1F32B-FE0F", "1f636-200d-1f32b"),
    ],
)
def test_concept_key_lowercases_and_drops_fe0f(hexcode: str, key: str) -> None:
    assert concept_key(hexcode) == key


def test_captions_are_label_then_label_with_tags() -> None:
    assert build_captions("grinning face", ["face", "grin", "smile"]) == [
        "grinning face",
        "grinning face: face, grin, smile",
    ]
    assert build_captions("regional indicator A", []) == ["regional indicator A"]
    assert build_captions(" nerd face ", ["", "geek", " "]) == ["nerd face", "nerd face: geek"]


def test_a_sentence_caption_from_the_group_and_subgroup() -> None:
    assert build_captions("grinning face", ["grin"], "smileys-emotion", "face-smiling") == [
        "grinning face",
        "grinning face: grin",
        "a grinning face emoji, from the face smiling subgroup of smileys and emotion",
    ]
    assert build_captions("orange", [], "food-drink", None) == ["orange", "an orange emoji, from food and drink"]
    assert build_captions("flags", [], None, "flag") == ["flags"]


def test_concepts_keep_labelled_top_level_entries_and_map_group_ids() -> None:
    entries = [
        {"label": "regional indicator A", "hexcode": "1F1E6"},  # no group, no tags: kept for its label
        {"label": "shortcake", "hexcode": "1F370", "tags": ["cake"], "group": 4, "subgroup": 46,
         "skins": [{"label": "never a concept", "hexcode": "1F370-1F3FB"}]},
        {"label": "", "hexcode": "1F000"},  # no label: dropped
        {"label": "red heart", "hexcode": "2764-FE0F", "tags": ["heart"], "group": 8, "subgroup": 80},
    ]
    concepts = concepts_from_emojibase(entries, {"4": "food-drink", "8": "symbols"}, {"46": "food-sweet", "80": "heart"})
    assert [(c.key, c.group, c.subgroup) for c in concepts] == [
        ("1f1e6", None, None),
        ("1f370", "food-drink", "food-sweet"),
        ("2764", "symbols", "heart"),
    ]
    assert concepts[1].captions == [
        "shortcake", "shortcake: cake", "a shortcake emoji, from the food sweet subgroup of food and drink"]


def test_style_files_normalise_names_and_ignore_everything_else() -> None:
    openmoji = next(s for s in STYLE_SOURCES if s.style == "openmoji")
    names = [
        "package/color/svg/0023-FE0F-20E3.svg",
        "package/color/svg/1F600.svg",
        "package/color/svg/../../../etc/evil.svg",
        "package/color/svg/nested/1F601.svg",
        "package/color/svg/E000.png",
        "package/black/svg/1F602.svg",
    ]
    assert style_files(names, openmoji) == {
        "0023-20e3": "package/color/svg/0023-FE0F-20E3.svg",
        "1f600": "package/color/svg/1F600.svg",
    }
    with pytest.raises(DataFetchError, match=r"openmoji@17\.0\.0 has no files matching package/color/svg/"):
        style_files(["package/README.md"], openmoji)


# --- rendering ---------------------------------------------------------------------------


def test_svg_renders_to_64px_rgba(tmp_path: Path) -> None:
    png = tmp_path / "good.png"
    assert render_svg_or_skip(GOOD_SVG, "good.svg", png, SkipLog(tmp_path / "skipped.jsonl"))
    with Image.open(png) as image:
        assert (image.size, image.mode) == ((64, 64), "RGBA")
        assert image.getpixel((0, 0))[3] == 0  # transparent corner: alpha kept
        assert image.getpixel((32, 32))[3] == 255


def test_corrupt_svg_is_skipped_and_recorded(tmp_path: Path) -> None:
    bad_svg = tmp_path / "1F600.svg"
    bad_svg.write_bytes(b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle r=')
    png = tmp_path / "1f600.png"
    skip_log = SkipLog(tmp_path / "skipped.jsonl")

    assert not render_svg_or_skip(bad_svg.read_bytes(), str(bad_svg), png, skip_log)

    assert not png.exists()
    assert skip_log.count == 1
    [line] = (tmp_path / "skipped.jsonl").read_text(encoding="utf-8").splitlines()
    skipped = json.loads(line)
    assert skipped["path"] == str(bad_svg)
    assert skipped["reason"]


# --- failures that must say what went wrong ----------------------------------------------


def test_missing_npm_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_npm = tmp_path / "bin"
    no_npm.mkdir()
    monkeypatch.setenv("PATH", str(no_npm))
    monkeypatch.setenv(NPM_CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(DataFetchError, match="npm is required to fetch the emoji corpus; install Node.js/npm"):
        fetch_emoji(tmp_path / "data", progress=False)


def test_failing_npm_pack_reports_its_stderr(tmp_path: Path) -> None:
    with pytest.raises(DataFetchError, match=r"npm pack emojibase-data@999\.0\.0 failed \(exit \d+\): .*\S") as caught:
        npm_pack(NpmPackage("emojibase-data", "999.0.0"), tmp_path)
    npm_says = str(caught.value).split("failed", 1)[1]
    assert "ETARGET" in npm_says or "No matching version" in npm_says
    assert list(tmp_path.glob("*.tgz")) == []


def test_package_missing_an_expected_file_is_named(tmp_path: Path) -> None:
    tarball = tmp_path / "emojibase-data-17.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        readme = b"no data here"
        info = tarfile.TarInfo("package/README.md")
        info.size = len(readme)
        archive.addfile(info, io.BytesIO(readme))
    with pytest.raises(DataFetchError, match="emojibase-data-17.0.0.tgz lacks expected file.*package/en/data.json"):
        read_tar_files(tarball, ["package/en/data.json"])


def test_corrupt_tarball_is_named(tmp_path: Path) -> None:
    tarball = tmp_path / "openmoji-17.0.0.tgz"
    tarball.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataFetchError, match="openmoji-17.0.0.tgz is not a readable npm tarball"):
        read_tar_files(tarball, ["package/package.json"])


# --- the real fetch (npm registry), a 10-concept slice ------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, npm_cache: Path) -> Path:
    # the tarballs come from the session's npm cache: npm pack runs when that cache is cold
    return fetch_emoji(tmp_path_factory.mktemp("data"), limit=10, progress=False)


@pytest.mark.slow
def test_fetch_writes_ten_concepts_in_three_styles(small_corpus: Path) -> None:
    rows = read_manifest(small_corpus)
    assert len(rows) == 30
    concepts = {r.concept for r in rows}
    assert len(concepts) == 10
    for style in ("google", "twitter", "openmoji"):
        assert {r.concept for r in rows if r.style == style} == concepts
    assert {r.split for r in rows if r.style == "openmoji"} == {"test"}
    assert {r.split for r in rows if r.style != "openmoji"} == {"train"}
    for row in rows:
        assert row.id == f"{row.style}/{row.concept}"
        assert row.captions[0].strip()
        assert row.image == small_corpus.parent / "images" / row.style / f"{row.concept}.png"
        with Image.open(row.image) as image:
            assert image.size == (64, 64)
    grinning = next(r for r in rows if r.id == "openmoji/1f600")
    assert grinning.captions[0] == "grinning face"
    assert grinning.captions[1].startswith("grinning face: ")
    assert (grinning.group, grinning.subgroup) == ("smileys-emotion", "face-smiling")
    assert (small_corpus.parent / "skipped.jsonl").read_text(encoding="utf-8") == ""


@pytest.mark.slow
def test_fetch_again_keeps_rendered_images(small_corpus: Path) -> None:
    images = sorted((small_corpus.parent / "images").rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in images]
    before = small_corpus.read_text(encoding="utf-8")

    again = fetch_emoji(small_corpus.parent.parent, limit=10, progress=False)

    assert again == small_corpus
    assert again.read_text(encoding="utf-8") == before
    assert [p.stat().st_mtime_ns for p in images] == mtimes
