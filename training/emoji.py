"""Fetch the emoji corpus from npm, render it to 64x64 PNGs and write the manifest.

Three styles of the same ~1,950 base concepts, joined on the emojibase hexcode:
Google and Twitter (PNG, train) and OpenMoji (SVG rendered here, test). Captions come
from emojibase: the CLDR label, then "label: tag, tag, ...".
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from xmodal.files import SkipLog, write_atomic
from xmodal.manifest import ManifestRow, write_manifest
from xmodal.svg import SVGError, render_svg

NPM_CACHE_ENV = "XMODAL_NPM_CACHE"
IMAGE_SIZE = 64
NPM_PACK_TIMEOUT_S = 600
STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_name(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


@dataclass(frozen=True)
class StyleSource:
    style: str
    package: NpmPackage
    directory: str  # the folder inside the tarball holding one file per emoji
    suffix: str  # ".png" is copied as is, ".svg" is rendered
    split: str


EMOJIBASE = NpmPackage("emojibase-data", "17.0.0")
EMOJIBASE_DATA = "package/en/data.json"
# meta/groups.json maps the numeric group/subgroup ids to keys. en/messages.json cannot be
# indexed by position: its subgroup list keeps a stale "food-marine" entry that shares
# order 46 with "food-sweet", which shifts every later subgroup by one.
EMOJIBASE_GROUPS = "package/meta/groups.json"

STYLE_SOURCES: tuple[StyleSource, ...] = (
    StyleSource("google", NpmPackage("emoji-datasource-google", "16.0.0"), "package/img/google/64/", ".png", "train"),
    StyleSource("twitter", NpmPackage("emoji-datasource-twitter", "16.0.0"), "package/img/twitter/64/", ".png", "train"),
    StyleSource("openmoji", NpmPackage("openmoji", "17.0.0"), "package/color/svg/", ".svg", "test"),
)
STYLES = tuple(source.style for source in STYLE_SOURCES)

HEX_SEQUENCE = re.compile(r"[0-9a-fA-F]{1,6}(-[0-9a-fA-F]{1,6})*")


class DataFetchError(RuntimeError):
    """Fetching or unpacking a corpus failed; the message names what and why."""


@dataclass(frozen=True)
class Concept:
    key: str
    label: str
    tags: tuple[str, ...]
    group: str | None
    subgroup: str | None

    @property
    def captions(self) -> list[str]:
        return build_captions(self.label, self.tags, self.group, self.subgroup)


def concept_key(hexcode: str) -> str:
    """The join key across styles: lower-case hexcode with every ``fe0f`` (emoji presentation selector) removed."""
    return "-".join(part for part in hexcode.strip().lower().split("-") if part and part != "fe0f")


def build_captions(label: str, tags: Sequence[str], group: str | None = None, subgroup: str | None = None) -> list[str]:
    """``[label, "label: tag1, tag2, ...", "a label emoji, from the subgroup subgroup of group"]``.

    The second only when there are tags, the third only with a group. The third is there for
    sentence encoders (MiniLM): users type sentences, so one caption reads like one, built
    from nothing but the label and emojibase's own group and subgroup keys.
    """
    label = label.strip()
    tags = [tag.strip() for tag in tags if tag and tag.strip()]
    captions = [label, f"{label}: {', '.join(tags)}"] if tags else [label]
    if group:
        sentence = f"{indefinite_article(label)} {label} emoji, from "
        if subgroup:
            sentence += f"the {subgroup.replace('-', ' ')} subgroup of "
        captions.append(sentence + group_words(group))
    return captions


def group_words(key: str) -> str:
    """An emojibase group key as its title reads: ``smileys-emotion`` → "smileys and emotion"."""
    return " and ".join(key.split("-"))


def indefinite_article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


# --- npm -------------------------------------------------------------------------------


def npm_cache_dir(data_dir: Path) -> Path:
    override = os.environ.get(NPM_CACHE_ENV)
    return Path(override) if override else Path(data_dir) / "npm"


def npm_pack(package: NpmPackage, cache_dir: Path) -> Path:
    """The package's tarball in ``cache_dir``, fetched with ``npm pack`` unless already there."""
    tarball = cache_dir / package.tarball_name
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise DataFetchError("npm is required to fetch the emoji corpus; install Node.js/npm")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # pack into a private folder, then rename: an interrupted or concurrent fetch never leaves a half tarball under the cached name
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=cache_dir) as scratch:
        try:
            result = subprocess.run(
                [npm, "pack", package.spec],
                cwd=scratch, capture_output=True, text=True, timeout=NPM_PACK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise DataFetchError(f"npm pack {package.spec} did not finish within {NPM_PACK_TIMEOUT_S} s") from None
        if result.returncode != 0:
            raise DataFetchError(
                f"npm pack {package.spec} failed (exit {result.returncode}): "
                f"{result.stderr.strip()[-STDERR_TAIL_CHARS:]}"
            )
        packed = sorted(Path(scratch).glob("*.tgz"))
        if len(packed) != 1:
            raise DataFetchError(f"npm pack {package.spec} succeeded but left {len(packed)} .tgz files in {scratch}")
        os.replace(packed[0], tarball)
    return tarball


# --- tarballs (streamed: the Google one is 74 MB, mostly sprite sheets we never unpack) --


def iter_tar_files(tarball: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of each regular file whose name ``wanted`` accepts, in archive order."""
    try:
        with tarfile.open(tarball, mode="r|gz") as archive:
            for member in archive:
                if member.isfile() and wanted(member.name):
                    data = archive.extractfile(member)
                    assert data is not None  # regular files always have data
                    yield member.name, data.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataFetchError(f"{tarball} is not a readable npm tarball ({exc}); delete it and run again") from None


def list_tar_files(tarball: Path) -> list[str]:
    try:
        with tarfile.open(tarball, mode="r|gz") as archive:
            return [member.name for member in archive if member.isfile()]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataFetchError(f"{tarball} is not a readable npm tarball ({exc}); delete it and run again") from None


def read_tar_files(tarball: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The named files' bytes; a missing one is a ``DataFetchError``."""
    found = dict(iter_tar_files(tarball, lambda name: name in names))
    missing = [name for name in names if name not in found]
    if missing:
        raise DataFetchError(f"{tarball.name} lacks expected file(s): {', '.join(missing)}")
    return found


# --- emojibase ---------------------------------------------------------------------------


def load_concepts(emojibase_tarball: Path) -> list[Concept]:
    """The base concepts (top-level entries, not skin-tone variants) that have a label, in emojibase order."""
    files = read_tar_files(emojibase_tarball, [EMOJIBASE_DATA, EMOJIBASE_GROUPS])
    return parse_concepts(files, emojibase_tarball.name)


def parse_concepts(files: dict[str, bytes], source: str) -> list[Concept]:
    """The concepts from emojibase's data and groups files (``files`` as ``read_tar_files`` returns them)."""
    try:
        entries = json.loads(files[EMOJIBASE_DATA])
        groups = json.loads(files[EMOJIBASE_GROUPS])
        group_keys: dict[str, str] = groups["groups"]
        subgroup_keys: dict[str, str] = groups["subgroups"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataFetchError(f"{source}: unexpected emojibase layout ({exc!r})") from None
    return concepts_from_emojibase(entries, group_keys, subgroup_keys)


def concepts_from_emojibase(
    entries: list[dict], group_keys: dict[str, str], subgroup_keys: dict[str, str]
) -> list[Concept]:
    concepts: list[Concept] = []
    seen: set[str] = set()
    for entry in entries:
        label = (entry.get("label") or "").strip()
        key = concept_key(entry.get("hexcode") or "")
        if not label or not key or key in seen:
            continue
        seen.add(key)
        group, subgroup = entry.get("group"), entry.get("subgroup")
        concepts.append(Concept(
            key=key,
            label=label,
            tags=tuple(entry.get("tags") or ()),
            group=group_keys.get(str(group)) if group is not None else None,
            subgroup=subgroup_keys.get(str(subgroup)) if subgroup is not None else None,
        ))
    return concepts


# --- styles ------------------------------------------------------------------------------


def style_files(member_names: Sequence[str], source: StyleSource) -> dict[str, str]:
    """concept key → tarball member holding that concept's image in this style."""
    files: dict[str, str] = {}
    for name in member_names:
        if not (name.startswith(source.directory) and name.endswith(source.suffix)):
            continue
        stem = name[len(source.directory):-len(source.suffix)]
        # a strict hex pattern also keeps '/', '..' and odd names out of the paths we write
        if HEX_SEQUENCE.fullmatch(stem):
            files[concept_key(stem)] = name
    if not files:
        raise DataFetchError(
            f"{source.package.spec} has no files matching {source.directory}<hex>{source.suffix}"
        )
    return files


def choose_concepts(concepts: Sequence[Concept], files: dict[str, dict[str, str]], limit: int | None) -> list[Concept]:
    """All concepts, or with ``limit`` the first ``limit`` (emojibase order) present in every style."""
    if limit is None:
        return list(concepts)
    in_every_style = [c for c in concepts if all(c.key in style_map for style_map in files.values())]
    return in_every_style[:limit]


def render_svg_or_skip(svg: bytes, source: str, png_path: Path, skip_log: SkipLog, size: int = IMAGE_SIZE) -> bool:
    """Render ``svg`` to ``png_path``; on failure record ``source`` and the reason in ``skip_log`` and return False."""
    try:
        png = render_svg(svg, size)
    except SVGError as exc:
        skip_log.record(source, str(exc))
        return False
    write_atomic(png_path, png)
    return True


def materialise_style(
    tarball: Path,
    source: StyleSource,
    members: dict[str, str],
    images_dir: Path,
    *,
    force: bool,
    skip_log: SkipLog,
    progress: bool,
) -> set[str]:
    """Write ``images_dir/<concept>.png`` for each concept in ``members``; the concepts that have an image."""
    images_dir.mkdir(parents=True, exist_ok=True)
    done = set() if force else {c for c in members if (images_dir / f"{c}.png").is_file()}
    todo = {member: concept for concept, member in members.items() if concept not in done}
    with tqdm(total=len(members), initial=len(done), desc=f"emoji {source.style}", unit="img",
              disable=not progress, file=sys.stderr) as bar:
        if todo:
            for member, data in iter_tar_files(tarball, lambda name: name in todo):
                concept = todo[member]
                png_path = images_dir / f"{concept}.png"
                if source.suffix == ".svg":
                    if render_svg_or_skip(data, f"{source.package.spec}:{member}", png_path, skip_log):
                        done.add(concept)
                else:
                    write_atomic(png_path, data)
                    done.add(concept)
                bar.update(1)
                del todo[member]
                if not todo:
                    break  # no need to decompress the rest (sprite sheets)
    return done


# --- the whole fetch ---------------------------------------------------------------------


def fetch_emoji(
    data_dir: Path, *, limit: int | None = None, force: bool = False, progress: bool = True
) -> Path:
    """Fetch, render and describe the emoji corpus under ``data_dir/emoji``; returns the manifest's path.

    Tarballs are cached in ``data_dir/npm`` (or ``$XMODAL_NPM_CACHE``); images already on disk
    are kept unless ``force``. ``limit`` keeps the first ``limit`` concepts present in all styles.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    emoji_dir = data_dir / "emoji"
    cache = npm_cache_dir(data_dir)

    emojibase_tarball = npm_pack(EMOJIBASE, cache)
    style_tarballs = {source.style: npm_pack(source.package, cache) for source in STYLE_SOURCES}

    concepts = load_concepts(emojibase_tarball)
    files = {s.style: style_files(list_tar_files(style_tarballs[s.style]), s) for s in STYLE_SOURCES}
    chosen = choose_concepts(concepts, files, limit)

    skip_log = SkipLog(emoji_dir / "skipped.jsonl")
    with_image: dict[str, set[str]] = {}
    for source in STYLE_SOURCES:
        members = {c.key: files[source.style][c.key] for c in chosen if c.key in files[source.style]}
        with_image[source.style] = materialise_style(
            style_tarballs[source.style], source, members, emoji_dir / "images" / source.style,
            force=force, skip_log=skip_log, progress=progress,
        )

    rows = manifest_rows(chosen, with_image, emoji_dir / "images")
    manifest = write_manifest(emoji_dir / "manifest.jsonl", rows)
    per_style = ", ".join(f"{style} {len(with_image[style])}" for style in STYLES)
    print(
        f"emoji: {len(rows)} images ({per_style}) of {len(chosen)} concepts, "
        f"{skip_log.count} skipped, {time.perf_counter() - started:.1f} s -> {manifest}",
        flush=True,
    )
    return manifest


def manifest_rows(chosen: Sequence[Concept], with_image: dict[str, set[str]], images_dir: Path) -> list[ManifestRow]:
    rows: list[ManifestRow] = []
    for source in STYLE_SOURCES:
        for concept in chosen:
            if concept.key not in with_image[source.style]:
                continue
            rows.append(ManifestRow(
                id=f"{source.style}/{concept.key}",
                concept=concept.key,
                style=source.style,
                split=source.split,
                image=(images_dir / source.style / f"{concept.key}.png").absolute(),
                captions=concept.captions,
                group=concept.group,
                subgroup=concept.subgroup,
            ))
    return rows
