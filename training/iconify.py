"""Fetch Iconify's icon sets from npm, render them to 64x64 PNGs and write a manifest.

Two kinds of rows come out of ``@iconify/json``:

* emoji sets in other styles than the training ones (``EMOJI_SETS``: noto-v1, fluent-emoji-flat,
  emojione, fxemoji, streamline-emojis), each icon joined to an emojibase concept by name, so the
  rows share the emoji corpus's concept keys and captions (see ``shared/DATA.md``: these raised
  held-out quality, while plain icons with name captions lowered it). Unmatched icons are dropped.
* with ``sets=["all"]`` (or named sets), every permissively licensed non-emoji set, captioned by
  icon name: for scale experiments.

Only ``collections.json`` and the chosen ``json/<set>.json`` members are read from the 104 MB
tarball, streamed. Images land in ``<data_dir>/iconify/images/<set>/<name>.png`` and are rendered
once; ``<data_dir>/iconify/stats.json`` records per-set counts and match rates.
"""
from __future__ import annotations

import json
import re
import sys
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from xmodal.files import SkipLog
from xmodal.training.emoji import (
    EMOJIBASE,
    EMOJIBASE_DATA,
    EMOJIBASE_GROUPS,
    Concept,
    DataFetchError,
    NpmPackage,
    concept_key,
    iter_tar_files,
    npm_cache_dir,
    npm_pack,
    parse_concepts,
    read_tar_files,
    render_svg_or_skip,
)
from xmodal.manifest import ManifestRow, write_manifest

ICONIFY = NpmPackage("@iconify/json", "2.2.535")
ICONIFY_COLLECTIONS = "package/collections.json"
ICONIFY_SET_DIR = "package/json/"

# Iconify's emoji sets in styles other than the emoji corpus's: more styles of the same concepts to train on, for
# held-out OpenMoji (the run that chose these five is not kept as a result).
EMOJI_SETS = ("noto-v1", "fluent-emoji-flat", "emojione", "fxemoji", "streamline-emojis")
EMOJI_CATEGORY = "Emoji"  # collections.json's category for emoji sets
SLOW_SETS = frozenset({"fluent-emoji"})  # gradient-heavy: renders far slower than the rest
HELD_OUT_SETS = ("openmoji",)  # the held-out test style's own Iconify copy
ALL = "all"

PERMISSIVE_LICENCES = frozenset({
    "MIT", "Apache-2.0", "CC0-1.0", "OFL-1.1", "ISC", "BSD-2-Clause", "BSD-3-Clause", "0BSD", "Unlicense",
})
CC_BY = re.compile(r"CC-BY(-SA)?-\d+(\.\d+)?")  # CC-BY-NC-*, CC-BY-ND-* do not match

# Extra names for emojibase concepts, tried after the CLDR label when joining emoji-set icons.
EMOJIBASE_SHORTCODES = tuple(
    f"package/en/shortcodes/{name}.json"
    for name in ("cldr", "emojibase", "github", "iamcal", "joypixels", "emojibase-legacy")
)
EMOJIBASE_UNICODE_NAMES = "package/meta/unicode-names.json"

SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # set prefixes and icon names become path components
CURRENT_COLOR = re.compile(r"currentcolor", re.IGNORECASE)
# Last-resort rewrites of icon names: numbered variants ("baby-2", streamline-emojis) and
# "flag-for-japan" (emojione) for "flag-japan" or, for "flag-for-black-flag", "black-flag".
NAME_REWRITES = (
    (re.compile(r"-\d+$"), ""),
    (re.compile(r"^flag-for-"), "flag-"),
    (re.compile(r"^flag-for-"), ""),
)
DEFAULT_SIZE = 16.0  # Iconify's default icon width/height
# alias keys that make another image of the parent icon
IMAGE_KEYS = frozenset({"left", "top", "width", "height", "rotate", "hFlip", "vFlip"})


# --- licences and set selection --------------------------------------------------------


def licence_allowed(spdx: str | None) -> bool:
    """Permissive licences only: MIT, Apache, CC-BY(-SA), CC0, OFL, ISC, BSD, Unlicense; never NC/ND/GPL/unknown."""
    if not spdx:
        return False
    spdx = spdx.strip()
    return spdx in PERMISSIVE_LICENCES or CC_BY.fullmatch(spdx) is not None


