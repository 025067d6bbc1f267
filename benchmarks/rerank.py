"""The re-ranking second stage through the real server: recall of the first stage alone vs first
stage + re-rank, and the latency the re-rank adds.

For each run (a recipe with a pair scorer: cran, mcsm): export it (encoders + re-ranker), write
its model repository, start the real tritonserver, index the run's held-out images (Ray →
milvus-lite), fill the side store through ``embed_image_side``, then ask every held-out concept's
label: ``Client.search_text`` for the first stage's top N, then ``Reranker.rerank`` (the side
store + Triton's ``rerank_text``) over those N. Text → image R@1/5/10 of both orders, beside the
in-process figures of the run's eval.json (exact search, PyTorch), and p50/p99 of the two calls,
measured in the same run, query after query.

    .venv/bin/python benchmarks/rerank.py                 # cran and mcsm runs under $XMODAL_DATA/runs/benchmark
    .venv/bin/python benchmarks/rerank.py --runs PATH ... --top-n 20 --queries 500

Writes benchmarks/results/rerank.json; ``benchmarks/recipes.py`` puts it into docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from measure import distribution, triton_server  # noqa: E402 - the benchmarks' shared helpers

KS = (1, 5, 10)


def log(message: str) -> None:
    print(f"[rerank] {message}", file=sys.stderr, flush=True)


def recall(ranks: list[int | None]) -> dict[str, float]:
    """R@K in % over queries; a rank is 0-based, None when the answer is not in the list."""
    return {f"R@{k}": round(100.0 * sum(r is not None and r < k for r in ranks) / len(ranks), 2) for k in KS}


def bench_run(run: Path, manifests: list[Path], workdir: Path, top_n: int, max_queries: int | None) -> dict[str, Any]:
    from xmodal.client import Client
    from xmodal.client.rerank import Reranker
    from xmodal.export.onnx import export_run
    from xmodal.export.repository import write_model_repository
    from xmodal.indexer import IndexJob
    from xmodal.indexer.sides import index_sides
    from xmodal.sidestore import SideStore, side_store_path
    from xmodal.training.manifest import read_manifest

    evaluation = json.loads((run / "eval.json").read_text())
    test_styles = evaluation["test_styles"]
    started = time.perf_counter()
    exported = export_run(run, workdir / "onnx")
    repository = write_model_repository(workdir / "model_repository", exported.card, image_onnx=exported.image_onnx,
                                        text_onnx=exported.text_onnx, tokenizer_json=exported.tokenizer_json)
    log(f"{run.name}: exported in {time.perf_counter() - started:.1f} s; re-ranker {exported.card.reranker.kind} "
        f"parity {exported.card.reranker.parity_max_abs_diff}")
    rows = [row for manifest in manifests for row in read_manifest(manifest, split="test", styles=test_styles)]
    queries: dict[str, str] = {}
    for row in rows:
        queries.setdefault(row.concept, row.captions[0])  # each concept's label, as eval.json asks
    concepts = sorted(queries)[:max_queries] if max_queries else sorted(queries)
    with triton_server(repository) as server:
        milvus_uri = str(workdir / "xmodal.db")
        indexed = time.perf_counter()
        for manifest in manifests:
            IndexJob(manifest=manifest, triton_url=server.url, milvus_uri=milvus_uri, split="test", styles=test_styles,
                     progress=False).run()
        sides = index_sides(triton_url=server.url, milvus_uri=milvus_uri, progress=False)
        log(f"{run.name}: indexed {sides.rows} images and their sides in {time.perf_counter() - indexed:.1f} s "
            f"(sides {sides.seconds:.1f} s, {sides.failed} failed)")
        first_ranks, reranked_ranks, first_seconds, rerank_seconds = [], [], [], []
        with Client(server.url, milvus_uri, caption_collection=None) as client, \
                SideStore(side_store_path(milvus_uri, "xmodal_images"), client.card.reranker) as store:
            reranker = Reranker(server.url, client.card, store)
            try:
                for warm in concepts[:5]:  # connections and the sessions' first runs
                    reranker.rerank(queries[warm], client.search_text(queries[warm], k=top_n), top_n)
                for number, concept in enumerate(concepts):
                    text = queries[concept]
                    t0 = time.perf_counter()
                    hits = client.search_text(text, k=top_n)
                    t1 = time.perf_counter()
                    reranked = reranker.rerank(text, hits, top_n)
                    t2 = time.perf_counter()
                    first_seconds.append(t1 - t0)
                    rerank_seconds.append(t2 - t1)
                    first_ranks.append(next((i for i, h in enumerate(hits) if h.concept == concept), None))
                    reranked_ranks.append(next((i for i, h in enumerate(reranked) if h.concept == concept), None))
                    if (number + 1) % 500 == 0:
                        log(f"{run.name}: {number + 1} of {len(concepts)} queries")
            finally:
                reranker.close()
    in_process = evaluation["test"]
    return {
        "run": str(run), "recipe": evaluation["recipe"], "kind": exported.card.reranker.kind,
        "top_n": top_n, "queries": len(concepts), "images": sides.rows, "test_styles": test_styles,
        "served_text_to_image": {"first_stage": recall(first_ranks), "reranked": recall(reranked_ranks)},
        "in_process_text_to_image": {
            "first_stage": {f"R@{k}": round(in_process["global"]["text_to_image"][f"R@{k}"], 2) for k in KS},
            "reranked": {f"R@{k}": round(in_process[f"rerank@{top_n}"]["text_to_image"][f"R@{k}"], 2) for k in KS}
            if f"rerank@{top_n}" in in_process else None,
        },
        "latency": {"first_stage": distribution(first_seconds), "rerank": distribution(rerank_seconds),
                    "whole": distribution([a + b for a, b in zip(first_seconds, rerank_seconds)])},
        "side_store": {"path_name": Path(sides.path).name, "bytes_per_image": 4 * sum(
            math.prod(shape) for shape in exported.card.reranker.shapes.values()),
            "sides_seconds": round(sides.seconds, 1)},
    }


def markdown(summary: dict) -> list[str]:
    """The section docs/results.md carries (benchmarks/recipes.py calls this)."""
    lines = ["## Re-ranking through the server", "",
             f"Written by `benchmarks/rerank.py` ({summary['machine']}). Each run's held-out images indexed "
             "through the real tritonserver into milvus-lite (HNSW), their re-ranker sides into the side store "
             "through `embed_image_side`; then every held-out concept's label asked: `Client.search_text` for the "
             "top N, then `Reranker.rerank` (the side store + Triton's `rerank_text`). Text → image R@K in %; "
             "beside them the run's own in-process figures (PyTorch, exact search). Latency per query, one "
             "client, the two calls timed back to back for every query.", "",
             "| run | N | queries | first stage R@1/5/10 | + re-rank R@1/5/10 | in-process first / + re-rank R@1/5/10 "
             "| first stage p50 / p99 ms | re-rank added p50 / p99 ms | side bytes / image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in summary["results"]:
        served, local, latency = result["served_text_to_image"], result["in_process_text_to_image"], result["latency"]

        def triple(figures: dict | None) -> str:
            return "/".join(f"{figures[f'R@{k}']:.1f}" for k in KS) if figures else "—"

        lines.append(f"| {Path(result['run']).name} | {result['top_n']} | {result['queries']} | "
                     f"{triple(served['first_stage'])} | **{triple(served['reranked'])}** | "
                     f"{triple(local['first_stage'])} / {triple(local['reranked'])} | "
                     f"{latency['first_stage']['p50_ms']:.1f} / {latency['first_stage']['p99_ms']:.1f} | "
                     f"{latency['rerank']['p50_ms']:.1f} / {latency['rerank']['p99_ms']:.1f} | "
                     f"{result['side_store']['bytes_per_image']:,} |")
    return lines + [""]


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only"


def main() -> int:
    from xmodal import settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_runs = [settings.data_dir() / "runs" / "benchmark" / name for name in ("cran", "mcsm")]
    parser.add_argument("--runs", nargs="+", type=Path, default=default_runs)
    parser.add_argument("--data", nargs="+", type=Path, help="manifests (default: the emoji manifest of the data dir)")
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--queries", type=int, help="ask only this many concepts (default: all held-out ones)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rerank.json")
    args = parser.parse_args()
    manifests = args.data or [settings.data_dir() / "emoji" / "manifest.jsonl"]
    summary = {"machine": machine(), "results": []}
    for run in args.runs:
        with tempfile.TemporaryDirectory(prefix=f"xmodal-rerank-{run.name}-") as workdir:
            summary["results"].append(bench_run(run, manifests, Path(workdir), args.top_n, args.queries))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(markdown(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
