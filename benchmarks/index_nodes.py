"""Indexing across Ray nodes (issue 23, item 5): a simulated cluster of two nodes of one CPU
each against one node of one CPU, on this machine (tests/raycluster.py: a raylet and an object
store per node, ``ray.cluster_utils.Cluster``).

Each run is `xmodal index --local --address <cluster>` as a user runs it against a cluster
that is already up: one embedding actor per node (``--worker-resources '{"CPU": 0.75}'``: an
actor and a reading task fit on a node of one CPU, two actors do not), one ONNX Runtime thread
each, the demo's model, the same images into a fresh milvus-lite database. Pairs of runs,
the order alternated (1 node first, then 2 nodes first, ...); the ratio of a pair is the
2-node run's items/s over the 1-node run's, and the figure is the median of the pairs.

Target (``TARGET``), fixed before the first run: 2 nodes against one node on the steady rate
(items/s once the first batch is back: the actors started and their models loaded); the whole
run's ratio, the actors' start-up included, is reported beside it. ``verdict`` judges it from
the saved pairs.

    .venv/bin/python benchmarks/index_nodes.py                # writes benchmarks/results/index_nodes.json
    .venv/bin/python benchmarks/index_nodes.py --quick        # a smoke run, written elsewhere
    .venv/bin/python benchmarks/index_nodes.py --verdict-from benchmarks/results/index_nodes.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from indexing import IMAGE_MANIFESTS, REPOSITORY, image_manifest
import measure
from measure import at_least, check, commit, log, save_verdict

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "tests" / "raycluster.py"
TARGET = 1.7  # issue 23 item 5: two nodes / one node, items/s (here the steady rate, as fixed before the first run)
ACTOR = '{"CPU": 0.75}'


class Cluster:
    """tests/raycluster.py in its own process, under its own RAY_TMPDIR."""

    def __init__(self, nodes: int):
        self.temp_dir = tempfile.mkdtemp(prefix="xb", dir="/tmp")  # short: Unix socket paths
        self.env = {**os.environ, "RAY_TMPDIR": self.temp_dir}
        self.process = subprocess.Popen([sys.executable, str(CLUSTER), *["1"] * nodes], env=self.env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.address = self.process.stdout.readline().strip()
        if not self.address:
            raise RuntimeError(f"the {nodes}-node Ray cluster did not start")

    def stop(self) -> None:
        try:
            self.process.communicate("stop\n", timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def index_run(cluster: Cluster, nodes: int, manifest: Path, directory: Path, repository: Path,
              batch_size: int) -> dict:
    db = directory / f"nodes-{nodes}-{os.urandom(4).hex()}.db"
    command = [sys.executable, "-m", "xmodal.cli", "index", "--manifest", str(manifest), "--split", "all", "--local",
               "--model-repository", str(repository), "--milvus-uri", str(db), "--batch-size", str(batch_size),
               "--workers", str(nodes), "--worker-resources", ACTOR, "--embed-threads", "1", "--json",
               "--address", cluster.address]
    run = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"xmodal index on {nodes} node(s) failed:\n{run.stderr[-3000:]}")
    report = json.loads(run.stdout)
    for path in directory.glob(f"{db.name}*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    return {"nodes": nodes, "items": report["items_processed"], "seconds": round(report["seconds"], 3),
            "items_per_second": report["items_per_second"], "startup_seconds": report["startup_seconds"],
            "steady_items_per_second": report["steady_items_per_second"], "rows_written": report["rows_written"],
            "items_per_node": report["items_per_node"]}


def verdict(summary: dict) -> dict:
    """``TARGET`` judged on the saved pairs: the median steady ratio, and every 2-node run's rows
    embedded on both nodes (else the second node measured nothing)."""
    pairs = summary["pairs"]
    steady = round(statistics.median(p["ratio_steady"] for p in pairs), 3)
    both_nodes = all(len(p["runs"][1]["items_per_node"]) == 2 for p in pairs)
    return measure.verdict([at_least("two nodes / one node, steady items/s, median of the pairs", steady, TARGET),
                            check("every 2-node run embedded on both nodes", both_nodes, both_nodes)],
                           pairs=len(pairs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--pairs", type=measure.pairs_count, default=measure.MIN_PAIRS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-repository", type=Path, default=REPOSITORY)
    parser.add_argument("--quick", action="store_true", help="300 items, 3 pairs, not saved over the results")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--verdict-from", type=Path, help="judge this saved result again, measuring nothing")
    args = parser.parse_args(argv)
    if args.verdict_from:
        return measure.verdict_from(args.verdict_from, verdict)
    if args.quick:
        args.items = 300
    out = args.out or ROOT / "benchmarks" / "results" / ("index_nodes-quick.json" if args.quick else "index_nodes.json")
    if not (args.model_repository / "card.json").exists():
        log(f"no model repository at {args.model_repository}: run `make demo` first (or give --model-repository)")
        return 2
    with tempfile.TemporaryDirectory(prefix="xmodal-nodes-") as temp:
        directory = Path(temp)
        manifest = image_manifest(directory / "images.jsonl", list(IMAGE_MANIFESTS), args.items)
        clusters = {1: Cluster(1), 2: Cluster(2)}
        try:
            for nodes, cluster in clusters.items():  # warm-up: imports, the model files in the page cache
                index_run(cluster, nodes, image_manifest(directory / "warm.jsonl", list(IMAGE_MANIFESTS), 4 * args.batch_size),
                          directory, args.model_repository, args.batch_size)
            pairs = []
            for pair in range(args.pairs):
                order = measure.alternating(pair, (1, 2))
                runs = {nodes: index_run(clusters[nodes], nodes, manifest, directory, args.model_repository,
                                         args.batch_size) for nodes in order}
                pairs.append({"order": list(order), "runs": [runs[1], runs[2]],
                              "ratio_steady": round(runs[2]["steady_items_per_second"] / runs[1]["steady_items_per_second"], 3),
                              "ratio_whole_run": round(runs[2]["items_per_second"] / runs[1]["items_per_second"], 3)})
                log(f"pair {pair + 1}: 1 node {runs[1]['steady_items_per_second']} items/s steady, 2 nodes "
                    f"{runs[2]['steady_items_per_second']} (x{pairs[-1]['ratio_steady']}; whole runs "
                    f"x{pairs[-1]['ratio_whole_run']})")
        finally:
            for cluster in clusters.values():
                cluster.stop()
    steady = statistics.median(p["ratio_steady"] for p in pairs)
    whole = statistics.median(p["ratio_whole_run"] for p in pairs)
    summary = {
        "commit": commit(ROOT), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                            "python": platform.python_version()},
        "model_repository": str(args.model_repository), "items": args.items, "batch_size": args.batch_size,
        "embedding_actor": json.loads(ACTOR), "pairs": pairs,
        "two_nodes_vs_one_steady": round(steady, 3), "two_nodes_vs_one_whole_run": round(whole, 3),
    }
    summary["verdict"] = verdict(summary)
    status = save_verdict(out, summary, f"2 nodes vs 1: x{steady:.3f} steady, x{whole:.3f} whole runs")
    if not args.quick and args.out is None:
        import render_docs

        render_docs.render(render_docs.blocks_of(out.name))  # the docs' figures, from the JSON just saved
    return status


if __name__ == "__main__":
    sys.exit(main())