def set_licence(collections: Mapping[str, Any], prefix: str) -> str | None:
    info = collections.get(prefix)
    if not isinstance(info, dict):
        return None
    licence = info.get("license")
    return licence.get("spdx") if isinstance(licence, dict) else None


def is_emoji_set(collections: Mapping[str, Any], prefix: str) -> bool:
    info = collections.get(prefix)
    return prefix in EMOJI_SETS or (isinstance(info, dict) and info.get("category") == EMOJI_CATEGORY)


def select_sets(
    collections: Mapping[str, Any],
    available: Iterable[str],
    *,
    sets: Sequence[str] | None,
    emoji_sets: bool,
    exclude_sets: Iterable[str] = HELD_OUT_SETS,
) -> tuple[list[str], dict[str, str]]:
    """``(chosen set prefixes, {dropped prefix: reason})``.

    ``sets=None``: nothing beyond the emoji sets; ``["all"]``: every permissive non-emoji set;
    otherwise the named sets, each of which must exist, be permissive and not be excluded.
    ``emoji_sets`` adds ``EMOJI_SETS``. ``fluent-emoji`` and ``exclude_sets`` are never taken.
    """
    available = set(available)
    excluded = set(exclude_sets) | SLOW_SETS
    dropped: dict[str, str] = {}
    chosen: list[str] = []

    def take(prefix: str, *, named: bool) -> None:
        if prefix in chosen:
            return
        if prefix not in available:
            reason = "no such set in @iconify/json"
        elif prefix in SLOW_SETS:
            reason = "too slow to render"
        elif prefix in excluded:
            reason = "excluded (held-out style)"
        elif not licence_allowed(set_licence(collections, prefix)):
            reason = f"licence {set_licence(collections, prefix) or 'unknown'} is not permissive"
        else:
            chosen.append(prefix)
            return
        if named:
            raise ValueError(f"iconify set {prefix!r}: {reason}")
        dropped[prefix] = reason

    if emoji_sets:
        for prefix in EMOJI_SETS:
            take(prefix, named=False)
    if sets is not None:
        if list(sets) == [ALL]:
            for prefix in sorted(available):
                if not is_emoji_set(collections, prefix):
                    take(prefix, named=False)
        else:
            for prefix in sets:
                take(prefix, named=True)
    if not chosen:
        raise ValueError("no iconify sets selected (sets=None and emoji_sets=False, or all were dropped)")
    return chosen, dropped


# --- icons -------------------------------------------------------------------------------


@dataclass
class Icon:
    name: str
    body: str
    left: float
    top: float
    width: float
    height: float
    aliases: list[str] = field(default_factory=list)  # other names for the very same image


def icon_caption(name: str) -> str:
    """``"battery-outline"`` → ``"battery outline"``."""
    return re.sub(r"[-_\s]+", " ", name).strip()


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _transformed(body: str, box: list[float], rotate: int, h_flip: bool, v_flip: bool) -> tuple[str, list[float]]:
    """Iconify's rotate/hFlip/vFlip as an SVG group around the body (as @iconify/utils' iconToSVG does)."""
    left, top, width, height = box
    transforms: list[str] = []
    if h_flip:
        if v_flip:
            rotate += 2
        else:
            transforms.append(f"translate({width + left:g} {-top:g}) scale(-1 1)")
            left = top = 0
    elif v_flip:
        transforms.append(f"translate({-left:g} {height + top:g}) scale(1 -1)")
        left = top = 0
    rotate %= 4
    if rotate == 1:
        centre = height / 2 + top
        transforms.insert(0, f"rotate(90 {centre:g} {centre:g})")
    elif rotate == 2:
        transforms.insert(0, f"rotate(180 {width / 2 + left:g} {height / 2 + top:g})")
    elif rotate == 3:
        centre = width / 2 + left
        transforms.insert(0, f"rotate(-90 {centre:g} {centre:g})")
    if rotate % 2 == 1:
        left, top, width, height = top, left, height, width
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    return body, [left, top, width, height]


