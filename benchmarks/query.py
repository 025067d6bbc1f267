"""Query speed: text -> image latency and QPS, and where the vector store's time goes (issue 7 item 6;
issue 6 item 8's milvus-lite insert rate and recall@10 come from the same run).

    .venv/bin/python benchmarks/query.py [--sizes 100000,1000000] [--stores lite25,server] [--lite25-python PYTHON]
                                         [--rebuild] [--no-triton] [--quick]

The server store (issue 23) is the real Milvus 2.3.5 server (``xmodal milvus start``'s, its data
under the cache directory) with the collection's default server index, HNSW.

Targets, fixed by the issues before any run (the constants below), judged by ``verdict`` from
the saved figures: ``Client.search_text`` end to end (text -> Triton -> store -> hits) with one
client at 1,000,000 vectors on the embedded store (issue 7 item 6) and on the server (issue 23
item 5), and the recall@10 of every store's index against exact search at the parameters the
Client searches with (issue 6 item 8).

The project pins milvus-lite 2.5.1 now (pyproject.toml): the default runs the lite25 store with
this interpreter's milvus-lite. The lite3 store (3.2.2, searched in-process) needs this script
run by an interpreter that has milvus-lite 3.2.2 installed, with ``--stores lite3,lite25
--lite25-python`` naming one that has 2.5.1; its figures below are from such a run.

On one synthetic corpus per size (clustered unit vectors of the served model's dimension: a
mixture of gaussians around 1,000 random centres, normalised; queries are corpus points plus
noise, normalised), side by side in one process:

1. numpy exact search (matmul + argpartition), the floor: p50/p99 for one query, QPS with 1 and
   8 client threads, and the ground truth for recall@10.
2. milvus-lite 3.2.2 (pinned until the switch; pure Python, in-process gRPC server) and milvus-lite
   2.5.1 (the C++ engine, pinned now; its server binary runs under ``--lite25-python``, by default
   this interpreter, whose milvus-lite 2.5.1 starts it on a unix socket; this interpreter's
   pymilvus talks to it).
   Both collections are created with ``xmodal.store`` and the served card, so the real
   ``Client`` can search them. Per store: insert rate, flush and index build time, recall@10 of
   the ANN index against exact search, p50/p99 of one query, QPS with 1 and 8 clients, and the
   breakdown (consistency levels, output fields, search params, the client's per-search
   ``describe_index`` call that it used to make, batches of queries, and for 3.2.2 the engine
   called in-process without gRPC, with a profile of where that time goes).
3. Visibility: a row inserted and searched for at once, per consistency level.
4. Triton: the ``embed_text`` latency through the SDK's embedder, and true end-to-end
   ``Client.search_text`` (text -> Triton -> Milvus -> hits) against each store's collection.

Headline latencies are measured in rounds (at least ``measure.MIN_PAIRS``), the stores and numpy
alternating, and reported as the median over rounds (the machine is small and shared). Built
databases are kept under ``/tmp/xmodal-query-bench`` and reused (``--rebuild`` builds them again).
Writes ``benchmarks/results/query.json`` (``query-quick.json`` with ``--quick``), then renders
the docs' blocks of that file (benchmarks/render_docs.py).

    .venv/bin/python benchmarks/query.py --verdict-from benchmarks/results/query.json   # judge again, measure nothing
"""
from __future__ import annotations

import argparse
import cProfile
import contextlib
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # noqa: E402 - run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))
import measure  # noqa: E402 - the benchmarks' shared helpers
from measure import at_least, at_most, distribution, log, save_verdict, triton_server  # noqa: E402
from xmodal.settings import IMAGE_COLLECTION as COLLECTION  # noqa: E402 - the Client's default collection
CACHE = Path("/tmp/xmodal-query-bench")
RESULTS = ROOT / "benchmarks" / "results"
K = 10
CENTRES = 1000
# issue 7 item 6: text -> image end to end on the embedded store, one client, at TARGET_SIZE vectors
TARGET_SIZE = 1_000_000
TARGET_P50_MS = 15.0
TARGET_P99_MS = 40.0
# issue 6 item 8 (issue 23 item 5 for the server): recall@10 against exact search, every size and store
TARGET_RECALL = 0.95
# issue 23 item 5: the same end to end through the Milvus server, one client, at TARGET_SIZE vectors
SERVER_TARGET_P50_MS = 10.0
SERVER_TARGET_P99_MS = 25.0
# Small insert calls: milvus-lite 2.5.1 slows down sharply once one call carries a few MB of
# vectors (xmodal/store.py splits upserts for the same reason), and the build would measure that.
INSERT_BATCH = 2_000
QUERY_TEXTS = ["red apple", "a smiling face", "cat", "dog with eyes", "green star", "blue heart",
               "a yellow rectangle", "car", "tree in autumn", "sun behind a cloud", "pizza", "rocket"]


