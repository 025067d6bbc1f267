"""The `xmodal` command. Each sub-command imports its part lazily, so `xmodal search` never loads torch or ray."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xmodal import settings
from xmodal.extras import MissingExtra, require
from xmodal.indexer import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, DEFAULT_WRITE_BATCH
from xmodal.training.recipes import RECIPES


# The formats users bring (xmodal/readers.py), as `data import` and `index --input` take them.
INPUT_FORMATS = ("auto", "csv", "jsonl", "karpathy", "parquet", "webdataset")
# `index --input` also takes a folder of images (captions optional: import needs them).
INDEX_INPUT_FORMATS = (*INPUT_FORMATS, "folder")
ALLOW_IMAGE_ROOT_HELP = ("also accept image paths under DIR (repeatable; $XMODAL_ALLOWED_IMAGE_ROOTS adds more, "
                         "separated by ':', for every command). Without it an image must lie under the corpus "
                         "root: the manifest's directory, --image-root or the source's directory, the folder; a "
                         "path leading elsewhere (../, an absolute path, a symlink leading out) is refused")


def default_manifest() -> Path:
    return settings.data_dir() / "emoji" / "manifest.jsonl"


def default_run(recipe: str | None = None) -> Path:
    """A recipe's run folder, or without one the default model's (the one `make demo` trains)."""
    if recipe is None:
        from xmodal.demo import DEMO_RUN

        return settings.data_dir() / "runs" / DEMO_RUN
    return settings.data_dir() / "runs" / recipe


def cmd_data_fetch(args: argparse.Namespace) -> int:
    require("data fetch", "data")
    if args.corpus == "emoji":
        from xmodal.training.emoji import fetch_emoji

        manifest = fetch_emoji(settings.data_dir(), limit=args.limit, force=args.force)
    else:
        from xmodal.training.iconify import fetch_iconify

        manifest = fetch_iconify(settings.data_dir(), sets=args.sets, max_icons_per_set=args.limit, force=args.force)
    print(f"manifest: {manifest}")
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    require("data import", "data")
    from xmodal.readers import import_corpus

    out = args.out or settings.data_dir() / (args.name or Path(args.source).stem)
    manifest = import_corpus(
        Path(args.source), out, format=args.format, split=args.split, image_root=args.image_root,
        style=args.name, test_fraction=args.test_fraction, image_column=args.image_column,
        caption_column=args.caption_column, allowed_image_roots=args.allow_image_root or (),
    )
    print(f"manifest: {manifest}")
    return 0


def resolve_data(names: list[str] | None) -> list[Path]:
    """`--data` takes manifest paths or corpus names fetched into the data directory (emoji, iconify)."""
    manifests = []
    for name in names or ["emoji"]:
        path = Path(name)
        if not path.suffix:
            path = settings.data_dir() / name / "manifest.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"no {name} corpus at {path}: run `xmodal data fetch {name}` first")
        elif not path.exists():
            raise FileNotFoundError(f"no manifest at {path}")
        manifests.append(path)
    return manifests


def cmd_train(args: argparse.Namespace) -> int:
    require("train", "train")
    from xmodal.training.train import train

    run = args.out or default_run(args.recipe)
    train(
        resolve_data(args.data), run, recipe=args.recipe, device=args.device, resume=not args.restart,
        minutes=args.minutes, epochs=args.epochs, batch_size=args.batch_size, text_encoder=args.text_encoder,
        text_freeze=args.text_freeze, text_lr_scale=args.text_lr_scale,
    )
    print(f"run: {run}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    require("export", "train", onnxruntime=True)
    from xmodal.export.onnx import export_run
    from xmodal.export.repository import write_model_repository

    run = args.run or default_run()
    exported = export_run(run, args.out or run / "onnx", version=args.version, quantize=args.quantize,
                          manifests=resolve_data(args.data) if args.quantize else None)
    print("ONNX parity (max abs diff): " + ", ".join(f"{k} {v:.1e}" for k, v in exported.parity.items()))
    if exported.int8_gate is not None:
        from xmodal.export.variants import describe_gate

        print(describe_gate(exported.int8_gate))
    variant = exported.choose(args.target, tensorrt=args.tensorrt, precision=args.precision)
    card = variant.card
    repository = write_model_repository(
        args.model_repository or settings.default_model_repository(), card,
        image_onnx=variant.image_onnx, text_onnx=variant.text_onnx, tokenizer_json=exported.tokenizer_json,
        version=args.version, target=args.target, tensorrt=args.tensorrt, instance_count=args.instances,
        max_queue_delay_microseconds=args.max_queue_delay_us, keep_previous=not args.replace,
    )
    print(f"model {card.name} version {args.version} ({variant.precision}, {args.target}) fingerprint {card.fingerprint}")
    print(f"model repository: {repository}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    require("serve", "serve", onnxruntime=True)
    from xmodal.server import serve

    return serve(
        args.model_repository or settings.default_model_repository(), host=args.host,
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
    )


def cmd_index(args: argparse.Namespace) -> int:
    require("index", "index", onnxruntime=args.local)
    from xmodal.indexer import IndexJob

    if args.local:
        where = dict(model_repository=args.model_repository or settings.default_model_repository())
    else:
        if args.model_repository is not None:
            raise ValueError("--model-repository is for --local (in-process ONNX Runtime); without it the "
                             "Triton server at --triton-url embeds")
        where = dict(triton_url=args.triton_url)
    job = IndexJob(
        kind="caption" if args.captions else "image", **_index_input(args), **where,
        milvus_uri=args.milvus_uri, milvus_token=args.milvus_token, collection=args.collection,
        batch_size=args.batch_size, embed_workers=args.workers, embed_threads=args.embed_threads,
        embed_resources=args.worker_resources,
        writers=args.writers, shard_size=args.shard_size, index_type=args.index_type, index_params=args.index_params,
        write_batch=args.write_batch, restart=args.restart, sync=args.sync, ray_address=args.address,
        image_store=args.image_store, allowed_image_roots=args.allow_image_root or (),
    )
    report = job.run()
    sides = None
    if not args.captions and not args.local and _serves_reranker(args.triton_url):
        # A model with a re-ranker: its side of every image, for search_text(rerank=True).
        from xmodal.indexer.sides import index_sides

        sides = index_sides(triton_url=args.triton_url, milvus_uri=args.milvus_uri, collection=job.collection,
                            batch_size=args.batch_size, token=args.milvus_token)
    if args.json:
        print_json({**report.to_dict(), **({"sides": sides.to_dict()} if sides else {})})
    # failure: items went through the pipeline and none of them became a row
    return 1 if report.items_processed and not report.rows_written else 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _index_input(args: argparse.Namespace) -> dict:
    """The job's input (``IndexJob`` fields): `--manifest M` or `--input PATH` with its format
    options, and the split: a manifest's test split unless --split says otherwise, every row of
    another format unless --split is given."""
    from xmodal.indexer.formats import SPLIT_DEFAULT, Source

    options = {"--format": args.format != "auto", "--image-root": args.image_root is not None,
               "--image-column": args.image_column is not None, "--caption-column": args.caption_column is not None,
               "--name": args.name is not None}
    split = SPLIT_DEFAULT if args.split is None else None if args.split == "all" else args.split
    if args.input is None:
        given = [option for option, set_ in options.items() if set_]
        if given:
            raise ValueError(f"{', '.join(given)} go with --input (a corpus in another format), not a manifest")
        return {"manifest": args.manifest or default_manifest(), "split": split}
    if args.manifest is not None:
        raise ValueError("give either --manifest (the project's manifest) or --input (a corpus in another "
                         "format), not both")
    return {"input": Source(args.input, format=args.format, image_root=args.image_root,
                            image_column=args.image_column, caption_column=args.caption_column, name=args.name),
            "split": split}


def _serves_reranker(triton_url: str) -> bool:
    from xmodal import contract
    from xmodal import triton

    client = triton.connect_any(triton_url, models=(contract.EMBED_IMAGE,))
    try:
        return bool(triton.fetch_card(client, contract.EMBED_IMAGE).reranker)
    finally:
        client.close()


def cmd_index_sides(args: argparse.Namespace) -> int:
    require("index sides", "index")
    from xmodal.indexer.sides import index_sides

    report = index_sides(triton_url=args.triton_url, milvus_uri=args.milvus_uri, collection=args.collection,
                         batch_size=args.batch_size, restart=args.restart, token=args.milvus_token)
    if args.json:
        print_json(report.to_dict())
    return 1 if report.failed and not report.computed and not report.present else 0


def cmd_index_stats(args: argparse.Namespace) -> int:
    from xmodal.indexer.manage import collection_stats, format_stats

    stats = collection_stats(args.milvus_uri, args.collection, token=args.milvus_token)
    if args.json:
        print_json(stats)
    else:
        print(format_stats(stats))
    return 0


def cmd_index_letters(args: argparse.Namespace) -> int:
    from xmodal.indexer.manage import dead_letters

    for letter in dead_letters(args.milvus_uri, args.collection, token=args.milvus_token):
        print(json.dumps(letter, ensure_ascii=False))
    return 0


def cmd_index_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        raise ValueError(f"this drops collection {args.collection!r} with its progress and dead letters; "
                         "add --yes to do it")
    from xmodal.indexer.manage import delete_collection

    for what in delete_collection(args.milvus_uri, args.collection, token=args.milvus_token):
        print(f"removed {what}")
    return 0


def parse_level_weights(text: str | None) -> dict[str, float] | None:
    """``concept=0.7,exterior=0.3`` -> {"concept": 0.7, "exterior": 0.3}; the client checks the levels and values."""
    if text is None:
        return None
    weights: dict[str, float] = {}
    for part in text.split(","):
        level, equals, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not equals or not level.strip() or weight is None or level.strip() in weights:
            raise ValueError(f"--level-weights takes LEVEL=WEIGHT pairs separated by commas, each level once, "
                             f"e.g. concept=0.7,exterior=0.3; got {text!r}")
        weights[level.strip()] = weight
    return weights


def cmd_search(args: argparse.Namespace) -> int:
    from xmodal.client import Client
    from xmodal.client.table import format_hits

    if (args.text is None) == (args.image is None):
        raise ValueError("give either a text query or --image PATH, not both or neither")
    if args.captions and args.image is None:
        raise ValueError("--captions searches captions for an image: give --image PATH")
    options = dict(k=args.k, filter=args.filter, level_weights=parse_level_weights(args.level_weights))
    if (args.rerank or args.rerank_top is not None) and args.text is None:
        raise ValueError("--rerank re-ranks a text query's images: give a text query")
    with Client(args.triton_url, args.milvus_uri, args.collection) as client:
        if args.text is not None:
            rerank = dict(rerank=True, rerank_top=args.rerank_top) if args.rerank or args.rerank_top else {}
            hits = client.search_text(args.text, **options, **rerank)
        elif args.captions:
            hits = client.search_captions(args.image, **options)
        else:
            hits = client.search_image(args.image, **options)
    if args.json:
        # a re-ranked hit without a stored side has a NaN score: null in JSON
        print_json([{k: None if isinstance(v, float) and v != v else v for k, v in hit.__dict__.items()}
                    for hit in hits])
    else:
        print(format_hits(hits))
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    from xmodal.client.web import serve

    return serve(args.triton_url, args.milvus_uri, args.collection, host=args.host, port=args.port)


def cmd_milvus(args: argparse.Namespace) -> int:
    from xmodal import milvus_server

    directory = args.directory or milvus_server.default_directory()
    if args.milvus_command == "start":
        require("milvus start", "milvus-server")
        state = milvus_server.start(directory, host=args.host, port=args.port, timeout=args.timeout,
                                    say=lambda message: print(message, file=sys.stderr, flush=True))
        where = ("for this machine only: its other ports are in a network namespace of its own" if state.isolated
                 else f"on {state.host}: every Milvus port is open to the network, put it behind a firewall")
        print(f"Milvus server ready at {state.uri}, {where}; data in {state.directory}")
        return 0
    if args.milvus_command == "stop":
        print("stopped the Milvus server" if milvus_server.stop(directory)
              else f"no Milvus server of {directory} was running")
        return 0
    state = milvus_server.running(directory)
    if state is None:
        print(f"no Milvus server of {directory} is running")
        return 3
    print(f"Milvus server at {state.uri}: {state.state}{': ' + state.reason if state.reason else ''} "
          f"(pid {state.pid}, data in {state.directory})")
    return 0 if state.state == "ready" else 3


def cmd_demo(args: argparse.Namespace) -> int:
    require("demo", "index", "train", "serve", onnxruntime=True)
    from xmodal.demo import run_demo

    return run_demo(minutes=args.minutes, limit=args.limit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmodal", description="Cross-modal image <-> text retrieval.")
    parser.add_argument("--data-dir", type=Path, help="cache for corpora, runs, the model repository and milvus-lite (default ./xmodal-data, or $XMODAL_DATA)")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="fetch corpora").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="fetch a corpus that ships in npm packages into the data directory")
    fetch.add_argument("corpus", choices=["emoji", "iconify"])
    fetch.add_argument("--limit", type=int, help="emoji: only the first N concepts present in every style; iconify: at most N icons per set")
    fetch.add_argument("--sets", nargs="+", help="iconify: extra icon sets by prefix, or 'all' (default: the five emoji sets only)")
    fetch.add_argument("--force", action="store_true", help="render again even where images exist")
    fetch.set_defaults(func=cmd_data_fetch)

    corpus = data.add_parser("import", help="convert a corpus you bring (CSV/JSONL + images, Karpathy JSON, Parquet, WebDataset) into a manifest")
    corpus.add_argument("source", help="the file, directory or glob")
    corpus.add_argument("--format", default="auto", choices=INPUT_FORMATS)
    corpus.add_argument("--name", help="the corpus name: its directory under the data dir and its style (default: the source's name)")
    corpus.add_argument("--out", type=Path, help="output directory (default <data>/<name>)")
    corpus.add_argument("--image-root", type=Path, help="where relative image paths start (default: beside the source)")
    corpus.add_argument("--allow-image-root", type=Path, action="append", metavar="DIR", help=ALLOW_IMAGE_ROOT_HELP)
    corpus.add_argument("--split", help="put every row in this split instead of the source's own or a hashed one")
    corpus.add_argument("--test-fraction", type=float, default=0.1)
    corpus.add_argument("--image-column")
    corpus.add_argument("--caption-column")
    corpus.set_defaults(func=cmd_data_import)

    train = commands.add_parser("train", help="train a recipe and print held-out Recall@K")
    train.add_argument("--recipe", default="infonce", choices=sorted(RECIPES))
    train.add_argument("--data", action="append", help="a corpus name (emoji, iconify) or a manifest path; repeatable (default emoji)")
    train.add_argument("--out", type=Path, help="run directory (default <data>/runs/<recipe>)")
    train.add_argument("--device", default="cpu", help="cpu, or cuda where torch sees a GPU")
    train.add_argument("--restart", action="store_true", help="ignore a checkpoint left by a killed run")
    train.add_argument("--minutes", type=float, help="time budget")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--text-encoder", help="text backbone instead of the recipe's own: minilm (pretrained all-MiniLM-L6-v2), glove_cnn, small_transformer, small_text_cnn")
    train.add_argument("--text-freeze", help="how much of the text backbone trains: all (frozen: only the heads train), "
                       "topK (MiniLM's top K layers; the lower ones frozen and cached), none (full fine-tuning); "
                       "default auto: frozen when pretrained")
    train.add_argument("--text-lr-scale", type=float, help="the text backbone's learning rate as a fraction of --lr's, e.g. 0.1 when fine-tuning")
    train.set_defaults(func=cmd_train)

    export = commands.add_parser("export", help="export a run to ONNX, write the card and the Triton model repository")
    export.add_argument("--run", type=Path)
    export.add_argument("--out", type=Path, help="where the ONNX files and card go (default <run>/onnx)")
    export.add_argument("--model-repository", type=Path)
    export.add_argument("--version", type=int, default=1, help="the repository version to write; the version served until now stays beside it (default 1)")
    export.add_argument("--replace", action="store_true", help="drop the versions already in the repository")
    export.add_argument("--quantize", choices=["int8", "int8-text"], help="also make the INT8 model (int8-text: the text "
                        "encoder alone, the image encoder FP32); kept only if held-out R@10 drops <= 1 point each way")
    export.add_argument("--data", action="append", help="with --quantize: the run's corpora or manifests, whose test split the INT8 gate uses (default emoji)")
    export.add_argument("--target", choices=["cpu", "gpu"], default="cpu", help="gpu: KIND_GPU instances and the FP16 model")
    export.add_argument("--tensorrt", action="store_true", help="with --target gpu: the TensorRT accelerator at FP16 on the plain FP32 model")
    export.add_argument("--precision", choices=["fp32", "fp32-portable", "int8", "int8-text", "fp16"], help="serve this variant instead of the target's default")
    export.add_argument("--instances", type=int, help="encoder instances per device (default: 1 on cpu, see docs/serving.md for the instance sweep; one per GPU on gpu)")
    export.add_argument("--max-queue-delay-us", type=int, help="the encoders' dynamic-batching queue delay in microseconds")
    export.set_defaults(func=cmd_export)

    serve = commands.add_parser("serve", help="run the local Triton server until Ctrl-C")
    serve.add_argument("--model-repository", type=Path)
    serve.add_argument("--host", default=settings.HOST)
    serve.add_argument("--http-port", type=int, default=settings.HTTP_PORT)
    serve.add_argument("--grpc-port", type=int, default=settings.GRPC_PORT)
    serve.add_argument("--metrics-port", type=int, default=settings.METRICS_PORT)
    serve.set_defaults(func=cmd_serve)

    milvus_token_help = ("token for a Milvus server (user:password or an API key); default $XMODAL_MILVUS_TOKEN. "
                         "Prefer the variable: a command line is visible to other users")
    index = commands.add_parser(
        "index", help="embed a corpus's images (or captions) through Triton into Milvus; stats, delete",
        description="Embed the images (or captions) of a manifest, or of a corpus in a format users bring "
                    "(--input), through Triton into Milvus. A run that was cut short resumes when the same "
                    "command runs again. `xmodal index stats` and `xmodal index delete` look at and remove a "
                    "collection.")
    index.add_argument("--manifest", type=Path, help="the project's manifest (default: the emoji corpus's)")
    index.add_argument("--input", type=Path, help="instead of --manifest: a corpus you bring, read directly "
                       "(a folder of images, walked recursively, captions optional from same-name .txt/.json "
                       "sidecars; CSV/TSV or JSONL + images, Karpathy JSON, Parquet or WebDataset tar shards: a "
                       "file, directory or glob)")
    index.add_argument("--format", default="auto", choices=INDEX_INPUT_FORMATS, help="with --input: its format (default: from its name)")
    index.add_argument("--image-root", type=Path, help="with --input: where relative image paths start (default: beside the source)")
    index.add_argument("--allow-image-root", type=Path, action="append", metavar="DIR",
                       help=ALLOW_IMAGE_ROOT_HELP + "; the collection records it, and `xmodal web` serves images "
                       "only from under the directories a collection records")
    index.add_argument("--image-column", help="with --input: the Parquet image column (bytes, path or {bytes, path})")
    index.add_argument("--caption-column", help="with --input: the Parquet caption column")
    index.add_argument("--name", help="with --input: the corpus name, the rows' style (default: the source's name)")
    index.add_argument("--split", help="the split to index, or 'all' (default: test for a manifest, every row for --input)")
    index.add_argument("--captions", action="store_true", help="index the captions (one row per distinct text) instead of the images")
    index.add_argument("--triton-url", default=settings.default_triton_url(),
                       help="the Triton server, or several of the same model separated by commas: each embedding "
                            "actor asks one on its own node first, and the next when one stops answering")
    index.add_argument("--local", action="store_true",
                       help="embed in-process with ONNX Runtime from the model repository, no Triton server")
    index.add_argument("--model-repository", type=Path,
                       help="with --local: the repository to run (default xmodal-data/model_repository)")
    index.add_argument("--milvus-uri", default=None, help="a milvus-lite .db path (default xmodal-data/xmodal.db) "
                       "or a Milvus server, http://HOST:19530")
    index.add_argument("--milvus-token", default=None, help=milvus_token_help)
    index.add_argument("--collection", help=f"default {settings.IMAGE_COLLECTION}, or {settings.CAPTION_COLLECTION} with --captions")
    index.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                       help=f"items per Ray batch and per embedding request (default {DEFAULT_BATCH_SIZE}; capped by the model's max_batch_size)")
    index.add_argument("--workers", type=int, default=1, help="embedding actors")
    index.add_argument("--embed-threads", type=int, default=None,
                       help="with --local: ONNX Runtime threads per embedding actor (default: its own choice)")
    index.add_argument("--worker-resources", type=_json_object, default=None,
                       help='Ray resources each embedding actor holds, a JSON object such as \'{"GPU": 1}\' '
                            '(default: a share of a CPU)')
    index.add_argument("--writers", type=int, default=None,
                       help="writer actors for a Milvus server URI (default 2); milvus-lite has one, the driver")
    index.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"items per shard, the unit a killed run resumes from (default {DEFAULT_SHARD_SIZE})")
    index.add_argument("--write-batch", type=int, default=DEFAULT_WRITE_BATCH, help=f"rows per upsert into Milvus (default {DEFAULT_WRITE_BATCH})")
    index.add_argument("--restart", action="store_true", help="ignore the progress of a run that was cut short and index everything")
    index.add_argument("--sync", action="store_true",
                       help="a folder indexed before: also remove the files gone from it (their paths, and rows left "
                            "with none); new and changed files are indexed, unchanged ones skipped, either way")
    index.add_argument("--image-store", default=None,
                       help="where the images a Parquet or WebDataset input holds are written, by content: a "
                            "directory, or a filesystem URI every client reads (s3://bucket/prefix, gs://, file://); "
                            "default: beside the collection, on this machine")
    index.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
    index.add_argument("--address", help="join an existing Ray cluster (default: a local one)")
    index.add_argument("--index-type", default=None,
                       help="vector index of a collection this run creates (default IVF_FLAT on milvus-lite, which also "
                            "takes FLAT and AUTOINDEX; HNSW on a Milvus server, which takes any type it builds)")
    index.add_argument("--index-params", type=_json_object, default=None,
                       help='its parameters as a JSON object, e.g. \'{"nlist": 256}\' or \'{"M": 32, "efConstruction": 400}\' '
                            "(default: the type's defaults in docs/indexing.md)")
    index.set_defaults(func=cmd_index)
    # Optional sub-commands: plain `xmodal index` still runs the indexer.
    index_commands = index.add_subparsers(dest="index_command", metavar="{stats,letters,delete,sides}")
    stats = index_commands.add_parser("stats", help="rows, model, index, dead letters and progress of a collection")
    letters = index_commands.add_parser("letters", help="the dead letters of a collection's last run, a JSON "
                                        "object a line (from a Milvus server, on any machine that reaches it)")
    delete = index_commands.add_parser("delete", help="drop a collection and its progress, dead-letter and side files")
    sides = index_commands.add_parser(
        "sides", help="the served re-ranker's side of every indexed image that has none (xmodal index runs it "
        "for a model with a re-ranker)")
    for sub in (stats, letters, delete, sides):
        sub.add_argument("--milvus-uri", default=None)
        sub.add_argument("--milvus-token", default=None, help=milvus_token_help)
        sub.add_argument("--collection", default=settings.IMAGE_COLLECTION)
    sides.add_argument("--triton-url", default=settings.default_triton_url())
    sides.add_argument("--batch-size", type=int, default=32)
    sides.add_argument("--restart", action="store_true", help="remove the side store first (a new re-ranker)")
    sides.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    sides.set_defaults(func=cmd_index_sides)
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    stats.set_defaults(func=cmd_index_stats)
    letters.set_defaults(func=cmd_index_letters)
    delete.add_argument("--yes", action="store_true", help="really drop it")
    delete.set_defaults(func=cmd_index_delete)

    search = commands.add_parser("search", help="text -> images or image -> images")
    search.add_argument("text", nargs="?")
    search.add_argument("--image", type=Path)
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--triton-url", default=settings.default_triton_url())
    search.add_argument("--milvus-uri", default=None)
    search.add_argument("--collection", default=settings.IMAGE_COLLECTION)
    search.add_argument("--rerank", action="store_true", help="re-rank the first stage's top hits with the served "
                        "pair scorer (models with a re-ranker: cran, mcsm)")
    search.add_argument("--rerank-top", type=int, help="first-stage hits to re-rank (default: the model card's, 20)")
    search.add_argument("--filter", help='a Milvus boolean expression on the scalar fields, e.g. \'style == "openmoji"\'')
    search.add_argument("--captions", action="store_true", help="with --image: captions for the image (the caption collection)")
    search.add_argument("--level-weights", metavar="LEVEL=W,...",
                        help="hierarchical models: rank by the weighted levels, e.g. concept=0.7,exterior=0.3 "
                             "(default: the fused global vector)")
    search.set_defaults(func=cmd_search)

    web = commands.add_parser("web", help="serve the search page (text or image -> images) until Ctrl-C")
    web.add_argument("--host", default=settings.HOST, help="address to bind (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=8080)
    web.add_argument("--triton-url", default=settings.default_triton_url())
    web.add_argument("--milvus-uri", default=None)
    web.add_argument("--collection", default=settings.IMAGE_COLLECTION)
    web.set_defaults(func=cmd_web)

    milvus = commands.add_parser(
        "milvus", help="a Milvus server on this machine, for what milvus-lite does not do (docs/scale-out.md)")
    milvus_commands = milvus.add_subparsers(dest="milvus_command", required=True)
    milvus_start = milvus_commands.add_parser("start", help="start the Milvus 2.3 server and wait until it answers")
    milvus_start.add_argument("--host", default=settings.HOST,
                              help="address to listen on (default 127.0.0.1: this machine only)")
    milvus_start.add_argument("--port", type=int, default=19530, help="default 19530; 0: a free port")
    milvus_start.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for it to be ready")
    milvus_commands.add_parser("stop", help="stop it")
    milvus_commands.add_parser("status", help="whether it runs, and where (exit status 3 when it does not)")
    for sub in milvus_commands.choices.values():
        sub.add_argument("--directory", type=Path, help="its data (default <data>/milvus-server)")
        sub.set_defaults(func=cmd_milvus)

    demo = commands.add_parser("demo", help="fetch, train, export, serve, index, query: the whole pipeline")
    demo.add_argument("--minutes", type=float, help="training budget")
    demo.add_argument("--limit", type=int, help="only a tiny slice of concepts (for a quick look)")
    demo.set_defaults(func=cmd_demo)
    return parser


# Where --json reports go: the real stdout, kept apart while the command runs (see main).
_json_out = None


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2), file=_json_out or sys.stdout, flush=True)


@contextlib.contextmanager
def _stdout_for_json_only() -> Iterator[None]:
    """Everything written to stdout while the command runs goes to stderr, so that stdout holds
    the JSON report alone: Ray prints its workers' errors to the driver's stdout (a killed
    embedding actor, retried, printed two lines before the report)."""
    global _json_out
    try:
        redirect = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: not a file (captured)
        redirect = False
    if not redirect:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _json_out = os.fdopen(saved, "w")
    try:
        yield
    finally:
        sys.stdout.flush()
        _json_out.flush()
        os.dup2(saved, 1)
        _json_out.close()
        _json_out = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir is not None:
        os.environ["XMODAL_DATA"] = str(args.data_dir)
    if getattr(args, "milvus_uri", "unset") is None:
        args.milvus_uri = settings.default_milvus_uri()
    try:
        with _stdout_for_json_only() if getattr(args, "json", False) else contextlib.nullcontext():
            return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError, MissingExtra) as exc:
        print(f"xmodal: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