def resolve_icons(data: Mapping[str, Any]) -> list[Icon]:
    """The set's visible icons in file order. An alias that only renames an icon becomes one of its
    ``aliases``; an alias that flips, rotates or resizes it is an icon of its own."""
    icons = data.get("icons")
    if not isinstance(icons, dict):
        raise ValueError("no 'icons' object")
    aliases = data.get("aliases") if isinstance(data.get("aliases"), dict) else {}
    defaults = [_number(data.get("left"), 0.0), _number(data.get("top"), 0.0),
                _number(data.get("width"), DEFAULT_SIZE), _number(data.get("height"), DEFAULT_SIZE)]

    def chain(name: str) -> tuple[str, list[dict[str, Any]]] | None:
        """The icon an alias ends at and the entries from ``name`` to it (icon last); None if broken or cyclic."""
        entries: list[dict[str, Any]] = []
        seen: set[str] = set()
        while name not in icons:
            alias = aliases.get(name)
            if not isinstance(alias, dict) or name in seen or not isinstance(alias.get("parent"), str):
                return None
            seen.add(name)
            entries.append(alias)
            name = alias["parent"]
        entries.append(icons[name])
        return name, entries

    def build(name: str, entries: list[dict[str, Any]]) -> Icon | None:
        icon = entries[-1]
        if not isinstance(icon, dict) or not isinstance(icon.get("body"), str) or icon.get("hidden"):
            return None
        box = list(defaults)
        rotate, h_flip, v_flip = 0, False, False
        for entry in reversed(entries):  # the icon first, then each alias on top of it
            for index, key in enumerate(("left", "top", "width", "height")):
                box[index] = _number(entry.get(key), box[index])
            rotate += int(_number(entry.get("rotate"), 0))
            h_flip ^= bool(entry.get("hFlip"))
            v_flip ^= bool(entry.get("vFlip"))
        body, box = _transformed(icon["body"], box, rotate, h_flip, v_flip)
        if box[2] <= 0 or box[3] <= 0:
            return None
        return Icon(name, body, *box)

    resolved: dict[str, Icon] = {}
    for name in icons:
        icon = build(name, [icons[name]])
        if icon is not None:
            resolved[name] = icon
    for name in aliases:
        found = chain(name)
        if found is None or name in resolved:
            continue
        root, entries = found
        if any(entry.get("hidden") for entry in entries[:-1]):
            continue
        if any(key in IMAGE_KEYS for entry in entries[:-1] for key in entry):
            icon = build(name, entries)  # flipped, rotated or resized: another image
            if icon is not None:
                resolved[name] = icon
        elif root in resolved:
            resolved[root].aliases.append(name)
    return list(resolved.values())


def icon_svg(icon: Icon) -> bytes:
    """A standalone SVG document; ``currentColor`` (monochrome sets) becomes black."""
    body = CURRENT_COLOR.sub("#000000", icon.body)
    view_box = f"{icon.left:g} {icon.top:g} {icon.width:g} {icon.height:g}"
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{icon.width:g}" height="{icon.height:g}" viewBox="{view_box}">{body}</svg>'
    ).encode("utf-8")


def icon_categories(data: Mapping[str, Any]) -> dict[str, str]:
    """icon name → its (first) category in the set."""
    found: dict[str, str] = {}
    categories = data.get("categories")
    if isinstance(categories, dict):
        for category, names in categories.items():
            for name in names if isinstance(names, list) else ():
                if isinstance(name, str):
                    found.setdefault(name, category)
    return found


# --- joining emoji-set icons to emojibase ----------------------------------------------------


