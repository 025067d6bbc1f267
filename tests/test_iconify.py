from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from xmodal.training.emoji import EMOJIBASE, Concept, load_concepts, npm_pack
from xmodal.training.iconify import (
    EMOJI_SETS,
    EmojiNames,
    Icon,
    fetch_iconify,
    icon_caption,
    icon_svg,
    licence_allowed,
    resolve_icons,
    select_sets,
    set_chars,
    slug,
)
from xmodal.manifest import read_manifest

# --- licences and set choice ---------------------------------------------------------------


@pytest.mark.parametrize("spdx", [
    "MIT", "Apache-2.0", "CC0-1.0", "OFL-1.1", "ISC", "BSD-3-Clause", "CC-BY-4.0", "CC-BY-3.0", "CC-BY-SA-4.0",
    "CC-BY-SA-3.0",
])
def test_permissive_licences_are_kept(spdx: str) -> None:
    assert licence_allowed(spdx)


@pytest.mark.parametrize("spdx", [
    "CC-BY-NC-4.0", "CC-BY-NC-SA-4.0", "CC-BY-ND-4.0", "GPL-3.0", "GPL-2.0-only", "GPL-3.0-or-later",
    "LGPL-3.0", "AGPL-3.0", "MPL-2.0", "", None, "Proprietary",
])
def test_other_licences_are_dropped(spdx: str | None) -> None:
    assert not licence_allowed(spdx)


COLLECTIONS = {
    "mdi": {"license": {"spdx": "Apache-2.0"}, "category": "Material", "total": 10},
    "gpl-set": {"license": {"spdx": "GPL-3.0"}, "category": "UI 24px", "total": 5},
    "nc-set": {"license": {"spdx": "CC-BY-NC-4.0"}, "total": 5},
    "openmoji": {"license": {"spdx": "CC-BY-SA-4.0"}, "category": "Emoji", "total": 5},
    "twemoji": {"license": {"spdx": "CC-BY-4.0"}, "category": "Emoji", "total": 5},
    "fluent-emoji": {"license": {"spdx": "MIT"}, "category": "Emoji", "total": 5},
    "lucide": {"license": {"spdx": "ISC"}, "category": "UI 24px", "total": 5},
    **{prefix: {"license": {"spdx": "MIT"}, "category": "Emoji", "total": 5} for prefix in EMOJI_SETS},
}
AVAILABLE = [*COLLECTIONS, "no-licence-known"]


def test_default_selection_is_the_five_emoji_sets() -> None:
    chosen, dropped = select_sets(COLLECTIONS, AVAILABLE, sets=None, emoji_sets=True)
    assert chosen == list(EMOJI_SETS)
    assert dropped == {}


def test_all_takes_every_permissive_non_emoji_set() -> None:
    chosen, dropped = select_sets(COLLECTIONS, AVAILABLE, sets=["all"], emoji_sets=False)
    assert chosen == ["lucide", "mdi"]
    assert set(dropped) == {"gpl-set", "nc-set", "no-licence-known"}
    assert "GPL-3.0" in dropped["gpl-set"] and "unknown" in dropped["no-licence-known"]
    chosen, _ = select_sets(COLLECTIONS, AVAILABLE, sets=["all"], emoji_sets=True)
    assert chosen == [*EMOJI_SETS, "lucide", "mdi"]  # other emoji sets (twemoji, openmoji) never as plain icons


def test_named_sets_must_be_usable() -> None:
    assert select_sets(COLLECTIONS, AVAILABLE, sets=["mdi"], emoji_sets=False)[0] == ["mdi"]
    with pytest.raises(ValueError, match="'gpl-set'.*GPL-3.0 is not permissive"):
        select_sets(COLLECTIONS, AVAILABLE, sets=["gpl-set"], emoji_sets=False)
    with pytest.raises(ValueError, match="'openmoji'.*excluded"):
        select_sets(COLLECTIONS, AVAILABLE, sets=["openmoji"], emoji_sets=False)
    with pytest.raises(ValueError, match="'fluent-emoji'.*too slow"):
        select_sets(COLLECTIONS, AVAILABLE, sets=["fluent-emoji"], emoji_sets=False, exclude_sets=())
    with pytest.raises(ValueError, match="'nope'.*no such set"):
        select_sets(COLLECTIONS, AVAILABLE, sets=["nope"], emoji_sets=False)
    chosen, dropped = select_sets(COLLECTIONS, AVAILABLE, sets=None, emoji_sets=True, exclude_sets=["noto-v1"])
    assert "noto-v1" not in chosen and "excluded" in dropped["noto-v1"]


