"""Indexing benchmark (issue 6, item 8): what the Ray pipeline of `xmodal index` sustains.

  1. items/s with 1 vs 2 embedding workers (in-process ONNX Runtime actors, `--local`, one
     intra-op thread each, so the comparison is about the workers), every image xmodal-data
     holds (the emoji and Iconify manifests). Each run is a whole `xmodal index` process timed
     from outside, as a user sees it: Ray's start-up, the actors' and their models' included.
     The target (``WORKERS_TARGET``) is judged on that whole run; the steady rate (items/s once
     the first batch is back) is reported beside it;
  2. the whole pipeline (read, check, embed, write into milvus-lite) vs the encoder alone
     on the same items: the same preprocessing and ONNX session in one process, its files
     read in a loop, at its better thread setting (``PIPELINE_TARGET``, on the 2-worker whole run).
     1, 2 and the encoder alone run in rounds, the order reversed from one round to the next;
     each ratio is taken within a round and the figure is its median over the rounds;
  3. peak memory of an indexing run over 10k vs 100k items (``MEMORY_GROWTH_TARGET``), sampled
     from /proc every 0.2 s for the driver, the Ray processes and milvus-lite (RSS and PSS:
     Ray's object store is shared memory that RSS counts once per process mapping it). Run
     over synthetic distinct captions (the text encoder is cheap, so a large run stays short);
     the pipeline's memory does not depend on what an item is.

``verdict`` judges the targets from the saved figures. milvus-lite's insert rate, search
latency and ANN recall at 100k and 1M rows are measured by benchmarks/query.py
(docs/query-benchmark.md), not here.

    .venv/bin/python benchmarks/indexing.py                 # all, writes benchmarks/results/indexing.json
                                                            # and its blocks in docs/indexing.md
    .venv/bin/python benchmarks/indexing.py --quick         # small sizes, a smoke run
    .venv/bin/python benchmarks/indexing.py --verdict-from benchmarks/results/indexing.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import measure
from measure import at_least, at_most, log, save_verdict

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "xmodal-data" / "emoji" / "manifest.jsonl"
IMAGE_MANIFESTS = (MANIFEST, ROOT / "xmodal-data" / "iconify" / "manifest.jsonl")
REPOSITORY = ROOT / "xmodal-data" / "model_repository"
PYTHON = sys.executable
WORKERS_TARGET = 1.7  # issue 6 item 8: 2 embedding workers / 1, items/s
PIPELINE_TARGET = 0.8  # issue 6 item 8: the whole pipeline / the encoder alone on the same items, items/s
MEMORY_GROWTH_TARGET = 0.15  # issue 6 item 8: peak memory at 100k items against 10k, within 15 %


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


def pipeline_run(directory: Path, manifest: Path, workers: int, batch_size: int) -> dict:
    """One `xmodal index --local` process over `manifest`, timed from outside: the whole run as a
    user sees it (Ray's start-up included), beside the report's steady rate."""
    db = directory / f"images-{workers}-{time.monotonic_ns()}.db"
    command = [PYTHON, "-m", "xmodal.cli", "index", "--manifest", str(manifest), "--split", "all", "--local",
               "--model-repository", str(REPOSITORY), "--milvus-uri", str(db), "--batch-size", str(batch_size),
               "--workers", str(workers), "--embed-threads", "1", "--json"]
    started = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=7200)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"xmodal index with {workers} worker(s) failed:\n{run.stderr[-3000:]}")
    report = json.loads(run.stdout)
    return {"workers": workers, "threads_per_worker": 1, "items": report["items_processed"],
            "seconds": round(seconds, 3), "items_per_second": round(report["items_processed"] / seconds, 2),
            "startup_seconds": round(report["startup_seconds"], 3),
            "steady_items_per_second": report["steady_items_per_second"], "rows_written": report["rows_written"],
            "stage_seconds": report["stage_seconds"]}


def throughput(directory: Path, items: int | None, rounds: int, batch_size: int) -> dict:
    manifest = image_manifest(directory / "images.jsonl", list(IMAGE_MANIFESTS), items)
    files = image_files(manifest, items)
    log(f"throughput: {len(files)} images, --local, batch {batch_size}, {rounds} rounds")
    # the imports and the model files in the page cache, for every round alike
    pipeline_run(directory, image_manifest(directory / "warm.jsonl", list(IMAGE_MANIFESTS), 4 * batch_size), 2,
                 batch_size)
    contenders = {"1 worker": lambda: pipeline_run(directory, manifest, 1, batch_size),
                  "2 workers": lambda: pipeline_run(directory, manifest, 2, batch_size),
                  "encoder alone": lambda: {"default_threads": encoder_alone(files, batch_size, None),
                                            "one_thread": encoder_alone(files, batch_size, 1)}}
    measured_rounds = []
    for index in range(rounds):
        order = measure.alternating(index, list(contenders))
        runs = {name: contenders[name]() for name in order}
        one, two, alone = runs["1 worker"], runs["2 workers"], runs["encoder alone"]
        encoder = max(alone["default_threads"]["items_per_second"], alone["one_thread"]["items_per_second"])
        measured_rounds.append({
            "order": order, "runs": runs,
            "two_vs_one_workers": round(two["items_per_second"] / one["items_per_second"], 3),
            "two_vs_one_workers_steady": round(two["steady_items_per_second"] / one["steady_items_per_second"], 3),
            # against the encoder by itself in one process, at its better thread setting
            "pipeline_vs_encoder_alone": round(two["items_per_second"] / encoder, 3),
            "pipeline_steady_vs_encoder_alone": round(two["steady_items_per_second"] / encoder, 3),
            # the stricter one: against two single-threaded encoders' worth (the same compute)
            "pipeline_steady_vs_two_one_thread_encoders": round(
                two["steady_items_per_second"] / (2 * alone["one_thread"]["items_per_second"]), 3)})
        log(f"  round {index + 1}: 2 vs 1 workers x{measured_rounds[-1]['two_vs_one_workers']} whole run "
            f"(x{measured_rounds[-1]['two_vs_one_workers_steady']} steady); pipeline vs encoder alone "
            f"x{measured_rounds[-1]['pipeline_vs_encoder_alone']}")
    return {"items": len(files), "batch_size": batch_size, "rounds": measured_rounds,
            **{key: round(statistics.median(r[key] for r in measured_rounds), 3) for key in RATIOS}}


# the ratios a throughput round holds; the result keeps the median of each over the rounds
RATIOS = ("two_vs_one_workers", "two_vs_one_workers_steady", "pipeline_vs_encoder_alone",
          "pipeline_steady_vs_encoder_alone", "pipeline_steady_vs_two_one_thread_encoders")


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


def saved_rounds(part: dict) -> list[dict]:
    """The rounds of a saved throughput part. A part saved before rounds were kept holds its runs
    in the order they ran (1 worker, 2 workers, 1, 2, ...: not alternated, and started with Ray
    already up) and one encoder-alone measurement; its rounds are those consecutive pairs."""
    if "rounds" in part:
        return part["rounds"]
    encoder = max(part["encoder_alone"]["items_per_second"], part["encoder_alone_one_thread"]["items_per_second"])
    runs = part["runs"]
    return [{"two_vs_one_workers": round(two["items_per_second"] / one["items_per_second"], 3),
             "two_vs_one_workers_steady": round(two["steady_items_per_second"] / one["steady_items_per_second"], 3),
             "pipeline_vs_encoder_alone": round(two["items_per_second"] / encoder, 3)}
            for one, two in zip(runs[::2], runs[1::2])]


def memory_growth(part: dict) -> dict[str, float]:
    """Each peak of the largest memory run against the smallest's, as a fraction (0.05: +5 %)."""
    small, large = part["runs"][0]["peak_mib"], part["runs"][-1]["peak_mib"]
    return {key: round(large[key] / small[key] - 1, 3) for key in small if small[key] > 0 and key in large}


def verdict(result: dict) -> dict:
    """The targets of the parts the result holds, judged from its saved figures."""
    checks, pairs = [], None
    if "throughput" in result:
        rounds = saved_rounds(result["throughput"])
        pairs = len(rounds)
        checks += [
            at_least("2 workers / 1 worker, items/s of the whole run, median of the rounds",
                     round(statistics.median(r["two_vs_one_workers"] for r in rounds), 3), WORKERS_TARGET),
            at_least("the pipeline (2 workers, whole run) / the encoder alone, items/s, median of the rounds",
                     round(statistics.median(r["pipeline_vs_encoder_alone"] for r in rounds), 3), PIPELINE_TARGET)]
    if "memory" in result:
        runs, growth = result["memory"]["runs"], memory_growth(result["memory"])
        for key, what in (("driver_rss", "the driver's RSS"), ("pipeline_pss", "the pipeline's PSS (driver and Ray)")):
            checks.append(at_most(f"growth of the peak of {what}, {runs[-1]['items']:,} items against "
                                  f"{runs[0]['items']:,}, either way", abs(growth[key]), MEMORY_GROWTH_TARGET))
    return measure.verdict(checks, pairs=pairs)


def main(argv: list[str] | None = None) -> int:
    from xmodal.indexer import DEFAULT_BATCH_SIZE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--image-items", type=int, default=None, help="default: every image xmodal-data holds")
    parser.add_argument("--rounds", type=measure.pairs_count, default=measure.MIN_PAIRS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--memory-items", default="10000,100000")
    parser.add_argument("--memory-images", type=Path, default=None,
                        help="measure memory over this manifest's images (e.g. xmodal-data/iconify/manifest.jsonl "
                             "after `xmodal data fetch iconify --sets all`) instead of synthetic captions")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: throughput, memory")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/indexing.json (indexing-quick.json with --quick)")
    parser.add_argument("--verdict-from", type=Path, help="judge this saved result again, measuring nothing")
    args = parser.parse_args(argv)
    if args.verdict_from:
        status = measure.verdict_from(args.verdict_from, verdict)
        render_saved(args.verdict_from)
        return status
    if args.quick:
        args.image_items, args.memory_items = 200, "1000,4000"
    out = args.out or ROOT / "benchmarks" / "results" / ("indexing-quick.json" if args.quick else "indexing.json")
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "commit": measure.commit(ROOT), "model_repository": str(REPOSITORY)}
    with tempfile.TemporaryDirectory(prefix="xmodal-index-bench-") as tmp:
        directory = Path(tmp)
        if "throughput" not in skip:
            result["throughput"] = throughput(directory, args.image_items, args.rounds, args.batch_size)
        if "memory" not in skip:
            runs = []
            for items in (int(n) for n in args.memory_items.split(",")):
                log(f"memory: {items} {'images of ' + str(args.memory_images) if args.memory_images else 'captions'}"
                    ", --local, 2 workers")
                runs.append(memory_run(directory, items, args.memory_images))
                log(f"  peak MiB {runs[-1]['peak_mib']}")
            result["memory"] = {"runs": runs, "input": str(args.memory_images) if args.memory_images else "synthetic captions"}
            result["memory"]["growth"] = memory_growth(result["memory"])
    result["verdict"] = verdict(result)
    import render_docs

    log(render_docs.indexing(result))
    status = save_verdict(out, result, "indexing")
    render_saved(out)
    return status


def render_saved(out: Path) -> None:
    """The docs' blocks of the result just saved at `out` (docs/indexing.md's, through
    benchmarks/render_docs.py), when it is one of benchmarks/results."""
    import render_docs

    if out.parent.resolve() == render_docs.RESULTS.resolve():
        log("rendered: " + (", ".join(render_docs.render(render_docs.blocks_of(out.name))) or "nothing changed"))


if __name__ == "__main__":
    raise SystemExit(main())
