"""One indexing run described as data: `IndexJob` (what to read, where to embed it, where to
write it, how to run), and `Kind`, what differs between indexing images and captions.

``IndexJob(manifest="manifest.jsonl", triton_url="127.0.0.1:8000").run()`` is ``xmodal index``
in Python; the CLI, the demo and the benchmarks build the same object. ``pipeline.run`` turns
it into a reader, an embedding and a sink (``pipeline.build_reader`` etc.) and runs them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmodal import contract, settings
from xmodal.files import filesystem, is_uri
from xmodal.indexer import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, DEFAULT_WRITE_BATCH, formats, sources, state
from xmodal.indexer.sources import CAPTION, IMAGE

if TYPE_CHECKING:
    from xmodal.indexer.pipeline import IndexReport

# Writer actors for a Milvus server when not told (milvus-lite always has one writer: the driver).
DEFAULT_SERVER_WRITERS = 2


@dataclass(frozen=True)
class Kind:
    """What differs between indexing images and indexing captions in the pipeline (the
    collection's schema and its rows: ``contract.KINDS[name]``, which the writer actors look
    up by `name`)."""

    name: str  # "image" or "caption": the collection's kind
    collection: str  # the collection when the job names none
    model: str  # the Triton ensemble that embeds an item
    input_name: str  # that ensemble's input tensor
    local_input: str  # what the in-process embedder runs: "image" or "text"
    letter_fields: tuple[str, ...]  # the item's fields its dead letter keeps (then reason, collection)
    # the map_batches stage between reading and embedding, given where to write images the source
    # holds as bytes (images: read each file, hash it, check it is an image); None: none
    prepare: Callable[..., dict[str, Any]] | None = None

    def letter(self, record: dict[str, Any], collection: str) -> dict[str, Any]:
        """The dead letter of a failed item; an item whose text Arrow could not carry brings its
        fields in ``letter``."""
        fields = {name: record[name] for name in self.letter_fields}
        fields.update(reason=record["error"], collection=collection)
        if record.get("letter"):
            fields.update(json.loads(record["letter"]))
        return fields


KINDS = {
    IMAGE: Kind(IMAGE, settings.IMAGE_COLLECTION, contract.EMBED_IMAGE, contract.IMAGE_INPUT, "image", ("path",),
                prepare=sources.read_images),
    CAPTION: Kind(CAPTION, settings.CAPTION_COLLECTION, contract.EMBED_TEXT, contract.TEXT_INPUT, "text",
                  ("caption", "image")),
}


@dataclass(kw_only=True)
class IndexJob:
    """Embed the images (`kind` "image") or the captions ("caption") of a manifest, or of `input`
    in another format, and upsert them into a Milvus collection.

    Input: `manifest` (the project's JSONL manifest) or `input`: a path (its format found from
    its name) or a ``formats.Source`` (format, image root, Parquet columns, name): a folder of
    images (walked recursively, captions optional from same-name ``.txt``/``.json`` sidecars), CSV/TSV or
    JSONL tables with an image folder, the Karpathy split JSON, Parquet with an image-bytes or
    image-path column, WebDataset tar shards (docs/indexing.md). `split`: a manifest's ``test``
    split unless given; every row of another format unless given (None: every row). `styles`
    keeps those styles only; `limit` the first rows. An image path must lie under the input's
    corpus root (a manifest's directory, the image root or the table's directory, the folder),
    symlinks followed, or under one of `allowed_image_roots` (or ``$XMODAL_ALLOWED_IMAGE_ROOTS``);
    the collection records those directories (and the image store), and the web page serves
    no file outside them.

    Embedding: by the Triton server at `triton_url` (or several of the same model: a list, or
    URLs separated by commas; each actor asks those on its own node first and goes on to the
    next when one stops answering), or, given `model_repository` instead,
    in-process with ONNX Runtime from that repository (``xmodal index --local``,
    ``xmodal.indexer.local``): the same preprocessing and encoders, the same rows.
    `embed_workers` actors embed batches of `batch_size` items; `embed_threads` sets ONNX
    Runtime's intra-op threads per actor with a `model_repository` (default: its choice);
    `embed_resources` are the Ray resources each actor holds (e.g. ``{"GPU": 1}``, or a custom
    resource that marks some nodes; default a share of a CPU).

    Writing: into `collection` (default by kind: ``xmodal_images``, ``xmodal_captions``) at
    `milvus_uri` (default: the data directory's milvus-lite file), `milvus_token` (else
    $XMODAL_MILVUS_TOKEN) authenticating to a server. With a server, `writers` actors upsert in
    parallel (default 2; milvus-lite takes one, the driver), `write_batch` rows an upsert.
    `index_type`/`index_params` choose the vector index of a collection this run creates
    (default: IVF_FLAT, nlist 1024 on milvus-lite; HNSW, M 16, efConstruction 200 on a server);
    an existing collection keeps its own.

    Images: keys are content hashes, so re-running writes the same rows again (no duplicates),
    and identical image files become one row (with the path and captions of the last of them in
    the input). Images the source holds as bytes are written once, by content, beside the
    collection, and their rows point at those files. Captions: one row per distinct caption text
    (its hash is the key); the row keeps the concept, style and image of the last row that has it
    (an image the source holds as bytes is named by where it is there: ``<shard>:<key>.jpg``,
    ``<file>: row 3``; its bytes are not read). The items are the captions, repeats included
    (``items_read`` counts them); a shard sends each distinct text of it once, and a text
    repeated in later shards is embedded and upserted again, to the same row.

    The input is streamed: one pass in the driver finds the shards, Ray tasks read them (memory
    does not grow with the corpus); `ray_address` joins a running Ray, else a small local one is
    started. Items that fail (unreadable files, images the server rejects, empty captions, text
    Milvus cannot store) go to the dead-letter file (``deadletter_path``) and the run goes on. A
    run that was cut short continues where it stopped when started again with the same input and
    model: the shards (`shard_size` items) it finished are skipped (`restart` ignores them).
    `progress` shows a bar and the report on stderr; `timeout` bounds the checks of the servers.

    The job checks itself when made (ValueError); ``run()`` checks it again, then indexes.
    """

    kind: str = IMAGE
    # what to read
    manifest: str | os.PathLike[str] | None = None
    input: formats.Source | str | os.PathLike[str] | None = None  # noqa: A003 - the CLI's --input
    split: str | None = formats.SPLIT_DEFAULT
    styles: Collection[str] | str | None = None
    limit: int | None = None
    # directories outside the corpus root whose images the input may name, allowed on purpose
    allowed_image_roots: Sequence[str | os.PathLike[str]] = ()
    # where to embed: one of the two
    triton_url: str | list[str] | None = None
    model_repository: str | os.PathLike[str] | None = None
    # where to write: `milvus_uri` and `collection` are filled in when the job is made
    milvus_uri: str | os.PathLike[str] | None = None
    milvus_token: str | None = field(default=None, repr=False)  # never printed
    collection: str | None = None
    writers: int | None = None  # None: by the database (1 for milvus-lite, 2 for a server)
    index_type: str | None = None
    index_params: dict[str, Any] | None = None
    # where the images a source holds as bytes (Parquet, WebDataset) are written: a directory or a
    # filesystem URI (s3://, gs://, file://...) every client reads; None: beside the collection
    image_store: str | os.PathLike[str] | None = None
    # how to run
    batch_size: int = DEFAULT_BATCH_SIZE
    embed_workers: int = 1
    embed_threads: int | None = None
    embed_resources: dict[str, float] | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    write_batch: int = DEFAULT_WRITE_BATCH
    restart: bool = False
    # a folder: remove the paths of files gone from it (their rows, when no path is left)
    sync: bool = False
    ray_address: str | None = None
    progress: bool = True
    timeout: float = 10.0

    def __post_init__(self) -> None:
        self.milvus_uri = str(self.milvus_uri or settings.default_milvus_uri())
        if self.collection is None and self.kind in KINDS:
            self.collection = KINDS[self.kind].collection
        self.validate()

    def source(self) -> formats.Source:
        """The one input of the job, as a ``formats.Source``."""
        return formats.source_of(self.manifest, self.input)

    def image_store_location(self) -> str:
        """Where images the source holds as bytes are written: `image_store`, else beside the collection."""
        return str(self.image_store or state.image_store_path(self.milvus_uri, self.collection))

    def writer_count(self) -> int:
        """`writers`, or when not given the database's: the driver alone for milvus-lite."""
        from xmodal import store

        if self.writers is not None:
            return self.writers
        return 1 if store.is_local_uri(self.milvus_uri) else DEFAULT_SERVER_WRITERS

    def validate(self) -> None:
        """ValueError for a job that cannot run, before any work is started."""
        from xmodal import store

        if self.kind not in KINDS:
            raise ValueError(f"kind must be {IMAGE!r} or {CAPTION!r}, got {self.kind!r}")
        self.source()
        for name in ("shard_size", "batch_size", "embed_workers", "write_batch"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, amount in (self.embed_resources or {}).items():
            if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                    or not amount >= 0:
                raise ValueError(f"embed_resources: each resource needs a name and an amount of at least 0, "
                                 f"got {name!r}: {amount!r}")
        writers = self.writer_count()
        if writers < 1:
            raise ValueError(f"writers must be at least 1, got {writers}")
        if store.is_local_uri(self.milvus_uri) and writers > 1:
            raise ValueError(f"milvus-lite ({self.milvus_uri}) is a database one process holds: it takes one "
                             f"writer, not {writers}; use a Milvus server URI for parallel writers")
        if self.image_store is not None and is_uri(self.image_store):
            filesystem(str(self.image_store))  # ValueError naming a URI pyarrow does not know
        if isinstance(self.allowed_image_roots, (str, os.PathLike)):
            raise ValueError("allowed_image_roots takes a list of directories, not one path")
        for root in self.allowed_image_roots:
            if not Path(root).expanduser().is_dir():
                raise ValueError(f"allowed_image_roots: {root} is not a directory")
        if (self.triton_url is None) == (self.model_repository is None):
            raise ValueError("give either triton_url (embed with a Triton server) or model_repository "
                             "(embed in-process with ONNX Runtime, no server), not both or neither")

    def run(self) -> IndexReport:
        """Index as described (``pipeline.run`` with the default builders)."""
        from xmodal.indexer.pipeline import run

        return run(self)
