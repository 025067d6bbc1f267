"""Figures in the docs, written from the benchmarks' JSON (benchmarks/results/*.json) so that no
figure is typed by hand and none drifts from its run.

    .venv/bin/python benchmarks/render_docs.py

Each rendered block sits between two markers in its document,
``<!-- figures: NAME (benchmarks/render_docs.py; do not edit) -->`` and ``<!-- end figures: NAME -->``;
what is between them is replaced, the prose around them is kept. A block whose JSON is missing
says so instead of showing figures. The benchmarks call ``render()`` after saving their results.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def index_nodes() -> str:
    """docs/scale-out.md: indexing on two nodes against one (benchmarks/index_nodes.py)."""
    result = _load("index_nodes.json")
    if result is None:
        return "No run saved yet (`benchmarks/results/index_nodes.json`)."
    verdict = result["verdict"]
    lines = [f"Run at commit {result['commit']}, {result['items']:,} images, batch {result['batch_size']}, "
             f"an embedding actor of {json.dumps(result['embedding_actor'])} per node:", "",
             "| pair | order | 1 node steady items/s | 2 nodes steady items/s | ratio steady | ratio whole run |",
             "| --- | --- | --- | --- | --- | --- |"]
    for number, pair in enumerate(result["pairs"], 1):
        runs = {run["nodes"]: run for run in pair["runs"]}
        lines.append(f"| {number} | {' then '.join(str(n) for n in pair['order'])} node(s) | "
                     f"{runs[1]['steady_items_per_second']} | {runs[2]['steady_items_per_second']} | "
                     f"{pair['ratio_steady']} | {pair['ratio_whole_run']} |")
    lines += ["", f"Median: **{result['two_nodes_vs_one_steady']}x** steady, "
                  f"{result['two_nodes_vs_one_whole_run']}x over the whole run (start-up included). "
                  f"Target: {verdict['target']}: **{'met' if verdict['met'] else 'missed'}**."]
    return "\n".join(lines)


def query_server() -> str:
    """docs/scale-out.md: the Milvus server against milvus-lite (benchmarks/query.py --stores lite25,server)."""
    result = _load("query.json")
    sizes = [size for size in (result or {}).get("sizes", []) if "server" in size]
    if not sizes:
        return "No run with the server saved yet (`benchmarks/results/query.json`)."
    lines = []
    for size in sizes:
        e2e = size.get("end_to_end", {}).get("latency_1_client", {})
        lines += [f"{size['n']:,} vectors of {size['dim']} dimensions, {size['queries']} queries, top 10 "
                  f"(one client, median of alternating rounds):", "",
                  "| store | index (as Milvus describes it) | recall@10 at the chosen params | search p50 / p99 ms | "
                  "text → Triton → store → hits p50 / p99 ms |", "| --- | --- | --- | --- | --- |"]
        for kind in ("lite25", "server"):
            if kind not in size:
                continue
            store = size[kind]
            chosen = next(t for t in store["tuning"] if t["params"] == store["chosen_params"]["params"])
            search = size["latency_1_client"].get(f"{kind} search", {})
            client = e2e.get(f"Client.search_text -> {kind}", {})
            lines.append(f"| {kind} | {store.get('index_state')} | {chosen['recall@10']} at {chosen['params']} | "
                         f"{search.get('p50_ms')} / {search.get('p99_ms')} | {client.get('p50_ms')} / "
                         f"{client.get('p99_ms')} |")
        numpy_exact = size["latency_1_client"].get("numpy exact", {})
        lines.append(f"| numpy exact search (the floor, in process) | — | 1.0 | {numpy_exact.get('p50_ms')} / "
                     f"{numpy_exact.get('p99_ms')} | — |")
        verdict = size.get("server_verdict")
        if verdict:
            measured, targets = verdict["measured"], verdict["targets"]
            lines += ["", f"The server path against the targets fixed before the run: p50 {measured['p50_ms']} ms "
                          f"(≤ {targets['p50_ms']}), p99 {measured['p99_ms']} ms (≤ {targets['p99_ms']}), recall@10 "
                          f"{measured['recall@10']} at the Client's ef {measured['client_ef']} (≥ {targets['recall@10']}): "
                          f"**{'met' if verdict['met'] else 'missed'}**."]
        lines.append("")
    return "\n".join(lines).rstrip()


BLOCKS: dict[str, tuple[Path, Callable[[], str]]] = {
    "index-nodes": (ROOT / "docs" / "scale-out.md", index_nodes),
    "query-server": (ROOT / "docs" / "scale-out.md", query_server),
}


def render(names: list[str] | None = None) -> list[str]:
    """Write the blocks (all, or `names`) into their documents; the names written. A document
    without a block's markers is an error: the marker says where the figures go."""
    written = []
    for name, (doc, make) in BLOCKS.items():
        if names is not None and name not in names:
            continue
        text = doc.read_text(encoding="utf-8")
        begin = f"<!-- figures: {name} (benchmarks/render_docs.py; do not edit) -->"
        end = f"<!-- end figures: {name} -->"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"{doc}: no block {begin!r} ... {end!r}")
        doc.write_text(pattern.sub(lambda _: f"{begin}\n{make()}\n{end}", text), encoding="utf-8")
        written.append(name)
    return written


if __name__ == "__main__":
    print("rendered: " + ", ".join(render(sys.argv[1:] or None)))