def slug(text: str) -> str:
    """emojibase label → Iconify-style name: accents folded, lower-cased, non-alphanumerics → "-"."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")


def _slugs(text: str) -> set[str]:
    """The slug, and the slug without apostrophes ("man’s shoe" → "man-s-shoe" and "mans-shoe")."""
    return {s for s in (slug(text), slug(re.sub(r"['’]", "", text))) if s}


# (how the name was matched, rank): a lower rank wins when two icons of one set match one concept
MATCH_RANKS = {"chars": 0, "label": 1, "shortcode": 2, "unicode": 3}


class EmojiNames:
    """Name → emojibase concept key, by label slug first, then shortcodes, then Unicode names;
    each also without hyphens ("alarmclock") and, last, through ``NAME_REWRITES`` ("baby-1" → "baby")."""

    def __init__(self, concepts: Sequence[Concept], names: Mapping[str, Iterable[tuple[str, str]]]) -> None:
        """``names``: for each source after the label (e.g. "shortcode"), ``(concept key, name)`` pairs."""
        self.concepts = {c.key: c for c in concepts}
        sources: dict[str, list[tuple[str, str]]] = {"label": [(c.key, c.label) for c in concepts]}
        for source, pairs in names.items():
            sources.setdefault(source, []).extend(pairs)
        self.exact: list[tuple[str, dict[str, str]]] = []
        self.compact: list[tuple[str, dict[str, str]]] = []
        for source, pairs in sources.items():
            exact: dict[str, set[str]] = {}
            for key, name in pairs:
                if key in self.concepts:
                    for s in _slugs(name):
                        exact.setdefault(s, set()).add(key)
            compact: dict[str, set[str]] = {}
            for s, keys in exact.items():
                compact.setdefault(s.replace("-", ""), set()).update(keys)
            # a name shared by two concepts within one source says nothing: leave it out
            self.exact.append((source, {s: next(iter(k)) for s, k in exact.items() if len(k) == 1}))
            self.compact.append((source, {s: next(iter(k)) for s, k in compact.items() if len(k) == 1}))

    def match(self, names: Sequence[str], chars: Mapping[str, str] | None = None) -> tuple[str, str] | None:
        """``(concept key, how)`` for the first of ``names`` (an icon's name, then its aliases) that matches."""
        for name in names:
            key = (chars or {}).get(name)
            if key is not None and key in self.concepts:
                return key, "chars"
        for indexes, variant in ((self.exact, names), (self.compact, [n.replace("-", "") for n in names])):
            found = self._lookup(variant, indexes)
            if found is not None:
                return found
        rewritten = [r for n in names for pattern, repl in NAME_REWRITES if (r := pattern.sub(repl, n)) != n]
        return self._lookup(rewritten, self.exact)

    @staticmethod
    def _lookup(names: Iterable[str], indexes: Sequence[tuple[str, dict[str, str]]]) -> tuple[str, str] | None:
        for name in names:
            for source, index in indexes:
                key = index.get(name)
                if key is not None:
                    return key, source
        return None


def load_emoji_names(emojibase_tarball: Path) -> EmojiNames:
    """Concepts plus the extra names (shortcodes, Unicode names) that emojibase-data ships."""
    files = read_tar_files(
        emojibase_tarball,
        [EMOJIBASE_DATA, EMOJIBASE_GROUPS, *EMOJIBASE_SHORTCODES, EMOJIBASE_UNICODE_NAMES],
    )
    concepts = parse_concepts(files, emojibase_tarball.name)
    try:
        shortcodes: list[tuple[str, str]] = []
        for member in EMOJIBASE_SHORTCODES:
            for hexcode, codes in json.loads(files[member]).items():
                for code in [codes] if isinstance(codes, str) else codes:
                    shortcodes.append((concept_key(hexcode), code))
        unicode_names = [(concept_key(h), n) for h, n in json.loads(files[EMOJIBASE_UNICODE_NAMES]).items()]
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise DataFetchError(f"{emojibase_tarball.name}: unexpected emojibase shortcode layout ({exc!r})") from None
    return EmojiNames(concepts, {"shortcode": shortcodes, "unicode": unicode_names})


def set_chars(data: Mapping[str, Any]) -> dict[str, str]:
    """icon name → concept key from the set's own ``chars`` (code point → name), where it has one."""
    chars = data.get("chars")
    if not isinstance(chars, dict):
        return {}
    return {name: concept_key(hexcode) for hexcode, name in chars.items() if isinstance(name, str)}


@dataclass
class SetResult:
    prefix: str
    licence: str | None
    emoji: bool
    icons: int = 0  # visible icons (incl. flipped/rotated aliases) in the set
    matched: int = 0  # emoji sets: icons that matched a concept
    rows: list[ManifestRow] = field(default_factory=list)
    rendered: int = 0
    cached: int = 0
    skipped: int = 0
    how: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "licence": self.licence, "emoji": self.emoji, "icons": self.icons, "rows": len(self.rows),
            "rendered": self.rendered, "cached": self.cached, "skipped": self.skipped,
        }
        if self.emoji:
            stats.update(matched=self.matched, match_rate=round(self.matched / max(self.icons, 1), 4),
                         matched_by=self.how, unmatched_examples=self.unmatched[:50])
        return stats