# --- icons ---------------------------------------------------------------------------------


def test_icon_names_become_captions() -> None:
    assert icon_caption("battery-outline") == "battery outline"
    assert icon_caption("arrow_left--bold") == "arrow left bold"


def test_aliases_become_captions_or_icons_of_their_own() -> None:
    data = {
        "width": 24, "height": 24,
        "icons": {
            "account": {"body": '<path fill="currentColor" d="M0 0h24v24H0z"/>'},
            "arrow-left": {"body": "<path/>", "width": 20},
            "secret": {"body": "<path/>", "hidden": True},
        },
        "aliases": {
            "user": {"parent": "account"},
            "person": {"parent": "user"},  # alias of an alias
            "arrow-right": {"parent": "arrow-left", "hFlip": True},
            "arrow-up": {"parent": "arrow-left", "rotate": 1},
            "dangling": {"parent": "nothing"},
            "old-name": {"parent": "account", "hidden": True},
            "loop-a": {"parent": "loop-b"}, "loop-b": {"parent": "loop-a"},
        },
        "categories": {"People": ["account"]},
    }
    icons = {icon.name: icon for icon in resolve_icons(data)}
    assert set(icons) == {"account", "arrow-left", "arrow-right", "arrow-up"}
    assert icons["account"].aliases == ["user", "person"]
    assert (icons["arrow-left"].width, icons["arrow-left"].height) == (20, 24)
    assert "scale(-1 1)" in icons["arrow-right"].body
    assert "rotate(90" in icons["arrow-up"].body and (icons["arrow-up"].width, icons["arrow-up"].height) == (24, 20)
    svg = icon_svg(icons["account"]).decode()
    assert 'viewBox="0 0 24 24"' in svg and "currentColor" not in svg and 'fill="#000000"' in svg


# --- joining emoji-set icons to emojibase --------------------------------------------------


def concept(key: str, label: str) -> Concept:
    return Concept(key=key, label=label, tags=(), group=None, subgroup=None)


NAMES = EmojiNames(
    [concept("1f600", "grinning face"), concept("1f45e", "man’s shoe"), concept("23f0", "alarm clock"),
     concept("1f476", "baby"), concept("1f43b", "bear"), concept("1f947", "1st place medal"),
     concept("1f1ef-1f1f5", "flag: Japan"), concept("1f195", "NEW button"), concept("1f197", "OK button"),
     concept("1f44c", "OK hand")],
    {"shortcode": [("1f43b", "bear_face"), ("1f197", "ok"), ("1f44c", "ok")],  # "ok" is ambiguous: ignored
     "unicode": [("1f600", "GRINNING FACE")]},
)


def test_slugs_follow_iconify_names() -> None:
    assert slug("grinning face") == "grinning-face"
    assert slug("flag: Japan") == "flag-japan"
    assert slug("piñata") == "pinata"
    assert slug("Japanese “free of charge” button") == "japanese-free-of-charge-button"


