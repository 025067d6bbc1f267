"""What milvus-lite 2.5.1 searches at each size, whatever index a collection asks for (issue 18
item 8; issue 20 item 3).

    .venv/bin/python benchmarks/store_index.py [--sizes 10000 100000 1000000] [--corpus-npy X.npy]
    .venv/bin/python benchmarks/store_index.py --verdict-from benchmarks/results/store_index.json

Per size, one milvus-lite database opened the way users open one (``store.connect``) holds one
collection per index variant, each made by ``store.create_collection`` with the served card (the
path ``xmodal index`` takes) and filled by ``store.upsert_rows`` (the indexer's writes; ``--fill
insert``: plain inserts of the same size, faster): FLAT,
IVF_FLAT at nlist ``--nlist`` and AUTOINDEX; the store's default (``store.default_index``) is
whichever of them it resolves to (a variant of its own when it is none of them). Vectors: unit
vectors drawn at random (fixed seed; queries drawn the same way, independently), or with
``--corpus-npy`` real ones (queries: corpus points plus noise, as benchmarks/query.py makes them).

1. While a collection fills, at checkpoints around the row count where milvus-lite starts a
   growing segment's interim index (``SOURCE`` below), a probe: recall@10 and latency of a few
   queries at the variant's first search parameters (IVF_FLAT: nprobe 1).
2. After filling: what the API says (flush, describe_index, list_indexes, get_load_state,
   get_collection_stats, segment listings), each answer or refusal recorded.
3. "as filled": recall@10 against exact numpy search (inner product) for every variant and
   search parameter (IVF_FLAT: nprobe 1, 4, 16, 64 and the Client's), and single-query latency
   p50/p99 of each and of numpy's exact search, in alternating rounds (the median over rounds; the
   ratio to numpy taken within each round).
4. "reloaded": every collection released and loaded again (what a process opening the database
   does too), the API asked again, then step 3 again.

The evidence: an index searched as asked gives less recall at nprobe 1 than at 64 and costs less;
equal recall and latency at every nprobe means the nprobe given is not what is searched, and
recall 1.0 at nprobe 1 with FLAT's latency means no index is searched at all.

Targets, fixed before the run (issue 20 item 3): at every size from ``TARGET_SIZE`` up, the
store's default index at the Client's search parameters has recall@10 >= ``TARGET_RECALL`` and a
p50 at most numpy's exact search's, in both phases. Writes ``benchmarks/results/store_index.json``
(``store_index-<name>.json`` with ``--corpus-npy``; sizes run earlier are kept beside this run's),
then renders the docs' blocks of that file (benchmarks/render_docs.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # noqa: E402 - run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))
import measure  # noqa: E402 - the benchmarks' shared helpers
import query  # noqa: E402 - its exact search, query maker, timer and machine record
from measure import at_least, at_most, distribution, log, save_verdict  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = Path("/tmp/xmodal-store-index")
K = 10
# issue 20 item 3: the embedded store at least as fast as exact numpy search, recall@10 >= 0.95,
# from 100,000 vectors up
TARGET_SIZE = 100_000
TARGET_RECALL = 0.95
TARGET_P50_VS_NUMPY = 1.0
PHASES = ("as filled", "reloaded")
# What milvus-lite 2.5.1's source says it does (github.com/milvus-io/milvus-lite at v2.5.1 and
# the milvus segcore it builds, thirdparty/milvus): saved with the result so that the docs render
# it beside the figures that test it.
SOURCE = {
    "segment": "one growing segcore segment per loaded collection (src/segcore_wrapper.cpp: NewSegment(..., "
               "Growing, ...)); flush does nothing (src/milvus_service_impl.cpp: Flush, '// do nothing')",
    "requested_index": "kept as index meta only: milvus-lite never seals a segment, so the IVF_FLAT (nlist) "
                       "or AUTOINDEX asked for is never built",
    "interim_index": "IVF_FLAT_CC",
    "interim_nlist": 100,  # segcore SegcoreConfig nlist_ default; milvus-lite sets no other
    "interim_nprobe": 4,  # SegcoreConfig nprobe_ default; VecIndexConfig::GetSearchConf replaces the caller's
    "max_index_row_count": 1_000_000,  # milvus-lite src/common.h kMaxIndexRow
    "build_ratio": 0.1,  # VecIndexConfig index_build_ratio of IVF_FLAT_CC
    "build_threshold_rows": max(int(1_000_000 * 0.1), 100 * 39),  # VecIndexConfig::GetBuildThreshold
    "flat": "no interim index for FLAT (IndexingRecord: 'Disable growing index for flat'): searched exhaustively",
    "load": "load_collection (and a process opening the database) re-inserts every row from SQLite one at a "
            "time (src/milvus_local.cpp: DoLoadCollection)",
    "index_state": "describe_index reports state Finished and no row counts whatever was built "
                   "(src/milvus_proxy.cpp: ParseIndex)",
}
CHECKPOINTS = (50_000, 99_000, 101_000, 200_000, 500_000)


# -- vectors ------------------------------------------------------------------------------------

def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(n, start + 100_000) - start, dim), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def vectors(n: int, dim: int, queries: int, corpus_npy: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The corpus [n, dim] and the queries, float32 unit rows."""
    if corpus_npy:
        x = np.load(corpus_npy, mmap_mode="r")
        if len(x) < n or x.shape[1] != dim:
            raise SystemExit(f"{corpus_npy} holds {x.shape}; need at least {n} rows of {dim}")
        x = np.ascontiguousarray(x[:n], dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, query.make_queries(x, queries)
    return unit_rows(np.random.default_rng(0), n, dim), unit_rows(np.random.default_rng(1), queries, dim)


def recall_of(found: list[list[int]], truth: np.ndarray) -> float:
    return round(sum(len(set(f) & set(t.tolist())) for f, t in zip(found, truth)) / (len(truth) * K), 4)


# -- the collections --------------------------------------------------------------------------------

def variants(client, names: list[str], nlist: int, nprobes: list[int]) -> dict[str, dict]:
    """name -> {index_type, index_params, collection, searches (search params), client_params,
    default}; the store's default is the variant it resolves to, or one of its own."""
    from xmodal import store

    planned: dict[str, dict] = {}
    for name in names:
        kind = name.upper()
        params = {"nlist": nlist} if kind == "IVF_FLAT" else dict(store.INDEX_PARAMS.get(kind, {}))
        planned[kind] = {"index_type": kind, "index_params": params}
    default = store.default_index(client)
    match = next((name for name, v in planned.items() if (v["index_type"], v["index_params"]) == default), None)
    if match is None:
        match = "default"
        planned[match] = {"index_type": default[0], "index_params": default[1]}
    for name, v in planned.items():
        client_params = store.search_params(None, "", "IP", K, index=v["index_type"])["params"]
        searches = ([{"nprobe": p} for p in sorted(set(nprobes) | {client_params["nprobe"]})]
                    if v["index_type"].startswith("IVF") else [client_params])
        v.update(collection=f"si_{name.lower()}", default=name == match, client_params=client_params,
                 searches=searches)
    return planned


def rows_of(x: np.ndarray, start: int, stop: int) -> list[dict]:
    from xmodal import contract

    return [{"id": query.row_id(start + j), "global": v, "image": f"/synthetic/{start + j}.png",
             "captions": contract.json_list([]), "concept": f"c{(start + j) % 1000}", "style": "synthetic",
             **contract.NO_FILE} for j, v in enumerate(x[start:stop].tolist())]


def search_ids(client, collection: str, q: np.ndarray, params: dict) -> list[list[int]]:
    found = []
    for start in range(0, len(q), 50):
        hits = client.search(collection, data=q[start:start + 50].tolist(), limit=K, anns_field="global",
                             search_params={"metric_type": "IP", "params": params}, output_fields=[])
        found += [[int(h["id"], 16) for h in row] for row in hits]
    return found


def single_search(client, collection: str, q: np.ndarray, params: dict) -> Callable[[int], Any]:
    """One query per call, as the Client sends them (Bounded)."""
    search_params = {"metric_type": "IP", "params": params}

    def call(i: int):
        return client.search(collection, data=[q[i % len(q)].tolist()], limit=K, anns_field="global",
                             search_params=search_params, consistency_level="Bounded", output_fields=[])
    return call


def fill(client, v: dict, x: np.ndarray, probes: dict[int, np.ndarray], q: np.ndarray, method: str) -> dict:
    """Write the corpus in order (`method`: ``store.upsert_rows``, as the indexer does, or
    ``insert``, the same calls as plain inserts), probing at each checkpoint; the rate and the probes."""
    from xmodal import store

    def write(rows: list[dict]) -> None:
        if method == "upsert":
            store.upsert_rows(client, v["collection"], rows)
        else:
            step = store.lite_rows_per_call(rows[0])
            for start in range(0, len(rows), step):
                client.insert(v["collection"], rows[start:start + step])

    stops = sorted(set(probes) | {len(x)})
    started, begin, out = time.perf_counter(), 0, []
    spent = 0.0
    for stop in stops:
        for start in range(begin, stop, 20_000):
            write(rows_of(x, start, min(stop, start + 20_000)))
        begin = stop
        if stop in probes:
            paused = time.perf_counter()
            params = v["searches"][0]
            call = single_search(client, v["collection"], q, params)
            call(0)
            times = query.time_each(call, len(q), max_seconds=10)
            out.append({"rows": stop, "params": params, "recall@10": recall_of(
                search_ids(client, v["collection"], q, params), probes[stop]), **distribution(times)})
            log(f"    {v['index_type']} at {stop:,} rows, {params}: recall@10 {out[-1]['recall@10']}, "
                f"p50 {out[-1]['p50_ms']} ms")
            spent += time.perf_counter() - paused
    seconds = time.perf_counter() - started - spent
    return {"method": "store.upsert_rows" if method == "upsert" else "insert", "seconds": round(seconds, 2),
            "rows_per_s": round(len(x) / seconds, 1), "checkpoints": out}


def api_answers(client, collection: str) -> dict:
    """What milvus-lite answers about the collection's state: each call's answer, or its refusal."""
    def ask(call: Callable[[], Any]) -> Any:
        logging.disable(logging.CRITICAL)  # pymilvus logs every refusal with its traceback
        try:
            begin = time.perf_counter()
            answer = call()
            return {"answer": answer, "ms": round((time.perf_counter() - begin) * 1000, 2)}
        except Exception as exc:  # milvus-lite refuses several (UNIMPLEMENTED): the refusal is the answer
            code = exc.code() if callable(getattr(exc, "code", None)) else None  # a gRPC status
            return {"refused": getattr(code, "name", None) or str(getattr(exc, "message", None) or exc)[:300]}
        finally:
            logging.disable(logging.NOTSET)

    return {
        "flush": ask(lambda: client.flush(collection)),
        "describe_index": ask(lambda: client.describe_index(collection, "global")),
        "list_indexes": ask(lambda: client.list_indexes(collection)),
        "get_load_state": ask(lambda: str(client.get_load_state(collection).get("state"))),
        "get_collection_stats": ask(lambda: client.get_collection_stats(collection)),
        "list_loaded_segments": ask(lambda: [str(s) for s in client.list_loaded_segments(collection)]),
        "list_persistent_segments": ask(lambda: [str(s) for s in client.list_persistent_segments(collection)]),
    }


# What milvus-lite's server logs (LOG_LEVEL=INFO) about a collection's index when it is created.
LOG_LINES = re.compile(r"parseIndexMeta|VecIndexConfig|interim index")
LOG_PROBE = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
from xmodal import contract, store
from xmodal.card import ModelCard
card = ModelCard.load(sys.argv[2])
client = store.connect(sys.argv[3])
store.create_collection(client, "first", card, contract.IMAGE_KIND, index_type="FLAT")  # and xmodal_models
for name, (index_type, params) in json.loads(sys.argv[4]).items():
    print(f"== {name}", file=sys.stderr, flush=True)
    store.create_collection(client, name, card, contract.IMAGE_KIND, index_type=index_type, index_params=params)
    store.ensure_loaded(client, name)
client.close()
store.release_local(sys.argv[3])
"""


def server_log(card_path: Path, planned: dict) -> dict[str, list[str]]:
    """What milvus-lite's server logs at INFO about each variant's index as `store.create_collection`
    makes it, in a database of its own (a process of its own: the level is read when the server starts)."""
    WORK.mkdir(parents=True, exist_ok=True)
    db = WORK / "si-log.db"
    db.unlink(missing_ok=True)
    wanted = {f"si_{name.lower()}": (v["index_type"], v["index_params"]) for name, v in planned.items()}
    done = subprocess.run([sys.executable, "-c", LOG_PROBE, str(ROOT), str(card_path), str(db), json.dumps(wanted)],
                          env=os.environ | {"LOG_LEVEL": "INFO"}, capture_output=True, text=True, timeout=300)
    db.unlink(missing_ok=True)
    out: dict[str, list[str]] = {}
    lines = None
    for line in done.stderr.splitlines():
        if line.startswith("== "):
            lines = out.setdefault(line[3:], [])
        elif lines is not None and LOG_LINES.search(line):
            lines.append(re.sub(r"^\S+ \S+ +\d+ ", "", line))  # glog's date, time and thread left out
    return out


# -- measuring ----------------------------------------------------------------------------------------

def contender_name(name: str, params: dict) -> str:
    return f"{name} {json.dumps(params)}" if params else name


def measure_phase(client, planned: dict, x: np.ndarray, q: np.ndarray, truth: np.ndarray, args) -> dict:
    """Recall@10 of every variant and search parameter, then latencies in alternating rounds."""
    results = []
    calls: dict[str, Callable[[int], Any]] = {"numpy exact": lambda i: query.numpy_search(x, q[i % len(q)])}
    for name, v in planned.items():
        for params in v["searches"]:
            found = search_ids(client, v["collection"], q, params)
            results.append({"variant": name, "index_type": v["index_type"], "params": params,
                            "client_params": params == v["client_params"], "default": v["default"],
                            "recall@10": recall_of(found, truth)})
            calls[contender_name(name, params)] = single_search(client, v["collection"], q, params)
    rounds: dict[str, list[dict]] = {name: [] for name in calls}
    for r in range(args.rounds):
        for name in measure.alternating(r, list(calls)):
            calls[name](0)
            rounds[name].append(distribution(query.time_each(calls[name], len(q), max_seconds=args.seconds,
                                                             min_calls=20)))
    numpy_rounds = rounds.pop("numpy exact")
    for result in results:
        per = rounds[contender_name(result["variant"], result["params"])]
        result.update(latency_summary(per), p50_vs_numpy=round(statistics.median(
            d["p50_ms"] / n["p50_ms"] for d, n in zip(per, numpy_rounds)), 3), rounds=per)
        log(f"    {contender_name(result['variant'], result['params'])}: recall@10 {result['recall@10']}, "
            f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, {result['p50_vs_numpy']}x numpy")
    numpy_exact = latency_summary(numpy_rounds) | {"rounds": numpy_rounds}
    log(f"    numpy exact: p50 {numpy_exact['p50_ms']} ms, p99 {numpy_exact['p99_ms']} ms")
    return {"numpy exact": numpy_exact, "results": results}


def latency_summary(per: list[dict]) -> dict:
    return {"p50_ms": round(statistics.median(d["p50_ms"] for d in per), 3),
            "p99_ms": round(statistics.median(d["p99_ms"] for d in per), 3)}


def run_size(n: int, args, card) -> dict:
    from xmodal import contract, store

    dim = card.dim
    log(f"== {n:,} vectors of {dim} dimensions")
    x, q = vectors(n, dim, args.queries, args.corpus_npy)
    truth = query.exact(x, q)
    probes = {c: query.exact(x[:c], q[:args.probe_queries]) for c in CHECKPOINTS if c < n}
    WORK.mkdir(parents=True, exist_ok=True)
    db = WORK / f"si-{n}{'-npy' if args.corpus_npy else ''}.db"
    for stale in (db, db.with_name(f".{db.name}.lock")):
        stale.unlink(missing_ok=True)
    client = store.connect(db)
    result: dict[str, Any] = {"n": n, "dim": dim, "queries": len(q), "probe_queries": args.probe_queries,
                              "machine": query.machine()}
    try:
        planned = variants(client, args.variants, args.nlist, args.nprobes)
        result["default_index"] = dict(zip(("type", "params"), store.default_index(client)))
        for name, v in planned.items():
            log(f"  {name}: {v['index_type']} {v['index_params']}{' (the default)' if v['default'] else ''}")
            store.create_collection(client, v["collection"], card, contract.IMAGE_KIND, index_type=v["index_type"],
                                    index_params=v["index_params"])
            store.ensure_loaded(client, v["collection"])
            v["fill"] = fill(client, v, x, probes, q[:args.probe_queries], args.fill)
            v["api"] = {"as filled": api_answers(client, v["collection"])}
            log(f"    filled: {v['fill']['rows_per_s']} rows/s; describe_index "
                f"{v['api']['as filled']['describe_index']}")
        result["phases"] = {"as filled": measure_phase(client, planned, x, q, truth, args)}
        for name, v in planned.items():
            begin = time.perf_counter()
            client.release_collection(v["collection"])
            released = time.perf_counter()
            client.load_collection(v["collection"])
            v["reload"] = {"release_s": round(released - begin, 2), "load_s": round(time.perf_counter() - released, 2)}
            v["api"]["reloaded"] = api_answers(client, v["collection"])
            log(f"  {name} reloaded: {v['reload']}")
        result["phases"]["reloaded"] = measure_phase(client, planned, x, q, truth, args)
        result["variants"] = planned
    finally:
        client.close()
        store.release_local(db)
    db.unlink(missing_ok=True)  # a million rows take gigabytes
    result["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return result


# -- the verdict -------------------------------------------------------------------------------------

def default_result(size: dict, phase: str) -> dict | None:
    """The store's default index at the Client's search parameters, in `phase`."""
    return next((r for r in size["phases"].get(phase, {}).get("results", []) if r["default"] and r["client_params"]),
                None)


def verdict(summary: dict) -> dict:
    """Issue 20 item 3 at every saved size from TARGET_SIZE up, in both phases: the default index's
    recall@10 at the Client's parameters, and its p50 against numpy's exact search (the median of
    the rounds' ratios)."""
    checks, rounds = [], []
    for size in summary["sizes"]:
        if size["n"] < TARGET_SIZE:
            continue
        for phase in PHASES:
            found = default_result(size, phase)
            label = (f"{size['n']:,} vectors, {phase}, the default "
                     f"{found['index_type'] + ' ' + json.dumps(found['params']) if found else 'index'}")
            if found:
                rounds.append(len(found["rounds"]))
            checks.append({**at_least(f"{label}: recall@10", found and found["recall@10"], TARGET_RECALL),
                           "size": size["n"], "phase": phase})
            checks.append({**at_most(f"{label}: p50 / numpy exact p50", found and found["p50_vs_numpy"],
                                     TARGET_P50_VS_NUMPY), "size": size["n"], "phase": phase})
    return measure.verdict(checks, pairs=min(rounds) if rounds else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--corpus-npy", default=None,
                        help="real vectors [N, dim] (.npy) instead of random unit vectors; results go to "
                             "store_index-<name>.json")
    parser.add_argument("--variants", default="FLAT,IVF_FLAT,AUTOINDEX",
                        help="index types to build (the store's default is added when it is none of them)")
    parser.add_argument("--fill", choices=("upsert", "insert"), default="upsert",
                        help="write with store.upsert_rows, as the indexer does, or with inserts of the same "
                             "size (faster: for the largest sizes; a reloaded collection is read back from "
                             "SQLite either way)")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobes", default="1,4,16,64", help="IVF search parameters (the Client's is added)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--probe-queries", type=int, default=50, help="queries of each probe while filling")
    parser.add_argument("--rounds", type=measure.pairs_count, default=measure.MIN_PAIRS)
    parser.add_argument("--seconds", type=float, default=6.0, help="at most this long per latency measurement")
    parser.add_argument("--model-repository", default=str(ROOT / "xmodal-data" / "model_repository"))
    parser.add_argument("--out", type=Path, help="the JSON to write (default: under benchmarks/results, named above)")
    parser.add_argument("--no-render", action="store_true", help="save the JSON, render no doc")
    parser.add_argument("--verdict-from", type=Path, help="judge this saved result again, measuring nothing")
    args = parser.parse_args()
    if args.verdict_from:
        return measure.verdict_from(args.verdict_from, verdict)
    args.variants = [v for v in args.variants.split(",") if v]
    args.nprobes = [int(p) for p in args.nprobes.split(",") if p]
    from importlib.metadata import version

    from xmodal.card import ModelCard

    card_path = Path(args.model_repository) / "card.json"
    if not card_path.exists():
        raise SystemExit(f"no served model card at {card_path}: export a model first (xmodal export)")
    card = ModelCard.load(card_path)
    out = args.out or RESULTS / (f"store_index-{Path(args.corpus_npy).stem}.json" if args.corpus_npy
                                 else "store_index.json")
    earlier = json.loads(out.read_text()) if out.exists() else {}
    kept = [size for size in earlier.get("sizes", []) if size["n"] not in args.sizes]
    summary: dict[str, Any] = {
        "commit": measure.commit(ROOT), "milvus-lite": version("milvus-lite"), "pymilvus": version("pymilvus"),
        "model": {"name": card.name, "fingerprint": card.fingerprint, "dim": card.dim},
        "corpus": (f"{args.corpus_npy} (rows normalised; queries: corpus points plus noise)" if args.corpus_npy
                   else "random unit vectors (seed 0; queries: random unit vectors, seed 1)"),
        "source": SOURCE, "args": vars(args), "sizes": kept}
    for n in args.sizes:
        summary["sizes"] = sorted(summary["sizes"] + [run_size(n, args, card)], key=lambda s: s["n"])
        out.write_text(json.dumps(summary, indent=2, default=str) + "\n")  # each size saved as it ends
    summary["server_log"] = server_log(card_path, {name: v for size in summary["sizes"]
                                                   for name, v in size["variants"].items()})
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    summary["verdict"] = verdict(summary)
    status = save_verdict(out, summary, f"{', '.join(f'{n:,}' for n in args.sizes)} vectors")
    if not args.no_render:
        import render_docs

        log("rendered: " + (", ".join(render_docs.render(render_docs.blocks_of(out.name))) or "nothing changed"))
    return status


if __name__ == "__main__":
    sys.exit(main())
