"""The inputs `xmodal index` reads, as rows positioned in their files: the project's manifest and
the formats users bring (CSV/TSV and JSONL tables, the Karpathy split JSON, Parquet, WebDataset
tar shards; DATA.md, "Formats users bring").

Each format is parsed by the one reader that ``xmodal data import`` uses too
(``xmodal.readers.file_rows``); here its rows become the indexer's ``Row`` (image,
captions, concept, style, and what identifies the row for the shard digests), filtered by split
and style, and started again at any row's position, which is how a read task finds its shard:

| format | position of a row | a shard is |
| --- | --- | --- |
| manifest, csv, jsonl | byte offset of its line (and the line number) | a byte range of the file |
| parquet | (file, row index): the read starts at the row group that holds it | rows of one or more files, streamed in record batches of the columns needed |
| webdataset | (tar file, byte offset of the sample's first member header) | the samples of a member range of one or more tars (a gzip-compressed tar is decompressed up to the offset: plain ``.tar`` shards seek) |
| karpathy | index in its ``images`` list | its rows, parsed by the driver and carried by the read task |
| folder | its image file (``readers.walk_folder``'s sorted walk) | the image files it holds, which the read task stats and reads again |

An image path must lie under the input's corpus root (a manifest's directory, the image root or
the file's directory, the folder), symlinks followed, or under a directory the run allows
(``allowed_image_roots``): a manifest line naming another file stops the run, as a malformed one
does; a row of another format doing so is a dead letter. ``image_roots`` are those directories,
which the collection records for the web page.

The Karpathy JSON is one JSON document: the driver parses it whole (its size is fixed by the
dataset: Flickr30k's is ~31k images) and each read task carries its shard's rows. Every other
format is streamed: the driver's scan holds a row (a Parquet record batch) at a time, and never
reads the image bytes a Parquet file or a tar holds (their digests take the file's size and
modification time instead). A folder's walk keeps its image paths (one a file); each row's digest
takes its file's size and modification time, and its sidecars'.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal import readers, settings
from xmodal.manifest import manifest_roots, parse_row

MANIFEST = "manifest"
FOLDER = readers.FOLDER
FORMATS = (MANIFEST, *readers.FORMATS, FOLDER)
# Formats whose rows can hold the image's bytes (materialised beside the collection when indexed).
BYTE_FORMATS = ("parquet", "webdataset")
# Formats whose consecutive rows naming one image are merged into one row (a caption a line).
MERGED_FORMATS = ("csv", "jsonl")


class _DefaultSplit:
    def __repr__(self) -> str:
        return "<test for a manifest, every row for another format>"


# `split` when not given: a manifest's "test" split; every row of another format.
SPLIT_DEFAULT: Any = _DefaultSplit()


@dataclass(frozen=True)
class Source:
    """An input in one of the formats users bring (``xmodal index --input``).

    `path`: a file, or for Parquet and WebDataset a file, a directory of them or a glob, or a
    folder of images (walked recursively; captions from sidecars, optional). `format`:
    ``auto`` (from the name; a directory holding no Parquet or tar files is a ``folder``),
    ``csv``, ``jsonl``, ``karpathy``, ``parquet``, ``webdataset``, ``folder`` or ``manifest``. `image_root`: where relative image paths start (default: beside the file).
    `image_column`/`caption_column`: Parquet columns, when detection by name is not enough.
    `name`: the rows' style (default: the source's name, as ``xmodal data import`` names it).
    """

    path: str | os.PathLike[str]
    format: str = "auto"
    image_root: str | os.PathLike[str] | None = None
    image_column: str | None = None
    caption_column: str | None = None
    name: str | None = None


def source_of(manifest: str | os.PathLike[str] | None,
              input: Source | str | os.PathLike[str] | None) -> Source:  # noqa: A002 - the CLI's --input
    """The one input of a run: a manifest, or a source in another format (a path: format auto)."""
    if (manifest is None) == (input is None):
        raise ValueError("give either a manifest or input= (a source in another format), not both or neither")
    if manifest is not None:
        return Source(manifest, format=MANIFEST)
    return input if isinstance(input, Source) else Source(input)


@dataclass(frozen=True)
class InputSpec:
    """What a read task needs to find a shard's rows again (small: it travels with each task)."""

    kind: str
    path: str  # absolute (a glob: its absolute pattern)
    split: str | None
    styles: tuple[str, ...] | None
    format: str = MANIFEST
    image_root: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    style: str = ""  # the style of a raw format's rows
    # directories outside the corpus root whose images the input may name (absolute)
    allowed_image_roots: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What the progress file records of the input, besides its items (a manifest's as before)."""
        identity: dict[str, Any] = {"kind": self.kind, "manifest": self.path, "split": self.split,
                                    "styles": list(self.styles) if self.styles is not None else None}
        if self.format != MANIFEST:
            identity["input"] = {"format": self.format, "image_root": self.image_root,
                                 "image_column": self.image_column, "caption_column": self.caption_column,
                                 "style": self.style}
        if self.allowed_image_roots:  # absent otherwise: the progress of earlier runs still matches
            identity["allowed_image_roots"] = list(self.allowed_image_roots)
        return identity


def input_spec(source: Source, *, kind: str, split: Any = SPLIT_DEFAULT,
               styles: Collection[str] | str | None = None,
               allowed_image_roots: Sequence[str | os.PathLike[str]] = ()) -> InputSpec:
    """The spec of `source`: its format found, its paths absolute, its split and style settled;
    `allowed_image_roots`: directories outside its corpus root its rows may name images in
    (with ``$XMODAL_ALLOWED_IMAGE_ROOTS``, read here, in the driver: the read tasks take the spec's)."""
    path = Path(source.path).expanduser()
    fmt = readers.detect_format(path) if source.format == "auto" else source.format
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    if fmt == MANIFEST and (source.image_root, source.image_column, source.caption_column, source.name) != (None,) * 4:
        raise ValueError("image_root, image_column, caption_column and name are for the other formats, not a manifest")
    if fmt == FOLDER and (source.image_root, source.image_column, source.caption_column) != (None,) * 3:
        raise ValueError("image_root, image_column and caption_column are not for a folder of images "
                         "(its images are its files, their captions in sidecars)")
    if split is SPLIT_DEFAULT:
        split = "test" if fmt == MANIFEST else None
    elif split is not None and fmt != MANIFEST:
        split = readers.normalise_split(split, "split=")
    if isinstance(styles, str):
        styles = [styles]
    return InputSpec(
        kind, str(path.absolute() if readers.is_glob(path) else path.resolve()), split,
        tuple(sorted(styles)) if styles is not None else None, fmt,
        str(Path(source.image_root).expanduser().resolve()) if source.image_root is not None else None,
        source.image_column, source.caption_column,
        "" if fmt == MANIFEST else source.name or readers.default_style(path),
        tuple(dict.fromkeys(str(Path(root).expanduser().resolve())
                            for root in settings.allowed_image_roots(allowed_image_roots))))


@dataclass
class InputFiles:
    """The files of an input in reading order (a folder's: its images), and the files a folder's
    walk skipped, by reason (``readers.FolderWalk``)."""

    files: list[str]
    hidden: int = 0
    not_images: int = 0
    outside_links: int = 0


def input_files(spec: InputSpec) -> InputFiles:
    """The files of the input, in reading order; ValueError when there are none."""
    if spec.format == MANIFEST:
        return InputFiles([spec.path])
    if spec.format == FOLDER:
        walk = readers.walk_folder(Path(spec.path), spec.allowed_image_roots)
        return InputFiles([str(image) for image in walk.images], walk.hidden, walk.not_images, walk.outside_links)
    return InputFiles([str(file) for file in readers.source_files(Path(spec.path), spec.format)])


def image_roots(spec: InputSpec, files: Sequence[str]) -> list[str]:
    """The directories the input's image files lie under (``readers.corpus_root`` of each of its
    `files`; a manifest's directory, the folder), and those allowed beside them: what the
    collection records, so that the web page serves its images and no other file."""
    if spec.format == MANIFEST:
        roots = [str(Path(spec.path).parent)]
    elif spec.format == FOLDER:
        roots = [spec.path]
    elif spec.format == "webdataset":  # its images are bytes, written to the image store
        roots = []
    else:
        image_root = Path(spec.image_root) if spec.image_root else None
        roots = [str(readers.corpus_root(Path(file), image_root).resolve()) for file in files]
    return list(dict.fromkeys([*roots, *spec.allowed_image_roots]))


@dataclass
class Row:
    """One row of the input as the indexer reads it: a manifest row, or a (merged) row of another format.

    `image` is the image as described (its file, or where its bytes are in the source: a tar
    member, a Parquet row); `file` the file to read where that is known only when the row is read
    (a Parquet image struct that holds a path); `data` the bytes the source holds (read tasks of
    images only). A `problem` row is malformed: its one item is a dead letter with that reason;
    `missing` says why a row has no image. `extra` is what else identifies a row of another format
    in the shard digests (where it is; for Parquet and tar files their size and modification time).
    `relative_path` names the image under the input's root (a folder's file under the folder, a
    table's under the image root, an image the source holds by its place in it; a manifest's image
    under the manifest's directory, or its absolute path where it is elsewhere); `source_mtime` is
    the modification time of the file that holds the image's bytes, where that is not its own.
    """

    image: str
    captions: list[str]
    concept: str
    style: str
    split: str | None = None
    where: str = ""
    problem: str = ""
    missing: str = ""
    file: str | None = None
    in_source: bool = False
    data: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    relative_path: str = ""
    source_mtime: int = 0
    stamp: str = ""  # a folder image's (file_stamp)


def rows(spec: InputSpec, files: Sequence[str], *, offset: int = 0, number: int | None = None,
         read_images: bool = False) -> Iterator[tuple[int, int, int, Row]]:
    """``(file index, offset, number, row)`` for each row of `spec`'s split and styles in `files`,
    the first file from the row at `offset` (whose line or row number is `number`), the others
    from their start. `read_images`: read the image bytes a source holds (the driver's scan does not)."""
    for index, file in enumerate(files):
        start = (offset, number) if index == 0 else (0, None)
        for row_offset, row_number, row in _file_rows(spec, Path(file), *start, read_images):
            if not row.problem:  # a malformed row has no split to go by: its letter is in every run
                if spec.split is not None and row.split != spec.split:
                    continue
                if spec.styles is not None and row.style not in spec.styles:
                    continue
            yield index, row_offset, row_number, row


def _file_rows(spec: InputSpec, file: Path, offset: int, number: int | None,
               read_images: bool) -> Iterator[tuple[int, int, Row]]:
    if spec.format == MANIFEST:
        yield from _manifest_rows(spec, file, offset, number or 1)
        return
    if spec.format == FOLDER:  # one row a file: its stamp and its sidecars' say whether it changed
        stamp, sidecars = _stamps(file)
        row = _row(spec, file, readers.folder_row(Path(spec.path), file), {"stamp": stamp, "sidecars": sidecars})
        row.stamp = file_stamp(file, (stamp, sidecars))
        yield 0, 0, row
        return
    extra: dict[str, Any] = {}
    if spec.format in BYTE_FORMATS:  # the image bytes are not hashed by the scan: the file's stamp stands for them
        stat = file.stat()
        extra["stamp"] = f"{stat.st_size}:{stat.st_mtime_ns}"
    positioned = readers.file_rows(spec.format, file, image_root=Path(spec.image_root) if spec.image_root else None,
                                   image_column=spec.image_column, caption_column=spec.caption_column,
                                   offset=offset, number=number, read_images=read_images,
                                   require_captions=spec.kind == "caption",
                                   allowed_image_roots=spec.allowed_image_roots)
    if spec.format in MERGED_FORMATS:
        positioned = _merge_consecutive(positioned)
    source_mtime = int(file.stat().st_mtime) if spec.format in BYTE_FORMATS else 0
    for row_offset, row_number, source_row in positioned:
        row = _row(spec, file, source_row, extra)
        if row.in_source:
            row.source_mtime = source_mtime
        yield row_offset, row_number, row


def _stamps(image: Path) -> tuple[str, list[str]]:
    stat = image.stat()
    return (f"{stat.st_size}:{stat.st_mtime_ns}",
            [f"{side.st_size}:{side.st_mtime_ns}" if side else "" for side in map(_stat, _sidecars(image))])


def file_stamp(image: Path, stamps: tuple[str, list[str]] | None = None) -> str:
    """A folder image's stamp: its size and modification time and its sidecars': the same stamp,
    the same row (``folder_files.py``)."""
    stamp, sidecars = stamps or _stamps(image)
    return "|".join([stamp, *sidecars])


def _sidecars(image: Path) -> list[Path]:
    stem = image.name.rpartition(".")[0]
    return [image.with_name(f"{stem}.{ext}") for ext in readers.SIDECAR_EXTENSIONS]


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _merge_consecutive(positioned: Iterator[readers.Positioned]) -> Iterator[readers.Positioned]:
    """Consecutive rows naming the same image file as one row with all their captions (its
    position the first's; its split the first one given), as import merges them; a later run of
    rows of that image is another row. A row is held until the next one differs."""
    held: readers.Positioned | None = None
    for offset, number, row in positioned:
        if held is not None:
            first = held[2]
            if (not first.problem and not row.problem and first.image is not None and first.image == row.image):
                first.captions.extend(c for c in row.captions if c not in first.captions)
                first.split = first.split or row.split
                continue
            yield held
        held = (offset, number, row)
    if held is not None:
        yield held


def _row(spec: InputSpec, file: Path, row: readers.SourceRow, extra: dict[str, Any]) -> Row:
    # Path formats name an image by its path under the root (as import's ids do); images held as
    # bytes by where they are in the source, the same in the image and the caption collection.
    place = row.key or row.where.removeprefix(str(file.parent) + os.sep)
    return Row(image=row.location, captions=list(dict.fromkeys(row.captions)), concept=f"{spec.style}/{place}",
               style=spec.style, split=row.split, where=row.where, problem=row.problem, missing=row.missing,
               file=str(row.image) if row.image is not None else None, in_source=row.in_source, data=row.data,
               extra={"where": row.where, "problem": row.problem, **extra}, relative_path=place)


def _manifest_rows(spec: InputSpec, file: Path, offset: int, first_line: int) -> Iterator[tuple[int, int, Row]]:
    """The project's manifest, line by line from a byte offset: strict (a line that is not a
    manifest row, or not UTF-8, stops the run naming file and line)."""
    manifest_dir = file.parent
    roots = manifest_roots(manifest_dir, spec.allowed_image_roots)
    with open(file, "rb") as handle:
        handle.seek(offset)
        for line_number, raw in enumerate(handle, start=first_line):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"manifest {file} is not UTF-8 text: line {line_number}: {exc}") from None
            if not line.strip():
                continue
            row = parse_row(line, manifest_dir, roots, where=f"{file}:{line_number}")
            image = Path(row.image)
            relative = image.relative_to(manifest_dir).as_posix() if image.is_relative_to(manifest_dir) else str(image)
            yield start, line_number, Row(image=str(row.image), captions=row.captions, concept=row.concept,
                                          style=row.style, split=row.split, relative_path=relative)