@pytest.mark.parametrize(("names", "expected"), [
    (["grinning-face"], ("1f600", "label")),
    (["mans-shoe"], ("1f45e", "label")),  # apostrophe dropped
    (["man-s-shoe"], ("1f45e", "label")),
    (["flag-japan"], ("1f1ef-1f1f5", "label")),
    (["alarmclock"], ("23f0", "label")),  # fxemoji writes names without separators
    (["baby-2"], ("1f476", "label")),  # streamline numbers its variants
    (["bear-face"], ("1f43b", "shortcode")),
    (["flag-for-japan"], ("1f1ef-1f1f5", "label")),  # emojione's flags
    (["new-button"], ("1f195", "label")),
    (["zzz-unknown", "bear"], ("1f43b", "label")),  # an alias can match
    (["ok"], None),
    (["unknown-thing"], None),
])
def test_icon_names_match_emojibase_concepts(names: list[str], expected: tuple[str, str] | None) -> None:
    assert NAMES.match(names) == expected


def test_a_sets_own_code_points_win() -> None:
    chars = set_chars({"chars": {"1f600": "smiley", "1f44b-1f3fb": "waving-hand-light"}})
    assert NAMES.match(["smiley"], chars) == ("1f600", "chars")
    assert NAMES.match(["waving-hand-light"], chars) is None  # skin-tone variants are not base concepts


def test_icon_svg_keeps_offsets() -> None:
    icon = Icon("x", "<path/>", left=-2, top=1.5, width=28, height=24)
    assert 'viewBox="-2 1.5 28 24"' in icon_svg(icon).decode()


# --- the real fetch (npm registry): 20 icons per emoji set ------------------------------


@pytest.fixture(scope="module")
def small_iconify(tmp_path_factory: pytest.TempPathFactory, npm_cache: Path) -> Iterator[Path]:
    yield fetch_iconify(tmp_path_factory.mktemp("data"), max_icons_per_set=20, progress=False)


@pytest.mark.slow
def test_fetch_joins_twenty_icons_per_emoji_set_to_emojibase(small_iconify: Path, npm_cache: Path) -> None:
    rows = read_manifest(small_iconify)
    assert small_iconify.name == "manifest.jsonl" and small_iconify.parent.name == "iconify"
    assert [r.style for r in rows] == [s for s in EMOJI_SETS for _ in range(20)]
    assert len({r.id for r in rows}) == len(rows)
    concepts = {c.key: c for c in load_concepts(npm_pack(EMOJIBASE, npm_cache))}
    for row in rows:
        assert row.concept in concepts
        assert row.id == f"{row.style}/{row.concept}" and row.split == "train"
        assert row.captions == concepts[row.concept].captions
        assert row.group == concepts[row.concept].group
        assert row.image.parent == small_iconify.parent / "images" / row.style
        with Image.open(row.image) as image:
            assert (image.size, image.mode) == ((64, 64), "RGBA")
    medal = next(r for r in rows if r.id == "noto-v1/1f947")
    assert medal.captions[0] == "1st place medal" and medal.image.name == "1st-place-medal.png"
    stats = json.loads((small_iconify.parent / "stats.json").read_text(encoding="utf-8"))
    for prefix in EMOJI_SETS:
        assert stats["sets"][prefix]["rows"] == 20
        assert 0.4 < stats["sets"][prefix]["match_rate"] <= 1.0
    assert (small_iconify.parent / "skipped.jsonl").read_text(encoding="utf-8") == ""


@pytest.mark.slow
def test_fetch_again_keeps_images_and_plain_sets_use_icon_names(small_iconify: Path) -> None:
    data_dir = small_iconify.parent.parent
    images = sorted((small_iconify.parent / "images").rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in images]
    before = small_iconify.read_text(encoding="utf-8")

    manifest = fetch_iconify(data_dir, sets=["mdi"], emoji_sets=False, max_icons_per_set=5, progress=False)
    rows = read_manifest(manifest)
    assert [r.style for r in rows] == ["mdi"] * 5
    for row in rows:
        name = row.image.stem
        assert row.concept == f"iconify:mdi:{name}" and row.id == f"mdi/{name}"
        assert row.captions[0] == name.replace("-", " ")
        assert row.group  # mdi files every icon under a category

    assert fetch_iconify(data_dir, max_icons_per_set=20, progress=False).read_text(encoding="utf-8") == before
    assert [p.stat().st_mtime_ns for p in images] == mtimes
