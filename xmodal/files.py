"""Files written so that a crash never leaves a half-written one trusted, the log of the inputs
a long run skipped, and files named by a path or by a filesystem URI; shared by the corpus
fetchers, the readers, the indexer and the client.

A location is a local path, or the URI of a filesystem pyarrow reaches (``s3://bucket/key``,
``gs://``, ``hdfs://``, ``abfs://``, ``file:///shared/mount/key``): where images kept for a Milvus
server live, so that clients on other machines read them (docs/scale-out.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


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
