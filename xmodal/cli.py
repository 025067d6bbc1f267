"""The `xmodal` command. Each sub-command imports its part lazily, so `xmodal search` never loads torch or ray."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xmodal import settings
from xmodal.training.recipes import RECIPES


def default_manifest() -> Path:
    return settings.data_dir() / "emoji" / "manifest.jsonl"


def default_run(recipe: str = "infonce") -> Path:
    return settings.data_dir() / "runs" / recipe


def cmd_data_fetch(args: argparse.Namespace) -> int:
    if args.corpus == "emoji":
        from xmodal.training.emoji import fetch_emoji

        manifest = fetch_emoji(settings.data_dir(), limit=args.limit, force=args.force)
    else:
        from xmodal.training.iconify import fetch_iconify

        manifest = fetch_iconify(settings.data_dir(), sets=args.sets, max_icons_per_set=args.limit, force=args.force)
    print(f"manifest: {manifest}")
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from xmodal.training.readers import import_corpus

    out = args.out or settings.data_dir() / (args.name or Path(args.source).stem)
    manifest = import_corpus(
        Path(args.source), out, format=args.format, split=args.split, image_root=args.image_root,
        style=args.name, test_fraction=args.test_fraction, image_column=args.image_column,
        caption_column=args.caption_column,
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
    from xmodal.training.train import train

    run = args.out or default_run(args.recipe)
    train(
        resolve_data(args.data), run, recipe=args.recipe, device=args.device, resume=not args.restart,
        minutes=args.minutes, epochs=args.epochs, batch_size=args.batch_size,
    )
    print(f"run: {run}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from xmodal.export.onnx import export_run
    from xmodal.export.repository import write_model_repository

    run = args.run or default_run()
    exported = export_run(run, args.out or run / "onnx")
    print(f"ONNX parity (max abs diff): " + ", ".join(f"{k} {v:.1e}" for k, v in exported.parity.items()))
    repository = write_model_repository(
        args.model_repository or settings.default_model_repository(), exported.card,
        image_onnx=exported.image_onnx, text_onnx=exported.text_onnx, tokenizer_json=exported.tokenizer_json,
    )
    print(f"model {exported.card.name} fingerprint {exported.card.fingerprint}")
    print(f"model repository: {repository}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from xmodal.server import serve

    return serve(
        args.model_repository or settings.default_model_repository(), host=args.host,
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
    )


def cmd_index(args: argparse.Namespace) -> int:
    from xmodal.indexer import index_images

    report = index_images(
        args.manifest or default_manifest(), triton_url=args.triton_url, milvus_uri=args.milvus_uri,
        collection=args.collection, split=None if args.split == "all" else args.split,
        batch_size=args.batch_size, embed_workers=args.workers, ray_address=args.address,
    )
    return 0 if report.rows_written or not report.items_read else 1


def cmd_search(args: argparse.Namespace) -> int:
    from xmodal.client import Client
    from xmodal.client.table import format_hits

    if (args.text is None) == (args.image is None):
        raise ValueError("give either a text query or --image PATH, not both or neither")
    with Client(args.triton_url, args.milvus_uri, args.collection) as client:
        hits = client.search_text(args.text, k=args.k) if args.text is not None else client.search_image(args.image, k=args.k)
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=2))
    else:
        print(format_hits(hits))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
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
    corpus.add_argument("--format", default="auto", choices=["auto", "csv", "jsonl", "karpathy", "parquet", "webdataset"])
    corpus.add_argument("--name", help="the corpus name: its directory under the data dir and its style (default: the source's name)")
    corpus.add_argument("--out", type=Path, help="output directory (default <data>/<name>)")
    corpus.add_argument("--image-root", type=Path, help="where relative image paths start (default: beside the source)")
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
    train.set_defaults(func=cmd_train)

    export = commands.add_parser("export", help="export a run to ONNX, write the card and the Triton model repository")
    export.add_argument("--run", type=Path)
    export.add_argument("--out", type=Path, help="where the ONNX files and card go (default <run>/onnx)")
    export.add_argument("--model-repository", type=Path)
    export.set_defaults(func=cmd_export)

    serve = commands.add_parser("serve", help="run the local Triton server until Ctrl-C")
    serve.add_argument("--model-repository", type=Path)
    serve.add_argument("--host", default=settings.HOST)
    serve.add_argument("--http-port", type=int, default=settings.HTTP_PORT)
    serve.add_argument("--grpc-port", type=int, default=settings.GRPC_PORT)
    serve.add_argument("--metrics-port", type=int, default=settings.METRICS_PORT)
    serve.set_defaults(func=cmd_serve)

    index = commands.add_parser("index", help="embed a manifest's images through Triton into Milvus")
    index.add_argument("--manifest", type=Path)
    index.add_argument("--split", default="test", help="manifest split to index, or 'all' (default test)")
    index.add_argument("--triton-url", default=settings.default_triton_url())
    index.add_argument("--milvus-uri", default=None)
    index.add_argument("--collection", default=settings.IMAGE_COLLECTION)
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--workers", type=int, default=1, help="embedding actors")
    index.add_argument("--address", help="join an existing Ray cluster (default: a local one)")
    index.set_defaults(func=cmd_index)

    search = commands.add_parser("search", help="text -> images or image -> images")
    search.add_argument("text", nargs="?")
    search.add_argument("--image", type=Path)
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--triton-url", default=settings.default_triton_url())
    search.add_argument("--milvus-uri", default=None)
    search.add_argument("--collection", default=settings.IMAGE_COLLECTION)
    search.set_defaults(func=cmd_search)

    demo = commands.add_parser("demo", help="fetch, train, export, serve, index, query: the whole pipeline")
    demo.add_argument("--minutes", type=float, help="training budget")
    demo.add_argument("--limit", type=int, help="only a tiny slice of concepts (for a quick look)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_dir is not None:
        os.environ["XMODAL_DATA"] = str(args.data_dir)
    if getattr(args, "milvus_uri", "unset") is None:
        args.milvus_uri = settings.default_milvus_uri()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError) as exc:
        print(f"xmodal: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
