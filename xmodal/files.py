"""Files written so that a crash never leaves a half-written one trusted, the log of the inputs
a long run skipped, files named by a path or by a filesystem URI, and the roots images must lie
under; shared by the corpus fetchers, the readers, the indexer and the client.

A location is a local path, or the URI of a filesystem pyarrow reaches (``s3://bucket/key``,
``gs://``, ``hdfs://``, ``abfs://``, ``file:///shared/mount/key``): where images kept for a Milvus
server live, so that clients on other machines read them (docs/scale-out.md).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit


class SkipLog:
    """Images that could not be produced, one JSON line each (path + reason); started empty per run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def record(self, source: str, reason: str) -> None:
        self.count += 1
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"path": source, "reason": reason}, ensure_ascii=False) + "\n")


def write_atomic(path: Path, data: bytes) -> None:
    # a half-written image would be trusted as done by the next run's skip-existing check
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def is_uri(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def filesystem(uri: str):
    """``(pyarrow filesystem, path in it)`` of a URI; ValueError naming the URI when pyarrow
    does not know it (credentials come from the filesystem's own environment: AWS_*, ...)."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError, ImportError) as exc:
        raise ValueError(f"cannot open {uri!r} as a filesystem URI (s3://, gs://, hdfs://, abfs://, file://): "
                         f"{exc}") from None


def read_location(location: str | os.PathLike[str]) -> bytes:
    """The bytes of a file named by a path or a URI (OSError when it cannot be read)."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_location(uri: str, data: bytes) -> bool:
    """Write `data` at `uri` unless a file is there already; True when written. Whole or not at
    all: an object store shows an object once closed, a local filesystem gets a rename."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return False
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    target = f"{parent}/.{path.rsplit('/', 1)[1]}.{os.getpid()}.tmp" if local else path
    with fs.open_output_stream(target) as out:
        out.write(data)
    if local:
        fs.move(target, path)
    return True


class ImageRoots:
    """The directories (or filesystem URIs) a corpus's images must lie under: rows that name a
    file elsewhere are refused when a corpus is read, and ``xmodal web`` serves a row's image only
    from under the roots its collection records. Whoever writes a CSV, a manifest or a row of a
    shared collection chooses its paths; without this, ``../../etc/passwd``, an absolute path or
    a symlink leading out would make the page serve any file the server can read.

    A path lies under a root once both are resolved, symlinks followed: a link inside a root
    whose target is elsewhere lies elsewhere. A ``file://`` URI is its local path; another URI
    lies under a root URI of the same scheme and host whose path holds it, and names no ``..``
    step, query or fragment (the rows of an image store name none)."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        self.roots = [str(root) for root in roots]
        local, remote = [], []
        for root in self.roots:
            path = _local_path(root)
            if path is not None:
                local.append(os.path.realpath(path.expanduser()))
            else:
                remote.append(_uri_parts(root))
        # a root and the prefix of what lies under it: strings, since a corpus checks every row
        self._local = [(root, root.rstrip(os.sep) + os.sep) for root in local]
        self._remote = [parts for parts in remote if parts is not None]

    def __bool__(self) -> bool:
        return bool(self.roots)

    def place(self, location: str | os.PathLike[str]) -> Path | str | None:
        """Where to read `location` once it is known to lie under a root (a local path resolved,
        so that no symlink is followed again between the check and the read; a URI as given),
        else None."""
        path = _local_path(str(location))
        if path is not None:
            try:
                resolved = os.path.realpath(path.expanduser(), strict=True)
            except FileNotFoundError:  # a missing image is refused later, for what it is
                resolved = os.path.realpath(path.expanduser())
            except OSError:  # a symlink loop leads nowhere
                return None
            inside = any(resolved == root or resolved.startswith(prefix) for root, prefix in self._local)
            return Path(resolved) if inside else None
        parts = _uri_parts(str(location))
        if parts is None:
            return None
        scheme, host, uri_path = parts
        for root_scheme, root_host, root_path in self._remote:
            if (scheme, host) == (root_scheme, root_host) and uri_path.is_relative_to(root_path):
                return str(location)
        return None

    def __contains__(self, location: str | os.PathLike[str]) -> bool:
        return self.place(location) is not None

    def refusal(self, image: str | os.PathLike[str], where: str) -> str:
        """"" when `image` lies under a root, else the message that refuses it, naming where it
        was read (``file:line``), the path and where it leads."""
        if image in self:
            return ""
        path = _local_path(str(image))
        try:
            leads = f" (it leads to {path.resolve()})" if path is not None and path.resolve() != path else ""
        except (OSError, RuntimeError):  # a symlink loop
            leads = ""
        roots = ", ".join(self.roots)
        return (f"{where}: image {image} is outside the corpus root{'s' if len(self.roots) > 1 else ''} "
                f"{roots}{leads}; to read images there on purpose, allow their directory "
                "(--allow-image-root DIR, XMODAL_ALLOWED_IMAGE_ROOTS=DIR, or allowed_image_roots= in Python)")


def _local_path(location: str) -> Path | None:
    """The local path a location names (itself, or a ``file://`` URI's path); None for another URI."""
    if not is_uri(location):
        return Path(location)
    parts = urlsplit(location)
    if parts.scheme.lower() == "file" and parts.netloc in ("", "localhost") and not (parts.query or parts.fragment):
        return Path(unquote(parts.path))
    return None


def _uri_parts(uri: str) -> tuple[str, str, PurePosixPath] | None:
    """(scheme, host, path) of a URI; None for one that names a ``..`` step, a query or a fragment."""
    parts = urlsplit(uri)
    path = unquote(parts.path)
    if parts.query or parts.fragment or ".." in path.split("/"):
        return None
    return parts.scheme.lower(), parts.netloc, PurePosixPath("/" + path.strip("/"))