# -- corpus ---------------------------------------------------------------------------------------

def corpus(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n clustered unit vectors [n, dim] float32 (cached as .npy, memory-mapped)."""
    path = CACHE / f"corpus-{n}-{dim}-{seed}.npy"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, 100_000):
            m = min(n, start + 100_000) - start
            labels = rng.integers(0, CENTRES, m)
            x = centres[labels] + rng.standard_normal((m, dim)).astype(np.float32) * (0.6 / np.sqrt(dim))
            out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        out.flush()
        del out
        path.with_suffix(".tmp.npy").rename(path)
    return np.load(path, mmap_mode="r")


def make_queries(x: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(x), count, replace=False))
    q = np.asarray(x[rows]) + rng.standard_normal((count, x.shape[1])).astype(np.float32) * (0.3 / np.sqrt(x.shape[1]))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def numpy_search(x: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k ids by inner product, best first."""
    scores = q @ x.T if q.ndim == 2 else (x @ q)[None]
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def exact(x: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    out = []
    for start in range(0, len(q), 64):
        best_scores = None
        best_ids = None
        for lo in range(0, len(x), 200_000):
            block = np.asarray(x[lo:lo + 200_000])
            scores = q[start:start + 64] @ block.T
            ids = np.argpartition(-scores, k, axis=1)[:, :k]
            s = np.take_along_axis(scores, ids, axis=1)
            ids = ids + lo
            if best_scores is None:
                best_scores, best_ids = s, ids
            else:
                cs, ci = np.concatenate([best_scores, s], 1), np.concatenate([best_ids, ids], 1)
                top = np.argsort(-cs, axis=1)[:, :k]
                best_scores, best_ids = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
        order = np.argsort(-best_scores, axis=1)
        out.append(np.take_along_axis(best_ids, order, axis=1))
    return np.concatenate(out)


def row_id(i: int) -> str:
    return f"{i:032x}"


# -- timing ---------------------------------------------------------------------------------------

def time_each(call: Callable[[int], Any], count: int, *, max_seconds: float, min_calls: int = 5) -> list[float]:
    """Durations of call(i) for i in 0..count-1, stopping after max_seconds (at least min_calls)."""
    times: list[float] = []
    started = time.perf_counter()
    for i in range(count):
        begin = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - begin)
        if len(times) >= min_calls and time.perf_counter() - started > max_seconds:
            break
    return times


def throughput(make_call: Callable[[], Callable[[int], Any]], clients: int, count: int, *,
               seconds: float) -> dict[str, Any]:
    """QPS and latency with `clients` threads, each with its own call (connection), for ~`seconds`."""
    calls = [make_call() for _ in range(clients)]
    calls[0](0)  # warm
    stop = threading.Event()
    lat: list[list[float]] = [[] for _ in range(clients)]

    def worker(c: int) -> None:
        i = c
        while not stop.is_set():
            begin = time.perf_counter()
            calls[c](i % count)
            lat[c].append(time.perf_counter() - begin)
            i += clients

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    done = [s for per in lat for s in per]
    return {"clients": clients, "queries": len(done), "seconds": round(elapsed, 2),
            "qps": round(len(done) / elapsed, 2), **distribution(done)}


# -- stores ---------------------------------------------------------------------------------------

class Lite25Server:
    """milvus-lite 2.5.1's server binary on a unix socket, started by another interpreter."""

    def __init__(self, python: str, db: Path) -> None:
        code = ("import sys, warnings; warnings.simplefilter('ignore')\n"
                "from importlib.metadata import version\n"
                "from milvus_lite.server_manager import server_manager_instance as m\n"
                f"uri = m.start_and_get_uri({str(db)!r})\n"
                "print(uri, version('milvus-lite'), version('pymilvus'), flush=True)\n"
                "sys.stdin.read()\n"
                "m.release_all()\n")
        self.process = subprocess.Popen([python, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline().split()
        if not line or not line[0].startswith("unix:"):
            self.close()
            raise RuntimeError(f"milvus-lite 2.5 server did not start under {python}: {line}")
        self.uri, self.version, self.pymilvus = line

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def build_collection(milvus, card, x: np.ndarray, index_type: str, index_params: dict) -> dict:
    from xmodal import contract, store

    store.ensure_collection(milvus, COLLECTION, card, index_type=index_type, index_params=index_params)
    started = time.perf_counter()
    for start in range(0, len(x), INSERT_BATCH):
        block = np.asarray(x[start:start + INSERT_BATCH])
        rows = [{"id": row_id(start + j), "global": v, "image": f"/synthetic/{start + j}.png",
                 "captions": contract.json_list([]), "concept": f"c{(start + j) % CENTRES}", "style": "synthetic", **contract.NO_FILE}
                for j, v in enumerate(block.tolist())]
        milvus.insert(COLLECTION, rows)
        if (start // INSERT_BATCH) % 10 == 9:
            log(f"    inserted {start + len(block)} rows, {time.perf_counter() - started:.0f} s")
    insert_s = time.perf_counter() - started
    begin = time.perf_counter()
    milvus.flush(COLLECTION)
    flush_s = time.perf_counter() - begin
    return {"rows": len(x), "insert_s": round(insert_s, 2), "insert_rows_per_s": round(len(x) / insert_s, 1),
            "flush_s": round(flush_s, 2)}


def lite3_collection(path: Path):
    """milvus-lite 3.2.2's engine object for the collection (it runs in this process)."""
    from milvus_lite.server_manager import server_manager_instance

    _, db, _ = server_manager_instance._servers[str(path.resolve())]  # noqa: SLF001
    return db.get_collection(COLLECTION)


def lite3_wait_indexed(path: Path, timeout: float) -> dict:
    """Wait for milvus-lite 3.2.2's background index build; what share of rows sits in indexed segments."""
    col = lite3_collection(path)
    begin = time.perf_counter()
    with contextlib.suppress(Exception):
        col._wait_for_bg(timeout=timeout)  # noqa: SLF001
    segments = list(col._segment_cache.values())  # noqa: SLF001
    indexed = sum(s.num_rows for s in segments if s.indexes.get("global") is not None)
    total = sum(s.num_rows for s in segments)
    return {"wait_s": round(time.perf_counter() - begin, 2), "segments": len(segments),
            "rows_in_indexed_segments": int(indexed), "rows_in_segments": int(total),
            "index_classes": sorted({type(s.indexes.get("global")).__name__ for s in segments})}


class MilvusServerStore:
    """The real Milvus server, as ``xmodal milvus start`` runs it, on data under `directory`."""

    def __init__(self, directory: Path) -> None:
        from xmodal import milvus_server

        self.directory = directory
        self.uri = milvus_server.start(directory, port=0).uri

    def close(self) -> None:
        from xmodal import milvus_server

        milvus_server.stop(self.directory)


INDEX_STATE_KEYS = ("index_type", "state", "indexed_rows", "total_rows", "pending_index_rows")


def index_state(milvus) -> dict:
    """The vector index as Milvus reports it (``describe_index``), not inferred from counters."""
    described = milvus.describe_index(COLLECTION, "global") or {}
    return {key: described.get(key) for key in INDEX_STATE_KEYS if key in described}


def open_store(kind: str, n: int, args, card, x: np.ndarray) -> dict:
    """Connect (building the collection when not cached); {'uri', 'milvus', 'build', ...}."""
    from pymilvus import MilvusClient

    from xmodal import contract, store

    if kind == "server":
        index_type, index_params = store.DEFAULT_INDEX_TYPE, dict(store.DEFAULT_INDEX_PARAMS)
    elif kind == "lite3" and args.lite3_index.upper() == "HNSW":
        index_type, index_params = store.DEFAULT_INDEX_TYPE, dict(store.DEFAULT_INDEX_PARAMS)
    elif kind == "lite3":
        index_type, index_params = args.lite3_index.upper(), {"nlist": args.nlist}
    else:
        index_type, index_params = "IVF_FLAT", {"nlist": args.nlist}
    # milvus-lite takes database names of at most 36 characters; real vectors are always rebuilt
    db = CACHE / f"{kind}-{index_type.lower()}-{n}-{x.shape[1]}{'-npy' if args.corpus_npy else ''}" \
        f"{'' if kind == 'server' else '.db'}"  # the server's: its data directory
    marker = db.with_suffix(".build.json")
    if args.rebuild or args.corpus_npy or not marker.exists():
        if db.is_dir():
            shutil.rmtree(db)
        elif db.exists():
            db.unlink()
        marker.unlink(missing_ok=True)
    info: dict[str, Any] = {"kind": kind, "db": str(db), "index_type": index_type, "index_params": index_params}
    if kind == "server":
        server = MilvusServerStore(db)
        info.update(uri=server.uri, server=server, versions={})
    elif kind == "lite25":
        server = Lite25Server(args.lite25_python, db)
        info.update(uri=server.uri, server=server, versions={"milvus-lite": server.version,
                                                               "pymilvus (server side)": server.pymilvus})
    else:
        from importlib.metadata import version
        info.update(uri=str(db), server=None, versions={"milvus-lite": version("milvus-lite")})
    milvus = MilvusClient(uri=info["uri"])
    info["milvus"] = milvus
    with contextlib.suppress(Exception):
        info["versions"]["server"] = milvus.get_server_version()
    if marker.exists():
        info["build"] = json.loads(marker.read_text()) | {"cached": True}
        store.ensure_loaded(milvus, COLLECTION)
    else:
        log(f"  building {kind} {index_type} {index_params} with {n} rows")
        build = build_collection(milvus, card, x, index_type, index_params)
        begin = time.perf_counter()
        if kind == "lite3":
            build["index"] = lite3_wait_indexed(db, args.index_wait)
        else:
            # a Milvus-style server builds indexes of sealed segments asynchronously
            deadline = time.time() + args.index_wait
            while time.time() < deadline:
                d = milvus.describe_index(COLLECTION, "global")
                if d.get("state") == "Finished" and d.get("pending_index_rows", 0) == 0 and \
                        d.get("indexed_rows", 0) >= d.get("total_rows", 0):
                    break
                time.sleep(2)
            build["index"] = {k: v for k, v in milvus.describe_index(COLLECTION, "global").items()
                              if k in ("state", "indexed_rows", "total_rows", "pending_index_rows")}
        build["index_build_s"] = round(time.perf_counter() - begin, 2)
        store.ensure_loaded(milvus, COLLECTION)
        log(f"  built: {build}")
        marker.write_text(json.dumps(build))
        info["build"] = build | {"cached": False}
    info["properties_kept"] = store.collection_model(milvus, COLLECTION).get("fingerprint") == card.fingerprint
    info["index_state"] = index_state(milvus)
    return info


def search_call(milvus, q: np.ndarray, *, params: dict, level: str | None = "Bounded",
                output_fields: list[str] | None = None, describe: bool = False, batch: int = 1):
    from xmodal import contract, store

    kwargs: dict[str, Any] = {"output_fields": output_fields or []}
    if level:
        kwargs["consistency_level"] = level

    def call(i: int):
        if describe:  # what Searcher.search did before: describe_index on every call
            store.search_params(milvus, COLLECTION, "IP", K)
        rows = q[(i * batch) % len(q):(i * batch) % len(q) + batch]
        return milvus.search(COLLECTION, data=rows.tolist(), limit=K, anns_field="global",
                             search_params=params, **kwargs)
    return call


def recall(milvus, q: np.ndarray, truth: np.ndarray, params: dict) -> float:
    found = 0
    for start in range(0, len(q), 50):
        res = milvus.search(COLLECTION, data=q[start:start + 50].tolist(), limit=K, anns_field="global",
                            search_params=params, consistency_level="Eventually", output_fields=[])
        for j, hits in enumerate(res):
            got = {int(h["id"], 16) for h in hits}
            found += len(got & set(truth[start + j].tolist()))
    return round(found / (len(q) * K), 4)


def tuning_params(kind: str, args) -> list[dict]:
    if kind == "server":
        return [{"metric_type": "IP", "params": {"ef": ef}} for ef in (16, 32, 64, 128, 256)]
    if kind == "lite3" and args.lite3_index.upper() == "HNSW":
        return [{"metric_type": "IP", "params": {"ef": ef}} for ef in (16, 32, 64, 128)]
    return [{"metric_type": "IP", "params": {"nprobe": p}} for p in (4, 8, 16, 32, 64)]


def bench_store(info: dict, q: np.ndarray, truth: np.ndarray, args, budget: float) -> dict:
    """Recall per search param, then the breakdown at the chosen one (single client)."""
    milvus, kind = info["milvus"], info["kind"]
    out: dict[str, Any] = {"tuning": []}
    rq, rt = q[:args.recall_queries], truth[:args.recall_queries]
    search_call(milvus, q, params=tuning_params(kind, args)[0])(0)  # warm
    for params in tuning_params(kind, args):
        call = search_call(milvus, q, params=params, level="Eventually")
        times = time_each(call, len(q), max_seconds=budget, min_calls=5)
        r = recall(milvus, rq, rt, params) if args.recall_queries else None
        row = {"params": params["params"], "recall@10": r, **distribution(times)}
        out["tuning"].append(row)
        log(f"    {kind} {params['params']}: recall@10 {r} p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms")
    good = [t for t in out["tuning"] if (t["recall@10"] or 0) >= TARGET_RECALL]
    chosen = min(good, key=lambda t: t["p50_ms"]) if good else max(out["tuning"], key=lambda t: t["recall@10"] or 0)
    out["chosen_params"] = {"metric_type": "IP", "params": chosen["params"]}
    params = out["chosen_params"]
    from xmodal import contract, store
    fields = list(contract.IMAGE_KIND.output_fields)
    variants = {
        "before: Bounded, 4 output fields, describe_index per search": dict(level="Bounded", output_fields=fields,
                                                                             describe=True),
        "Strong, no output fields": dict(level="Strong"),
        "Bounded, no output fields": dict(level="Bounded"),
        "Session, no output fields": dict(level="Session"),
        "Eventually, no output fields": dict(level="Eventually"),
        "collection default level, no output fields": dict(level=None),
        "Bounded, 4 output fields": dict(level="Bounded", output_fields=fields),
        "Bounded, 4 output fields, batch of 8 (per call)": dict(level="Bounded", output_fields=fields, batch=8),
        "describe_index alone": None,
    }
    out["variants"] = {}
    for name, kw in variants.items():
        if kw is None:
            call = lambda i: milvus.describe_index(COLLECTION, "global")  # noqa: E731
        else:
            call = search_call(milvus, q, params=params, **kw)
        call(0)
        out["variants"][name] = distribution(time_each(call, len(q), max_seconds=budget, min_calls=5))
        log(f"    {kind} {name}: {out['variants'][name]}")
    return out


def lite3_engine(info: dict, q: np.ndarray, params: dict, budget: float) -> dict:
    """milvus-lite 3.2.2's Collection.search called in this thread: no gRPC, no pymilvus; profiled."""
    col = lite3_collection(Path(info["db"]))

    def call(i: int):
        return col.search([q[i % len(q)].tolist()], top_k=K, metric_type="IP", anns_field="global",
                          output_fields=[], search_params=params["params"])
    call(0)
    times = time_each(call, len(q), max_seconds=budget, min_calls=5)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(min(5, len(q))):
        call(i)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    total = stats.total_tt / min(5, len(q))
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, callers) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "own_ms_per_query": round(tt / 5 * 1000, 2),
                     "cumulative_ms_per_query": round(ct / 5 * 1000, 2), "calls_per_query": nc // 5})
    rows.sort(key=lambda r: -r["own_ms_per_query"])
    return {"engine_direct": distribution(times), "profiled_ms_per_query": round(total * 1000, 2),
            "top_own_time": rows[:8]}


def visibility(info: dict, card, dim: int, params: dict) -> dict:
    """Insert a row, search for it at once (per level): seen on the first search? else after how long."""
    from xmodal import contract

    milvus = info["milvus"]
    rng = np.random.default_rng(7)
    out = {}
    for level in ("Strong", "Bounded", "Session", "Eventually"):
        v = rng.standard_normal(dim).astype(np.float32)
        v /= np.linalg.norm(v)
        pk = f"visibility-{level}-{time.time_ns()}"
        milvus.insert(COLLECTION, [{"id": pk, "global": v.tolist(), "image": "/visibility.png", "captions": contract.json_list([]),
                                    "concept": "visibility", "style": "visibility", **contract.NO_FILE}])
        inserted = time.perf_counter()
        first = None
        seen_after = None
        searches = 0
        while time.perf_counter() - inserted < 10:
            res = milvus.search(COLLECTION, data=[v.tolist()], limit=1, anns_field="global", search_params=params,
                                consistency_level=level, output_fields=[])
            searches += 1
            hit = bool(res[0]) and res[0][0]["id"] == pk
            if first is None:
                first = hit
            if hit:
                seen_after = time.perf_counter() - inserted
                break
            time.sleep(0.01)
        milvus.delete(COLLECTION, ids=[pk])
        out[level] = {"seen_by_first_search": first, "seen_after_ms": None if seen_after is None
                      else round(seen_after * 1000, 1), "searches": searches}
    return out


# -- the run ------------------------------------------------------------------------------------------

def machine() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__,
            "pymilvus": version("pymilvus"), "milvus-lite (this venv)": version("milvus-lite"),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}


def run_size(n: int, args, card, repository: Path | None) -> dict:
    dim = card.dim
    log(f"== {n} vectors of {dim} dimensions")
    begin = time.perf_counter()
    if args.corpus_npy:  # real embeddings (e.g. Iconify's, dumped by benchmarks/collection_vectors.py)
        x = np.load(args.corpus_npy, mmap_mode="r")
        if len(x) < n or x.shape[1] != dim:
            raise SystemExit(f"{args.corpus_npy} holds {x.shape}; need at least {n} rows of {dim}")
        x = x[:n]
    else:
        x = corpus(n, dim)
    q = make_queries(x, args.queries)
    truth = exact(x, q)
    log(f"  corpus and exact ground truth: {time.perf_counter() - begin:.1f} s")
    xr = np.ascontiguousarray(x)  # in RAM for the numpy floor
    result: dict[str, Any] = {"n": n, "dim": dim, "queries": len(q)}
    budget = args.seconds

    stores: dict[str, dict] = {}
    try:
        for kind in args.stores:
            stores[kind] = open_store(kind, n, args, card, x)
        for kind, info in stores.items():
            result[kind] = {"versions": info["versions"], "index_type": info["index_type"],
                            "index_params": info["index_params"], "build": info["build"],
                            "card_properties_kept": info["properties_kept"], "index_state": info["index_state"]}
            result[kind].update(bench_store(info, q, truth, args, budget))
            result[kind]["client_params"] = client_params(result[kind])
            info["chosen_params"] = result[kind]["chosen_params"]
            if kind == "lite3":
                result[kind]["engine"] = lite3_engine(info, q, result[kind]["chosen_params"], budget)
                log(f"    lite3 engine: {result[kind]['engine']}")
            result[kind]["visibility"] = visibility(info, card, dim, result[kind]["chosen_params"])
            log(f"    {kind} visibility: {result[kind]['visibility']}")

        # headline: alternating rounds, 1 client; then QPS with 1 and 8 clients
        from pymilvus import MilvusClient
        contenders: dict[str, Callable[[], Callable[[int], Any]]] = {
            "numpy exact": lambda: (lambda i: numpy_search(xr, q[i % len(q)]))}
        from xmodal import contract, store
        for kind, info in stores.items():
            params = result[kind]["chosen_params"]
            contenders[f"{kind} search"] = (
                lambda info=info, params=params: search_call(MilvusClient(uri=info["uri"]), q, params=params,
                                                             level=args.level,
                                                             output_fields=list(contract.IMAGE_KIND.output_fields)))
        rounds: dict[str, list[dict]] = {name: [] for name in contenders}
        calls = {name: make() for name, make in contenders.items()}
        for r in range(args.rounds):
            for name in measure.alternating(r, list(calls)):
                calls[name](0)
                rounds[name].append(distribution(time_each(calls[name], len(q), max_seconds=budget)))
        result["latency_1_client"] = {
            name: {"p50_ms": round(statistics.median(d["p50_ms"] for d in per), 3),
                   "p99_ms": round(statistics.median(d["p99_ms"] for d in per), 3),
                   "rounds": per} for name, per in rounds.items()}
        log(f"  latency, 1 client: { {k: (v['p50_ms'], v['p99_ms']) for k, v in result['latency_1_client'].items()} }")
        result["throughput"] = {}
        for name, make in contenders.items():
            result["throughput"][name] = {c: throughput(make, c, len(q), seconds=args.qps_seconds)
                                          for c in (1, 8)}
            log(f"  QPS {name}: {[(v['clients'], v['qps'], v['p50_ms'], v['p99_ms']) for v in result['throughput'][name].values()]}")

        if repository is not None:
            result["end_to_end"] = end_to_end(stores, repository, args, budget)
    finally:
        for info in stores.values():
            with contextlib.suppress(Exception):
                info["milvus"].close()
            if info.get("server") is not None:
                info["server"].close()
        if "lite3" in stores:
            from xmodal import contract, store
            store.release_local(stores["lite3"]["db"])
    return result


def client_params(store_result: dict) -> dict:
    """The search parameters the Client uses on this store's index (saved with the result; a
    result saved before they were is given today's)."""
    from xmodal import store

    return store_result.get("client_params") or store.search_params(
        None, COLLECTION, "IP", K, index=store_result["index_type"])["params"]


def verdict(summary: dict) -> dict:
    """The targets judged on every saved size: each store's recall@10 at the Client's parameters,
    and at ``TARGET_SIZE`` the end-to-end latency through each store that has a target. Each
    check names its size and store; ``pairs`` is the fewest rounds a size's medians are of."""
    checks, rounds = [], []
    for size in summary["sizes"]:
        n = size["n"]
        rounds += [len(v["rounds"]) for v in size["latency_1_client"].values()]
        for kind in STORE_KINDS:
            if kind not in size:
                continue
            params = client_params(size[kind])
            recall = next((t["recall@10"] for t in size[kind]["tuning"] if t["params"] == params), None)
            checks.append({**at_least(f"{n:,} vectors, {kind}: recall@10 at the Client's {params}", recall,
                                      TARGET_RECALL), "size": n, "store": kind})
            bounds = {"lite25": (TARGET_P50_MS, TARGET_P99_MS),
                      "server": (SERVER_TARGET_P50_MS, SERVER_TARGET_P99_MS)}.get(kind)
            if n != TARGET_SIZE or bounds is None:
                continue
            latency = size.get("end_to_end", {}).get("latency_1_client", {}).get(f"Client.search_text -> {kind}", {})
            for percentile, bound in zip(("p50_ms", "p99_ms"), bounds):
                checks.append({**at_most(f"{n:,} vectors, {kind}: Client.search_text end to end, one client, "
                                         f"{percentile.replace('_ms', '')} ms", latency.get(percentile), bound),
                               "size": n, "store": kind})
    return measure.verdict(checks, pairs=min(rounds) if rounds else None)


def end_to_end(stores: dict, repository: Path, args, budget: float) -> dict:
    from xmodal import contract
    from xmodal.client import Client
    from xmodal import triton as tri

    out: dict[str, Any] = {}
    with triton_server(repository) as server:
        embedder = tri.Embedder(server.url, contract.EMBED_TEXT, contract.TEXT_INPUT, timeout=10)
        texts = [t.encode() for t in QUERY_TEXTS]
        embedder.embed_outputs([texts[0]], [contract.GLOBAL])
        # A store where no model record can be read (milvus-lite 2.5.1 before xmodal.store kept
        # the record in its metadata collection) fails the Client's model check: against it the
        # same sequence runs by hand (the Client's embedder, then a search with the Client's
        # settings).
        clients = {kind: Client(server.url, info["uri"], caption_collection=None)
                   for kind, info in stores.items() if info["properties_kept"]}
        from pymilvus import MilvusClient
        from xmodal import contract, store
        manual = {}
        for kind, info in stores.items():
            if kind in clients:
                continue
            milvus = MilvusClient(uri=info["uri"])
            manual[kind] = milvus
            embedder_client = next(iter(clients.values())) if clients else None
            params = info["chosen_params"]

            def by_hand(text, milvus=milvus, params=params, embedder_client=embedder_client):
                v = embedder.embed_outputs([text.encode()], [contract.GLOBAL])[0][contract.GLOBAL]
                return milvus.search(COLLECTION, data=v.tolist(), limit=K, anns_field="global",
                                     search_params=params, consistency_level=args.level,
                                     output_fields=list(contract.IMAGE_KIND.output_fields))
            clients[kind + " (embed + search by hand)"] = type("ByHand", (), {
                "search_text": staticmethod(lambda text, k=K, f=by_hand: f(text)),
                "close": staticmethod(lambda m=milvus: m.close())})()
        try:
            calls: dict[str, Callable[[int], Any]] = {
                "embed_text (Triton, SDK embedder)": lambda i: embedder.embed_outputs([texts[i % len(texts)]],
                                                                                       [contract.GLOBAL])}
            for kind, client in clients.items():
                client.search_text(QUERY_TEXTS[0], k=K)
                calls[f"Client.search_text -> {kind}"] = (
                    lambda i, client=client: client.search_text(QUERY_TEXTS[i % len(QUERY_TEXTS)], k=K))
            rounds: dict[str, list[dict]] = {name: [] for name in calls}
            for r in range(args.rounds):
                for name in measure.alternating(r, list(calls)):
                    rounds[name].append(distribution(time_each(calls[name], 200, max_seconds=budget)))
            out["latency_1_client"] = {
                name: {"p50_ms": round(statistics.median(d["p50_ms"] for d in per), 3),
                       "p99_ms": round(statistics.median(d["p99_ms"] for d in per), 3), "rounds": per}
                for name, per in rounds.items()}
            log(f"  end to end, 1 client: { {k: (v['p50_ms'], v['p99_ms']) for k, v in out['latency_1_client'].items()} }")
            out["throughput"] = {}
            for kind, client in clients.items():
                name = f"Client.search_text -> {kind}"
                # one Client shared by the threads, as an application would (one HTTP connection a thread)
                out["throughput"][name] = {
                    c: throughput(lambda client=client: (lambda i: client.search_text(
                        QUERY_TEXTS[i % len(QUERY_TEXTS)], k=K)), c, 200, seconds=args.qps_seconds)
                    for c in (1, 8)}
                log(f"  QPS {name}: {[(v['clients'], v['qps'], v['p50_ms'], v['p99_ms']) for v in out['throughput'][name].values()]}")
        finally:
            embedder.close()
            for client in clients.values():
                client.close()
    return out


STORE_KINDS = ("lite3", "lite25", "server")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--stores", default="lite25",
                        help="lite25 (milvus-lite 2.5.1, the pinned store), server (the Milvus 2.3.5 server of "
                             "xmodal milvus start) and/or lite3 (3.2.2: this interpreter must have it installed)")
    parser.add_argument("--lite25-python", default=sys.executable,
                        help="an interpreter with milvus-lite 2.5.x installed (the server binary it starts is "
                             "used); default this one")
    parser.add_argument("--model-repository", default=str(ROOT / "xmodal-data" / "model_repository"))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0, help="at most this long per latency measurement")
    parser.add_argument("--qps-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=measure.pairs_count, default=measure.MIN_PAIRS)
    parser.add_argument("--level", default="Bounded", help="consistency level of the headline store searches")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--lite3-index", default="HNSW",
                        help="milvus-lite 3.2.2's index (HNSW, the project default; IVF_FLAT builds faster at 1M)")
    parser.add_argument("--index-wait", type=float, default=1800.0)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--corpus-npy", default=None,
                        help="real vectors [N, dim] (.npy) instead of the synthetic clusters; results go to "
                             "query-<name>.json, rendered where a doc's block reads that file")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes and budgets; writes query-quick.json only")
    parser.add_argument("--verdict-from", type=Path, help="judge this saved result again, measuring nothing")
    args = parser.parse_args()
    if args.verdict_from:
        return measure.verdict_from(args.verdict_from, verdict)
    args.stores = [s for s in args.stores.split(",") if s]
    if args.quick:
        args.sizes = "20000" if args.sizes == parser.get_default("sizes") else args.sizes
        args.queries, args.recall_queries, args.seconds, args.qps_seconds = 50, 50, 3, 3
    from xmodal.card import ModelCard

    repository = Path(args.model_repository)
    card_path = repository / "card.json"
    if card_path.exists():
        card = ModelCard.load(card_path)
    else:
        raise SystemExit(f"no served model card at {card_path}: export a model first (xmodal export)")
    summary: dict[str, Any] = {"machine": machine(), "model": {"name": card.name, "fingerprint": card.fingerprint,
                                                               "dim": card.dim},
                               "args": {k: v for k, v in vars(args).items()}, "sizes": []}
    out = RESULTS / ("query-quick.json" if args.quick else
                     f"query-{Path(args.corpus_npy).stem}.json" if args.corpus_npy else "query.json")
    sizes = [int(s) for s in args.sizes.split(",")]
    # sizes run earlier (another invocation) are kept beside this run's, each with its own machine record
    earlier = json.loads(out.read_text()) if out.exists() else {}
    kept = [dict(s, machine=s.get("machine", earlier.get("machine"))) for s in earlier.get("sizes", [])
            if s["n"] not in sizes]
    for n in sizes:
        result = run_size(n, args, card, None if args.no_triton else repository)
        result["machine"] = summary["machine"] | {"load_average_after": [round(v, 2) for v in os.getloadavg()]}
        result["args"] = summary["args"]
        summary["sizes"].append(result)
        summary["sizes"] = sorted(kept + [s for s in summary["sizes"] if s not in kept], key=lambda s: s["n"])
        out.write_text(json.dumps(summary, indent=2, default=str) + "\n")  # each size saved as it ends
    summary["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    summary["verdict"] = verdict(summary)
    import render_docs

    log(render_docs.query_sizes(summary))
    status = save_verdict(out, summary, f"{', '.join(f'{n:,}' for n in sizes)} vectors")
    if not args.quick:
        log("rendered: " + ", ".join(render_docs.render(render_docs.blocks_of(out.name))))
    return status


if __name__ == "__main__":
    sys.exit(main())
