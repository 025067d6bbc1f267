"""Read and write the image–text manifest: one JSON object per image (see docs/architecture.md)."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal import settings
from xmodal.files import ImageRoots, write_atomic

REQUIRED_TEXT_KEYS = ("id", "concept", "style", "split", "image")


@dataclass
class ManifestRow:
    id: str
    concept: str
    style: str
    split: str
    image: Path  # absolute once read; when writing, a relative path means relative to the manifest
    captions: list[str]
    group: str | None = None
    subgroup: str | None = None

    def to_record(self, manifest_dir: Path) -> dict[str, Any]:
        return {
            "id": self.id,
            "concept": self.concept,
            "style": self.style,
            "split": self.split,
            "image": image_relative_to(self.image, manifest_dir),
            "captions": list(self.captions),
            "group": self.group,
            "subgroup": self.subgroup,
        }


def image_relative_to(image: Path, manifest_dir: Path) -> str:
    if not image.is_absolute():
        return image.as_posix()
    # resolve both sides so a symlinked data dir cannot turn the path into ../../ detours
    return Path(os.path.relpath(image.resolve(), manifest_dir.resolve())).as_posix()


def read_manifest(
    path: str | os.PathLike[str],
    *,
    split: str | None = None,
    styles: Collection[str] | str | None = None,
    limit: int | None = None,
    allowed_image_roots: Iterable[str | os.PathLike[str]] = (),
) -> list[ManifestRow]:
    """The rows of a JSONL manifest, in file order, filtered by split and style, at most ``limit``.

    A malformed line raises ``ValueError("<file>:<line>: <what is wrong>")``, and so does a
    line whose image lies outside the manifest's directory (``../``, an absolute path, a
    symlink leading out) and outside every directory of `allowed_image_roots` and
    ``$XMODAL_ALLOWED_IMAGE_ROOTS`` (``settings.allowed_image_roots``).
    """
    path = Path(path)
    if isinstance(styles, str):
        styles = {styles}
    manifest_dir = path.resolve().parent
    roots = manifest_roots(manifest_dir, settings.allowed_image_roots(allowed_image_roots))
    rows: list[ManifestRow] = []
    if limit is not None and limit <= 0:
        return rows
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = parse_row(line, manifest_dir, roots, where=f"{path}:{line_number}")
            if split is not None and row.split != split:
                continue
            if styles is not None and row.style not in styles:
                continue
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


# Beside a manifest that `xmodal data import` wrote into the data directory: the directories
# outside it that the import read the images from (the roots the user declared then).
IMPORTED_ROOTS_FILE = "image_roots.json"


def manifest_roots(manifest_dir: Path, allowed_image_roots: Iterable[str | os.PathLike[str]] = ()) -> ImageRoots:
    """Where a manifest's images may lie: its own directory, the directories allowed on purpose,
    and, for a manifest inside the data directory, those its import recorded. (A manifest
    from elsewhere cannot widen its own roots.)"""
    return ImageRoots([manifest_dir, *allowed_image_roots, *imported_roots(manifest_dir)])


def imported_roots(manifest_dir: Path) -> list[str]:
    record = manifest_dir / IMPORTED_ROOTS_FILE
    if not record.is_file() or not manifest_dir.resolve().is_relative_to(settings.data_dir().resolve()):
        return []
    return [str(root) for root in json.loads(record.read_text(encoding="utf-8"))["roots"]]


def record_imported_roots(manifest_dir: Path, roots: Sequence[str]) -> None:
    """Record the directories outside `manifest_dir` an import read images from (``imported_roots``)."""
    write_atomic(manifest_dir / IMPORTED_ROOTS_FILE, json.dumps({"roots": list(roots)}, indent=1).encode("utf-8"))


def json_object(line: str, *, where: str) -> dict[str, Any]:
    """One JSONL line as a dict, or a ValueError that names where it came from."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def parse_row(line: str, manifest_dir: Path, roots: ImageRoots, *, where: str) -> ManifestRow:
    """One manifest line as a row; ValueError naming `where` for a malformed one, or one whose
    image lies outside `roots` (``manifest_roots``)."""
    record = json_object(line, where=where)
    for key in REQUIRED_TEXT_KEYS:
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(record[key], str) or not record[key]:
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {record[key]!r}")
    captions = record.get("captions")
    if captions is None:
        raise ValueError(f"{where}: missing key 'captions'")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'captions' must be a list of strings, got {captions!r}")
    if not captions or not captions[0].strip():
        raise ValueError(f"{where}: 'captions' is empty")
    for key in ("group", "subgroup"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string or null, got {record[key]!r}")
    # normpath, not resolve(): keep the manifest's own layout rather than following symlinks per row
    image = Path(os.path.normpath(manifest_dir / record["image"]))
    refused = roots.refusal(image, where)
    if refused:
        raise ValueError(refused)
    return ManifestRow(
        id=record["id"],
        concept=record["concept"],
        style=record["style"],
        split=record["split"],
        image=image,
        captions=captions,
        group=record.get("group"),
        subgroup=record.get("subgroup"),
    )


def write_manifest(path: str | os.PathLike[str], rows: Iterable[ManifestRow]) -> Path:
    """Write ``rows`` as JSONL, image paths relative to the manifest's directory; atomic (tmp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest_dir = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=manifest_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row.to_record(manifest_dir), ensure_ascii=False) + "\n")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