def emoji_set_rows(
    prefix: str, icons: Sequence[Icon], chars: Mapping[str, str], names: EmojiNames, result: SetResult
) -> list[tuple[Icon, ManifestRow]]:
    """One (icon, row) per matched concept, the best-matched icon winning; unmatched icons are dropped."""
    best: dict[str, tuple[int, Icon, str]] = {}
    for icon in icons:
        found = names.match([icon.name, *icon.aliases], chars)
        if found is None:
            result.unmatched.append(icon.name)
            continue
        key, how = found
        result.matched += 1
        result.how[how] = result.how.get(how, 0) + 1
        rank = MATCH_RANKS.get(how, len(MATCH_RANKS))
        if key not in best or rank < best[key][0]:
            best[key] = (rank, icon, how)
    pairs: list[tuple[Icon, ManifestRow]] = []
    for key, (_, icon, _) in best.items():
        concept = names.concepts[key]
        pairs.append((icon, ManifestRow(
            id=f"{prefix}/{key}", concept=key, style=prefix, split="train", image=Path(),
            captions=concept.captions, group=concept.group, subgroup=concept.subgroup,
        )))
    return pairs


def icon_set_rows(prefix: str, icons: Sequence[Icon], categories: Mapping[str, str]) -> list[tuple[Icon, ManifestRow]]:
    pairs: list[tuple[Icon, ManifestRow]] = []
    for icon in icons:
        captions = list(dict.fromkeys(c for c in (icon_caption(n) for n in [icon.name, *icon.aliases]) if c))
        if not captions:
            continue
        pairs.append((icon, ManifestRow(
            id=f"{prefix}/{icon.name}", concept=f"iconify:{prefix}:{icon.name}", style=prefix, split="train",
            image=Path(), captions=captions, group=categories.get(icon.name), subgroup=None,
        )))
    return pairs


# --- the whole fetch ---------------------------------------------------------------------


def read_collections(tarball: Path) -> dict[str, Any]:
    """``collections.json``: each set's licence, category and size. Streamed; stops once it is read.

    Its keys are the sets considered: a ``json/<set>.json`` it does not describe has no known licence.
    """
    for _, data in iter_tar_files(tarball, lambda name: name == ICONIFY_COLLECTIONS):
        try:
            collections = json.loads(data)
        except json.JSONDecodeError as exc:
            raise DataFetchError(f"{tarball.name}:{ICONIFY_COLLECTIONS} is not valid JSON ({exc})") from None
        if not isinstance(collections, dict):
            raise DataFetchError(f"{tarball.name}:{ICONIFY_COLLECTIONS}: expected a JSON object")
        return {prefix: info for prefix, info in collections.items() if SAFE_NAME.fullmatch(prefix)}
    raise DataFetchError(f"{tarball.name} lacks expected file: {ICONIFY_COLLECTIONS}")


