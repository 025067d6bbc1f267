"""Indexing benchmark (issue 6, item 8): what the Ray pipeline of `xmodal index` sustains.

  1. items/s with 1 vs 2 embedding workers (in-process ONNX Runtime actors, `--local`, one
     intra-op thread each, so the comparison is about the workers), every image xmodal-data
     holds (the emoji and Iconify manifests, ~11k) (target: 2 workers >= 1.7x one, judged on
     the steady rate: items/s once the first batch is back; the whole run's ratio, which also
     counts the fixed start-up of a few seconds, is reported beside it);
  2. the whole pipeline (read, check, embed, write into milvus-lite) vs the encoder alone
     on the same items: the same preprocessing and ONNX session in one process, its files
     read in a loop, ONNX Runtime's default threads (target: pipeline >= 0.8x);
  3. peak memory of an indexing run over 10k vs 100k items (target: within 15%), sampled
     from /proc every 0.2 s for the driver, the Ray processes and milvus-lite (RSS and PSS:
     Ray's object store is shared memory that RSS counts once per process mapping it). Run
     over synthetic distinct captions (the text encoder is cheap; 100k images would take
     ~25 min here); the pipeline's memory does not depend on what an item is.

milvus-lite's insert rate, search latency and ANN recall at 100k and 1M rows are measured by
benchmarks/query.py (docs/query-benchmark.md), not here.

    .venv/bin/python benchmarks/indexing.py                 # all, writes benchmarks/results/indexing.json
    .venv/bin/python benchmarks/indexing.py --quick         # small sizes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "xmodal-data" / "emoji" / "manifest.jsonl"
IMAGE_MANIFESTS = (MANIFEST, ROOT / "xmodal-data" / "iconify" / "manifest.jsonl")
REPOSITORY = ROOT / "xmodal-data" / "model_repository"
PYTHON = sys.executable


# ---- memory of a process tree, from /proc -------------------------------------------------

def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _tree(root: int, also: str | None = None) -> list[int]:
    """`root` and its descendants, and (`also`) the processes whose command line names that
    string with theirs (milvus-lite's server leaves the tree: its parent is not the driver)."""
    children, out, todo = _children(), [], [root]
    if also:
        for pid in [p for pids in children.values() for p in pids]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if also.encode() in handle.read():
                        todo.append(pid)
            except OSError:
                pass
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _group(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "ray"
    return "milvus_lite" if "milvus" in command.split(" ")[0] else "ray"


class TreeMemory(threading.Thread):
    """Samples the RSS and PSS (MiB) of a process and its descendants until stopped; keeps the peaks."""

    def __init__(self, pid: int, every: float = 0.2, also: str | None = None):
        super().__init__(daemon=True)
        self.pid, self.every, self.also = pid, every, also
        self.peak: dict[str, float] = {}
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            sums: dict[str, float] = {}
            for pid in _tree(self.pid, self.also):
                group = _group(pid, self.pid)
                rss = _kib(f"/proc/{pid}/status", "VmRSS:") / 1024
                pss = _kib(f"/proc/{pid}/smaps_rollup", "Pss:") / 1024
                for name, value in ((f"{group}_rss", rss), (f"{group}_pss", pss)):
                    sums[name] = sums.get(name, 0.0) + value
                if group != "milvus_lite":
                    sums["pipeline_rss"] = sums.get("pipeline_rss", 0.0) + rss
                    sums["pipeline_pss"] = sums.get("pipeline_pss", 0.0) + pss
                sums["tree_rss"] = sums.get("tree_rss", 0.0) + rss
                sums["tree_pss"] = sums.get("tree_pss", 0.0) + pss
            for name, value in sums.items():
                self.peak[name] = max(self.peak.get(name, 0.0), value)
            self.samples += 1
            self._done.wait(self.every)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        return {name: round(value, 1) for name, value in sorted(self.peak.items())}


# ---- inputs -----------------------------------------------------------------------------------

def caption_manifest(path: Path, items: int) -> Path:
    """`items` distinct captions, two a row, made from the emoji captions (all rows point at one
    existing image: caption indexing never reads it)."""
    base = []
    with open(MANIFEST, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            base.extend(record["captions"])
            image = str((MANIFEST.parent / record["image"]).resolve())
    with open(path, "w", encoding="utf-8") as out:
        for row in range((items + 1) // 2):
            captions = [f"{base[(2 * row + j) % len(base)]} (variant {2 * row + j})" for j in range(2)]
            captions = captions[: items - 2 * row]
            out.write(json.dumps({"id": f"synthetic/{row}", "concept": f"s{row}", "style": "synthetic",
                                  "split": "test", "image": image, "captions": captions}) + "\n")
    return path


def image_manifest(path: Path, manifests: list[Path], limit: int | None = None) -> Path:
    """The rows of `manifests` (those present) in one manifest at `path`, image paths made
    absolute; at most `limit` rows."""
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        for manifest in filter(Path.exists, manifests):
            with open(manifest, encoding="utf-8") as handle:
                for line in handle:
                    if written == limit:
                        return path
                    record = json.loads(line)
                    record["image"] = str((manifest.parent / record["image"]).resolve())
                    out.write(json.dumps(record) + "\n")
                    written += 1
    return path


def image_files(manifest: Path, limit: int | None) -> list[Path]:
    files = []
    with open(manifest, encoding="utf-8") as handle:
        for line in handle:
            files.append(Path(json.loads(line)["image"]))
            if len(files) == limit:
                break
    return files


# ---- 1 and 2: throughput ---------------------------------------------------------------------

def encoder_alone(files: list[Path], batch_size: int, threads: int | None) -> dict[str, float]:
    """The image encoder by itself on the same files: read, preprocess, ONNX, in one process."""
    from xmodal.indexer.local import LocalEmbedder, repository_card

    dims = {level: int(spec["dim"]) for level, spec in repository_card(REPOSITORY).embeddings.items()}
    embedder = LocalEmbedder(str(REPOSITORY), "image", dims, threads)
    embedder.embed_outputs([files[0].read_bytes()])  # session warm-up, as the actors get
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        embedder.embed_outputs([path.read_bytes() for path in files[start:start + batch_size]])
    seconds = time.perf_counter() - started
    return {"items": len(files), "seconds": round(seconds, 3), "items_per_second": round(len(files) / seconds, 2),
            "threads": threads or "onnxruntime default (one per core)"}


def pipeline_run(directory: Path, manifest: Path, items: int | None, workers: int, threads: int | None,
                 batch_size: int) -> dict:
    from xmodal import store
    from xmodal.indexer import IndexJob

    db = directory / f"images-{workers}-{time.monotonic_ns()}.db"
    try:
        report = IndexJob(manifest=manifest, model_repository=REPOSITORY, milvus_uri=str(db), split=None, limit=items,
                          batch_size=batch_size, embed_workers=workers, embed_threads=threads, progress=False).run()
    finally:
        store.release_local(db)
    return {"workers": workers, "threads_per_worker": threads, "items": report.items_read,
            "seconds": round(report.seconds, 3), "items_per_second": round(report.items_per_second, 2),
            "startup_seconds": round(report.startup_seconds, 3),
            # once the first batch is back: Ray Data's actors started and their models loaded
            "steady_items_per_second": round(report.steady_items_per_second, 2),
            "rows_written": report.rows_written, "stage_seconds": report.stage_seconds}


def throughput(directory: Path, items: int | None, repeats: int, batch_size: int) -> dict:
    from xmodal.indexer.pipeline import start_ray

    manifest = image_manifest(directory / "images.jsonl", list(IMAGE_MANIFESTS))
    files = image_files(manifest, items)
    items = len(files)
    print(f"throughput: {items} images, --local, batch {batch_size}", file=sys.stderr)
    start_ray()  # once, before the timed runs: Ray's start-up is not the pipeline's rate
    runs = []
    pipeline_run(directory, manifest, min(items, 2 * batch_size * 2), 2, 1, batch_size)  # warm the workers' imports
    for _ in range(repeats):
        for workers in (1, 2):
            runs.append(pipeline_run(directory, manifest, items, workers, 1, batch_size))
            print(f"  pipeline, {workers} worker(s): {runs[-1]['items_per_second']} items/s, steady "
                  f"{runs[-1]['steady_items_per_second']}, start-up {runs[-1]['startup_seconds']} s", file=sys.stderr)
    alone = encoder_alone(files, batch_size, None)
    alone_one_thread = encoder_alone(files, batch_size, 1)
    print(f"  encoder alone: {alone['items_per_second']} items/s (1 thread: "
          f"{alone_one_thread['items_per_second']})", file=sys.stderr)
    best = {w: max(r["items_per_second"] for r in runs if r["workers"] == w) for w in (1, 2)}
    steady = {w: max(r["steady_items_per_second"] for r in runs if r["workers"] == w) for w in (1, 2)}
    encoder = max(alone["items_per_second"], alone_one_thread["items_per_second"])
    return {"items": items, "batch_size": batch_size, "runs": runs, "best_items_per_second": best,
            "best_steady_items_per_second": steady,
            "encoder_alone": alone, "encoder_alone_one_thread": alone_one_thread,
            # whole runs, Ray Data's actor start-up included (Ray itself was up before)
            "two_vs_one_workers": round(best[2] / best[1], 3),
            "two_vs_one_workers_steady": round(steady[2] / steady[1], 3),
            # the pipeline with 2 workers against the encoder by itself in one process, at its
            # better thread setting
            "pipeline_vs_encoder_alone": round(best[2] / encoder, 3),
            "pipeline_steady_vs_encoder_alone": round(steady[2] / encoder, 3),
            # the stricter one: against two single-threaded encoders' worth (the same compute)
            "pipeline_steady_vs_two_one_thread_encoders": round(
                steady[2] / (2 * alone_one_thread["items_per_second"]), 3)}


# ---- 3: memory -------------------------------------------------------------------------------

def memory_run(directory: Path, items: int, images: Path | None = None) -> dict:
    """Peak memory of `xmodal index` over `items` synthetic captions, or the first `items`
    images of the manifest `images` (e.g. Iconify's, fetched with `--sets all`)."""
    if images is None:
        manifest, what = caption_manifest(directory / f"captions-{items}.jsonl", items), ["--captions"]
    else:
        manifest, what = image_manifest(directory / f"images-{items}.jsonl", [images], items), []
    db = directory / f"memory-{items}.db"
    command = [PYTHON, "-m", "xmodal.cli", "index", *what, "--local", "--model-repository", str(REPOSITORY),
               "--manifest", str(manifest), "--split", "all", "--milvus-uri", str(db), "--workers", "2",
               "--embed-threads", "1", "--json"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeMemory(process.pid, also=str(db))
    sampler.start()
    out, err = process.communicate()
    peak = sampler.stop()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    report = json.loads(out)
    return {"items": items, "seconds": round(time.perf_counter() - started, 2),
            "items_per_second": report["items_per_second"], "rows_written": report["rows_written"],
            "samples": sampler.samples, "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    from xmodal.indexer import DEFAULT_BATCH_SIZE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--image-items", type=int, default=None, help="default: every image (~11k)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--memory-items", default="10000,100000")
    parser.add_argument("--memory-images", type=Path, default=None,
                        help="measure memory over this manifest's images (e.g. xmodal-data/iconify/manifest.jsonl "
                             "after `xmodal data fetch iconify --sets all`) instead of synthetic captions")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: throughput, memory")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "indexing.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_items, args.repeats, args.memory_items = 200, 1, "1000,4000"
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "model_repository": str(REPOSITORY), "targets": {}}
    with tempfile.TemporaryDirectory(prefix="xmodal-index-bench-") as tmp:
        directory = Path(tmp)
        if "throughput" not in skip:
            part = result["throughput"] = throughput(directory, args.image_items, args.repeats, args.batch_size)
            runs = part["runs"]
            result["targets"]["two_workers_vs_one_whole_run"] = {
                "target": "reported: the whole runs, with their fixed start-up (s) "
                          f"{min(r['startup_seconds'] for r in runs)}-{max(r['startup_seconds'] for r in runs)}",
                "measured": part["two_vs_one_workers"], "pass": None}
            for name, key, bound in (("two_workers_vs_one_steady", "two_vs_one_workers_steady", 1.7),
                                     ("pipeline_vs_encoder_alone", "pipeline_vs_encoder_alone", 0.8),
                                     ("pipeline_steady_vs_encoder_alone", "pipeline_steady_vs_encoder_alone", 0.8),
                                     ("pipeline_steady_vs_two_one_thread_encoders",
                                      "pipeline_steady_vs_two_one_thread_encoders", 0.8)):
                result["targets"][name] = {"target": f">= {bound}", "measured": part[key], "pass": part[key] >= bound}
            import ray

            ray.shutdown()
        if "memory" not in skip:
            sizes = [int(n) for n in args.memory_items.split(",")]
            runs = []
            for items in sizes:
                print(f"memory: {items} {'images of ' + str(args.memory_images) if args.memory_images else 'captions'}"
                      ", --local, 2 workers", file=sys.stderr)
                runs.append(memory_run(directory, items, args.memory_images))
                print(f"  peak MiB {runs[-1]['peak_mib']}", file=sys.stderr)
            result["memory"] = {"runs": runs, "input": str(args.memory_images) if args.memory_images else "synthetic captions"}
            small, large = runs[0]["peak_mib"], runs[-1]["peak_mib"]
            growth = {key: round(large[key] / small[key] - 1, 3) for key in small if small[key] > 0 and key in large}
            result["memory"]["growth"] = growth
            for key in ("driver_rss", "pipeline_pss"):
                result["targets"][f"peak_{key}_{sizes[-1]}_vs_{sizes[0]}"] = {
                    "target": "within 15%", "measured": growth.get(key), "pass": abs(growth.get(key, 9)) <= 0.15}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