def fetch_iconify(
    data_dir: Path,
    *,
    sets: Sequence[str] | None = None,
    emoji_sets: bool = True,
    exclude_sets: Iterable[str] = HELD_OUT_SETS,
    max_icons_per_set: int | None = None,
    limit_sets: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Render the chosen Iconify sets under ``data_dir/iconify`` and write its manifest; returns the manifest's path.

    Default: the five emoji sets of ``EMOJI_SETS`` joined to emojibase (rows share the emoji corpus's
    concepts). ``sets=["all"]`` adds every permissive non-emoji set (icon names as captions), named
    sets add those. ``max_icons_per_set`` keeps the first rows of each set, ``limit_sets`` the first
    sets. Tarballs are cached in ``data_dir/npm`` (or ``$XMODAL_NPM_CACHE``); images on disk are kept
    unless ``force``.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    out_dir = data_dir / "iconify"
    images_dir = out_dir / "images"
    cache = npm_cache_dir(data_dir)

    tarball = npm_pack(ICONIFY, cache)
    collections = read_collections(tarball)
    chosen, dropped = select_sets(collections, collections, sets=sets, emoji_sets=emoji_sets, exclude_sets=exclude_sets)
    if limit_sets is not None:
        chosen = chosen[:limit_sets]
    emoji_chosen = [p for p in chosen if is_emoji_set(collections, p)]
    names = load_emoji_names(npm_pack(EMOJIBASE, cache)) if emoji_chosen else None

    skip_log = SkipLog(out_dir / "skipped.jsonl")
    members = {f"{ICONIFY_SET_DIR}{p}.json": p for p in chosen}
    results: dict[str, SetResult] = {}

    def estimate(prefix: str) -> int:
        total = int(_number((collections.get(prefix) or {}).get("total"), 0))
        return min(total, max_icons_per_set) if max_icons_per_set is not None else total

    with tqdm(total=sum(estimate(p) for p in chosen), desc="iconify", unit="icon",
              disable=not progress, file=sys.stderr) as bar:
        for member, raw in iter_tar_files(tarball, lambda n: n in members):
            prefix = members.pop(member)
            bar.set_postfix_str(prefix)
            result = results[prefix] = SetResult(prefix, set_licence(collections, prefix), prefix in emoji_chosen)
            try:
                data = json.loads(raw)
                icons = resolve_icons(data)
            except (json.JSONDecodeError, ValueError) as exc:
                raise DataFetchError(f"{tarball.name}:{member}: not an Iconify icon set ({exc})") from None
            del raw
            result.icons = len(icons)
            if result.emoji:
                assert names is not None
                pairs = emoji_set_rows(prefix, icons, set_chars(data), names, result)
            else:
                pairs = icon_set_rows(prefix, icons, icon_categories(data))
            if max_icons_per_set is not None:
                pairs = pairs[:max_icons_per_set]
            bar.total += len(pairs) - estimate(prefix)
            bar.refresh()
            set_dir = images_dir / prefix
            set_dir.mkdir(parents=True, exist_ok=True)
            for icon, row in pairs:
                bar.update(1)
                if not SAFE_NAME.fullmatch(icon.name):
                    skip_log.record(f"{ICONIFY.spec}:{member}#{icon.name}", "icon name is not a safe file name")
                    result.skipped += 1
                    continue
                png = set_dir / f"{icon.name}.png"
                if png.is_file() and not force:
                    result.cached += 1
                elif render_svg_or_skip(icon_svg(icon), f"{ICONIFY.spec}:{member}#{icon.name}", png, skip_log):
                    result.rendered += 1
                else:
                    result.skipped += 1
                    continue
                row.image = png.absolute()
                result.rows.append(row)
            if not members:
                break  # the rest of the tarball holds nothing we want
    if members:
        raise DataFetchError(f"{tarball.name} lacks expected file(s): {', '.join(sorted(members))}")

    rows = [row for prefix in chosen for row in results[prefix].rows]
    manifest = write_manifest(out_dir / "manifest.jsonl", rows)
    elapsed = time.perf_counter() - started
    stats = {
        "package": ICONIFY.spec, "seconds": round(elapsed, 1), "rows": len(rows),
        "sets": {prefix: results[prefix].stats() for prefix in chosen}, "dropped_sets": dropped,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    matched = ", ".join(
        f"{p} {len(results[p].rows)} ({results[p].matched}/{results[p].icons} icons matched, "
        f"{results[p].matched / max(results[p].icons, 1):.0%})"
        for p in emoji_chosen
    )
    plain = [p for p in chosen if p not in emoji_chosen]
    plain_rows = sum(len(results[p].rows) for p in plain)
    print(
        f"iconify: {len(rows)} images from {len(chosen)} sets"
        + (f"; emoji sets: {matched}" if emoji_chosen else "")
        + (f"; {len(plain)} icon sets: {plain_rows} icons" if plain else "")
        + f"; {skip_log.count} skipped, {len(dropped)} sets dropped, {elapsed:.1f} s -> {manifest}",
        flush=True,
    )
    return manifest
