"""Figures in the docs, written from the benchmarks' JSON (benchmarks/results/*.json) so that no
figure is typed by hand and none drifts from its run: the one renderer of the figures in README.md
and docs/*.md (docs/results.md is one block, the page benchmarks/recipes.py composes).

    .venv/bin/python benchmarks/render_docs.py [NAME ...]    # write every block (or those named)
    .venv/bin/python benchmarks/render_docs.py --check       # exit 1 when a doc differs from its rendering

Each rendered block sits between two markers in its document,
``<!-- figures: NAME (benchmarks/render_docs.py; do not edit) -->`` and ``<!-- end figures: NAME -->``;
what is between them is replaced, the prose around them is kept, and the block is indented as
its opening marker is (a block may sit in a list item). ``BLOCKS`` names each block's document,
the results it reads and the function that writes it. A block whose JSON is missing says so
instead of showing figures. Verdicts are not judged here: each benchmark computes its own into
its JSON (``measure.verdict``), and a block shows what it computed. The benchmarks render the
blocks of the result they saved (``render(blocks_of(name))``); rendering twice writes the same.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import MIN_PAIRS  # noqa: E402 - the benchmarks' shared helpers

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEGIN = "<!-- figures: {} (benchmarks/render_docs.py; do not edit) -->"
END = "<!-- end figures: {} -->"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


# -- shared pieces --------------------------------------------------------------------------------

def state(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "missed"


def figure(value) -> str:
    return "—" if value is None else f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def verdict_table(verdict: dict, checks: list[dict] | None = None) -> list[str]:
    """The verdict the benchmark computed: its checks, and how many pairs its ratios are the
    median of when that is fewer than the benchmarks take now; or only the `checks` given (their
    pairs are the caller's to say)."""
    lines = ["| target (fixed before the run) | measured | |", "| --- | --- | --- |"]
    lines += [f"| {c['target']} | {figure(c['measured'])} | **{state(c['met'])}** |"
              for c in (verdict["checks"] if checks is None else checks)]
    return lines + (pairs_note(verdict.get("pairs"), "pairs") if checks is None else [])


def pairs_note(measured: int | None, what: str) -> list[str]:
    """A line for a figure measured before the benchmarks took ``MIN_PAIRS`` pairs (or rounds)."""
    if measured is None or measured >= MIN_PAIRS:
        return []
    return ["", f"Measured with {measured} {what}; the benchmark now takes {MIN_PAIRS}."]


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# -- docs/scale-out.md ---------------------------------------------------------------------------

def index_nodes(result: dict) -> str:
    """Indexing on two nodes against one (benchmarks/index_nodes.py)."""
    lines = [f"Run at commit {result['commit']}, {result['items']:,} images, batch {result['batch_size']}, "
             f"an embedding actor of {json.dumps(result['embedding_actor'])} per node:", "",
             "| pair | order | 1 node steady items/s | 2 nodes steady items/s | ratio steady | ratio whole run |",
             "| --- | --- | --- | --- | --- | --- |"]
    for number, pair in enumerate(result["pairs"], 1):
        runs = {run["nodes"]: run for run in pair["runs"]}
        lines.append(f"| {number} | {' then '.join(str(n) for n in pair['order'])} node(s) | "
                     f"{runs[1]['steady_items_per_second']} | {runs[2]['steady_items_per_second']} | "
                     f"{pair['ratio_steady']} | {pair['ratio_whole_run']} |")
    lines += ["", f"Median over the pairs: **{result['two_nodes_vs_one_steady']}x** steady, "
                  f"{result['two_nodes_vs_one_whole_run']}x over the whole run (the actors' start-up included).", ""]
    return "\n".join(lines + verdict_table(result["verdict"]))


def query_server(result: dict) -> str:
    """The Milvus server against milvus-lite (benchmarks/query.py --stores lite25,server)."""
    sizes = [size for size in result["sizes"] if "server" in size]
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
        lines += [f"| numpy exact search (the floor, in process) | — | 1.0 | {numpy_exact.get('p50_ms')} / "
                  f"{numpy_exact.get('p99_ms')} | — |", "",
                  "The server path against its targets, as the script judged it:", ""]
        lines += verdict_table(result["verdict"], [c for c in result["verdict"]["checks"]
                                                   if c.get("store") == "server" and c.get("size") == size["n"]])
        lines += pairs_note(size_rounds(size), "rounds") + [""]
    return "\n".join(lines).rstrip()


# -- docs/query-benchmark.md ---------------------------------------------------------------------

STORE_KINDS = ("lite3", "lite25", "server")
STORE_NAMES = {"lite3": "milvus-lite 3.2.2", "lite25": "milvus-lite 2.5.1", "server": "the Milvus server"}


def store_label(kind: str, store: dict) -> str:
    versions = store.get("versions", {})
    if "milvus-lite" in versions:
        return f"{kind} (milvus-lite {versions['milvus-lite']})"
    if "server" in versions:
        return f"{kind} (Milvus {versions['server']})"
    return f"{kind} ({STORE_NAMES[kind]})"


def query_targets(result: dict) -> str:
    """Every target of the query benchmark, as benchmarks/query.py judged it on its saved sizes."""
    checks = result["verdict"]["checks"]
    stores = [kind for kind in STORE_KINDS if any(c.get("store") == kind for c in checks)]
    lead = "; ".join(f"{STORE_NAMES[kind]} ({kind}) "
                     + ("met every target" if all(c["met"] for c in checks if c.get("store") == kind) else
                        f"missed {sum(c['met'] is False for c in checks if c.get('store') == kind)} of "
                        f"{sum(c.get('store') == kind for c in checks)}")
                     for kind in stores)
    lines = [f"By store: {lead}.", "", *verdict_table(result["verdict"], checks)]
    for size in result["sizes"]:
        lines += [line.replace("Measured", f"The {size['n']:,}-vector figures were measured")
                  for line in pairs_note(size_rounds(size), "rounds")]
    return "\n".join(lines)


def size_rounds(size: dict) -> int | None:
    """The fewest rounds a size's headline latencies are the median of (None: not saved)."""
    rounds = [len(v["rounds"]) for v in size["latency_1_client"].values() if "rounds" in v]
    return min(rounds) if rounds else None


def query_sizes(result: dict) -> str:
    """Every size of a benchmarks/query.py result, table by table."""
    return "\n\n".join(size_tables(size) for size in result["sizes"])


def size_tables(size: dict) -> str:
    """One size of a benchmarks/query.py result: the stores, their search parameters, where a
    search's time goes, what a search sees right after an insert, and the headline latencies."""
    n = size["n"]
    machine = size.get("machine", {})
    lines = [f"#### {n:,} vectors ({size['dim']} dimensions, {size['queries']} queries, top 10)", ""]
    if machine:
        lines += [f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; load average "
                  f"{' / '.join(map(str, machine.get('load_average_at_start', [])))} at the start.", ""]
    lines += ["| store | index, params | insert rows/s | flush s | index build s | recall@10 | index as Milvus describes it |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in STORE_KINDS:
        if kind not in size:
            continue
        store, build = size[kind], size[kind]["build"]
        chosen = next((t for t in store["tuning"] if "chosen_params" in store
                       and t["params"] == store["chosen_params"]["params"]), None)
        recalls = [t["recall@10"] for t in store["tuning"]]
        params, recall = ((chosen["params"], chosen["recall@10"]) if chosen else
                          (f"{store['tuning'][0]['params']} to {store['tuning'][-1]['params']}",
                           f"{min(recalls)}–{max(recalls)}"))
        lines.append(f"| {store_label(kind, store)} | {store['index_type']} {store['index_params']}, {params} | "
                     f"{build['insert_rows_per_s']} | {build['flush_s']} | {build.get('index_build_s')} | {recall} | "
                     f"{store.get('index_state', '')} |")
    rounds = size_rounds(size)
    lines += ["", f"One client, median over {rounds} alternating rounds:" if rounds else "One client:", "",
              "| what | p50 ms | p99 ms |", "| --- | --- | --- |"]
    latency = size["latency_1_client"] | size.get("end_to_end", {}).get("latency_1_client", {})
    lines += [f"| {name} | {v['p50_ms']} | {v['p99_ms']} |" for name, v in latency.items()]
    lines += pairs_note(rounds, "rounds")
    lines += ["", "| what | clients | QPS | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    throughput = size["throughput"] | size.get("end_to_end", {}).get("throughput", {})
    lines += [f"| {name} | {clients} | {v['qps']} | {v['p50_ms']} | {v['p99_ms']} |"
              for name, per in throughput.items() for clients, v in per.items()]
    for kind in STORE_KINDS:
        if kind not in size:
            continue
        store = size[kind]
        chosen = (f"params {store['chosen_params']['params']}" if "chosen_params" in store
                  else "the params the run chose")
        lines += ["", f"{store_label(kind, store)}, search params (Eventually, no output fields, 1 client):", "",
                  "| params | recall@10 | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
        lines += [f"| {t['params']} | {t['recall@10']} | {t['p50_ms']} | {t['p99_ms']} |" for t in store["tuning"]]
        lines += ["", f"{store_label(kind, store)}, where a search's time goes ({chosen}, 1 client):", "",
                  "| variant | n | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {d['n']} | {d['p50_ms']} | {d['p99_ms']} |" for name, d in store["variants"].items()]
        if "engine" in store:
            engine = store["engine"]["engine_direct"]
            lines += [f"| engine in-process (no gRPC, no pymilvus) | {engine['n']} | {engine['p50_ms']} | "
                      f"{engine['p99_ms']} |", "", "Profile of the engine call (own time per query, under cProfile):", "",
                      "| function | own ms | cumulative ms | calls |", "| --- | --- | --- | --- |"]
            lines += [f"| `{r['function']}` | {r['own_ms_per_query']} | {r['cumulative_ms_per_query']} | "
                      f"{r['calls_per_query']:,} |" for r in store["engine"]["top_own_time"]]
        lines += ["", f"{store_label(kind, store)}, visibility (insert one row, then search for it at once):", "",
                  "| level | seen by the first search | seen after ms |", "| --- | --- | --- |"]
        lines += [f"| {level} | {v['seen_by_first_search']} | {v['seen_after_ms']} |"
                  for level, v in store["visibility"].items()]
    return "\n".join(lines)


def query_visibility(result: dict) -> str:
    """What a search saw right after an insert, per saved size and store."""
    lines = []
    for size in result["sizes"]:
        for kind in STORE_KINDS:
            if kind not in size:
                continue
            levels = size[kind]["visibility"]
            first = [level for level, v in levels.items() if v["seen_by_first_search"]]
            missed = [level for level in levels if level not in first]
            seen_after = [v["seen_after_ms"] for v in levels.values()]
            lines.append(f"- {size['n']:,} vectors, {store_label(kind, size[kind])}: the first search saw the row at "
                         + (f"{', '.join(first) or 'no level'}" + (f", not at {', '.join(missed)}" if missed else "")
                            if first else "no level")
                         + ("; every level saw it within " + f"{max(seen_after)} ms of the insert"
                            if None not in seen_after else "; some level never saw it within the 10 s allowed")
                         + ".")
    return "\n".join(lines)


def query_log(result: dict) -> str:
    """A benchmarks/query.py run whose JSON was never written, from its log's lines."""
    return "\n".join([f"From the log: {result['note']}", "", size_tables(size_from_log(result["log_lines"]))])


LOG_TUNING = re.compile(r"^(\w+) (\{.*\}): recall@10 ([\d.]+) p50 ([\d.]+) ms p99 ([\d.]+) ms$")
LOG_STORE = re.compile(r"^(\w+) ([^{]+?): (\{.*\})$")  # "<store> <what>: {...}"


def size_from_log(lines: list[str]) -> dict:
    """A size of benchmarks/query.py's JSON, read back from the lines it logs."""
    size: dict = {"latency_1_client": {}, "throughput": {}}
    kind = None
    for line in lines:
        if line.startswith("== "):
            words = line.split()
            size["n"], size["dim"] = int(words[1]), int(words[4])
        elif line.startswith("building "):
            _, kind, index_type, rest = line.split(" ", 3)
            size[kind] = {"index_type": index_type, "index_params": ast.literal_eval(rest.rsplit(" with ", 1)[0]),
                          "tuning": [], "variants": {}}
        elif line.startswith("built: "):
            size[kind]["build"] = ast.literal_eval(line[len("built: "):])
        elif line.startswith("latency, 1 client: "):
            size["latency_1_client"] = {name: {"p50_ms": p50, "p99_ms": p99} for name, (p50, p99) in
                                        ast.literal_eval(line[len("latency, 1 client: "):]).items()}
        elif line.startswith("QPS "):
            name, figures = line[len("QPS "):].rsplit(": ", 1)
            size["throughput"][name] = {clients: {"qps": qps, "p50_ms": p50, "p99_ms": p99}
                                        for clients, qps, p50, p99 in ast.literal_eval(figures)}
        elif match := LOG_TUNING.match(line):
            size[match[1]]["tuning"].append({"params": ast.literal_eval(match[2]), "recall@10": float(match[3]),
                                             "p50_ms": float(match[4]), "p99_ms": float(match[5])})
        elif (match := LOG_STORE.match(line)) and match[1] in STORE_KINDS:
            part = {"engine": "engine", "visibility": "visibility"}.get(match[2])
            if part:
                size[match[1]][part] = ast.literal_eval(match[3])
            else:
                size[match[1]]["variants"][match[2]] = ast.literal_eval(match[3])
    size["queries"] = max(v["n"] for kind in STORE_KINDS if kind in size for v in size[kind]["variants"].values())
    return size


def query_iconify(result: dict) -> str:
    """benchmarks/query.py on real vectors (--corpus-npy): the tables and the verdict."""
    return "\n".join([query_sizes(result), "", "The targets, as the script judged them:", "",
                      *verdict_table(result["verdict"], result["verdict"]["checks"])])


def params_text(params: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in params.items()) or "—"


def index_text(index_type: str, params: dict) -> str:
    """An index type and its parameters, as "IVF_FLAT nlist 1024" ("FLAT" without any)."""
    return f"{index_type} {params_text(params)}" if params else index_type


def answer_text(asked: dict | None, keys: tuple[str, ...] | None = None) -> str:
    """One API answer of benchmarks/store_index.py: the answer (only `keys` of a dict), or the refusal."""
    if asked is None:
        return "—"
    if "refused" in asked:
        return f"refused ({asked['refused']})"
    answer = asked["answer"]
    if keys and isinstance(answer, dict):
        answer = {key: answer.get(key) for key in keys}
    return "`" + json.dumps(answer) + "`"


def store_index(result: dict) -> str:
    """What milvus-lite 2.5.1 searches at each size (benchmarks/store_index.py): its source's
    account, its server's log, the API's answers, the probes while filling, recall and latency
    against numpy's exact search, and the verdict."""
    source = result["source"]
    lines = [f"Run at commit {result['commit']}: milvus-lite {result['milvus-lite']}, pymilvus {result['pymilvus']}; "
             f"{result['corpus']}; top 10; collections made by `store.create_collection` with the card of "
             f"{result['model']['name']!r}, written as each size's table says.", "",
             "From milvus-lite 2.5.1's source (and the segcore it builds):", "",
             "| what | milvus-lite 2.5.1 |", "| --- | --- |"]
    lines += [f"| {key.replace('_', ' ')} | {figure(value)} |" for key, value in source.items()]
    lines += ["", "Its server's log (`LOG_LEVEL=INFO`) as `store.create_collection` makes each collection:", ""]
    for collection, logged in result.get("server_log", {}).items():
        kept = [re.sub(r"^\S+\] \[SERVER\]\[\w+\]\[\w+\]\[\]", "", line).strip() for line in logged]
        lines.append(f"- `{collection}`: " + "; ".join(f"`{line}`" for line in kept if "miss index meta" not in line))
    for size in result["sizes"]:
        machine, variants = size["machine"], size["variants"]
        lines += ["", f"#### {size['n']:,} vectors ({size['dim']} dimensions, {size['queries']} queries)", "",
                  f"Machine: {machine['cpu']}, {machine['cores']} cores; load average "
                  f"{' / '.join(map(str, machine['load_average_at_start']))} at the start. The store's default: "
                  f"{index_text(size['default_index']['type'], size['default_index']['params'])}.", "",
                  "| variant | index asked for | rows/s written (by) | load after release s "
                  "| describe_index (as filled; reloaded alike) | row count | flush | segment listings |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, v in variants.items():
            api = v["api"]["as filled"]
            lines.append(
                f"| {name}{' (default)' if v['default'] else ''} | {index_text(v['index_type'], v['index_params'])} "
                f"| {v['fill']['rows_per_s']} ({v['fill']['method']}) | {v['reload']['load_s']} "
                f"| {answer_text(api['describe_index'], ('state', 'indexed_rows', 'total_rows', 'pending_index_rows'))} "
                f"| {answer_text(api['get_collection_stats'], ('row_count',))} | {answer_text(api['flush'])} "
                f"| {answer_text(api['list_loaded_segments'])} |")
        probes = [(name, p) for name, v in variants.items() for p in v["fill"]["checkpoints"]]
        if probes:
            lines += ["", f"While filling ({size['probe_queries']} queries at each checkpoint):", "",
                      "| variant | rows so far | search params | recall@10 | p50 ms |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| {name} | {p['rows']:,} | {params_text(p['params'])} | {p['recall@10']} | {p['p50_ms']} |"
                      for name, p in probes]
        for phase, measured in size["phases"].items():
            numpy_exact = measured["numpy exact"]
            rounds = min(len(r["rounds"]) for r in measured["results"])
            lines += ["", f"{phase.capitalize()}, one query per search, median over {rounds} alternating rounds "
                          "(the ratio to numpy taken within each round):", "",
                      "| variant | search params | recall@10 | p50 ms | p99 ms | p50 / numpy exact |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['variant']}{' (default)' if r['default'] else ''} | {params_text(r['params'])}"
                      f"{' (the Client’s)' if r['client_params'] else ''} | {r['recall@10']} | {r['p50_ms']} "
                      f"| {r['p99_ms']} | {r['p50_vs_numpy']} |" for r in measured["results"]]
            lines.append(f"| numpy exact search (in process) | — | 1.0 | {numpy_exact['p50_ms']} | "
                         f"{numpy_exact['p99_ms']} | 1.0 |")
            lines += store_index_findings(measured["results"], result["args"].get("nprobes", []))
    lines += ["", "The targets, as the script judged them:", "", *verdict_table(result["verdict"])]
    return "\n".join(lines)


def store_index_findings(results: list[dict], nprobes: list[int]) -> list[str]:
    """What one phase's figures say, computed: IVF_FLAT's recall and p50 at its fewest and most
    lists probed beside FLAT's, and the fastest search at recall@10 >= 0.95 against numpy."""
    out = [""]
    ivf = sorted((r for r in results if r["index_type"] == "IVF_FLAT"), key=lambda r: r["params"].get("nprobe", 0))
    flat = next((r for r in results if r["index_type"] == "FLAT"), None)
    if ivf:
        low, high = ivf[0], ivf[-1]
        out.append(f"- IVF_FLAT at nprobe {low['params']['nprobe']}: recall@10 {low['recall@10']}, p50 "
                   f"{low['p50_ms']} ms; at nprobe {high['params']['nprobe']}: recall@10 {high['recall@10']}, p50 "
                   f"{high['p50_ms']} ms" + (f"; FLAT: recall@10 {flat['recall@10']}, p50 {flat['p50_ms']} ms." if flat
                                             else "."))
    good = [r for r in results if r["recall@10"] >= 0.95]
    if good:
        best = min(good, key=lambda r: r["p50_vs_numpy"])
        out.append(f"- The fastest search with recall@10 >= 0.95: {index_text(best['variant'], best['params'])}, "
                   f"{best['p50_vs_numpy']}x numpy's exact search's p50.")
    else:
        out.append("- No search here reached recall@10 0.95.")
    return out


# -- docs/serving-benchmark.md, docs/serving.md and README.md: benchmarks/serving.py --------------

def serving_benchmark(summary: dict) -> str:
    """The whole report of a benchmarks/serving.py run."""
    m = summary["machine"]
    lines = [
        f"Written from `benchmarks/results/serving.json` ({summary['mode']} run of `benchmarks/serving.py`, "
        f"{summary['total_seconds']:.0f} s) on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, CPU only; Python "
        f"{m['python']}, torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, Triton {m.get('triton', '?')} "
        "(nvidia-pytriton's tritonserver, xmodal's Python-based onnxruntime backend), tritonclient "
        f"{m['tritonclient']}. Load average {' / '.join(map(str, m['load_average_at_start']))} at the start and "
        f"{' / '.join(map(str, m['load_average_at_end']))} at the end: the machine is shared, so every figure is a "
        "ratio of neighbouring measurements or a distribution, and each is the median over rounds with the order "
        "alternating (every round's value is in the JSON).",
        "",
        f"Model: the run `{summary['run']}`, exported again with `export_run`; served FP32 from a repository "
        f"written by `write_model_repository`. Items: {summary['items']['count']} images of "
        f"{', '.join(summary['items']['styles'])} and their label captions. torch and ONNX Runtime: "
        f"{summary['threads']} intra-op threads each, `OMP_WAIT_POLICY={summary['omp_wait_policy']}` (torch's "
        "OpenMP threads otherwise spin at every barrier, which on 2 shared cores stalls eager and slows what runs "
        f"next). INT8: {summary['export']['int8']}.",
        "",
        "## Targets",
        "",
        *verdict_table(summary["verdict"]),
        "",
        "## PyTorch eager vs ONNX Runtime, INT8 vs FP32 (items/s)",
        "",
        "ORT FP32 and INT8 wait passively, as torch does here; \"spinning\" is the same FP32 session with ONNX "
        "Runtime's default spin-waiting intra-op threads, which is how Triton's backend runs it.",
        "",
        "\"eager\" is the module as trained. The export rewrites MiniLM to skip padding tokens in its dense layers "
        "(`BertModel.forward_packed`; equal outputs); \"eager, export's form\" runs that same rewrite in PyTorch, so "
        "ORT / that column is what ONNX Runtime adds beyond the rewrite (an encoder without such a form runs the "
        "same module twice).",
        "",
        "| encoder | batch | eager | eager, export's form | ORT FP32 | ORT INT8 | ORT FP32 spinning | ORT / eager "
        "| ORT / eager, export's form | INT8 / FP32 | spinning / passive |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for encoder, by_batch in summary["encoders"].items():
        for batch, record in by_batch.items():
            rates = record["items_per_s"]
            lines.append(f"| {encoder} | {batch} | {rates['eager']['median']:.1f} "
                         f"| {rates['eager_inference_form']['median']:.1f} | {rates['ort_fp32']['median']:.1f} "
                         f"| {rates['ort_int8']['median']:.1f} | {rates['ort_fp32_spinning']['median']:.1f} "
                         f"| {ratio(record['ort_vs_eager']['median'])} "
                         f"| {ratio(record['ort_vs_eager_inference_form']['median'])} "
                         f"| {ratio(record['int8_vs_fp32']['median'])} | {ratio(record['spinning_vs_passive']['median'])} |")
    lines += ["", "## Triton vs in-process ONNX Runtime", "",
              "In-process: one caller doing the same work on the same items (tokenise or decode + preprocess, then "
              "ORT with passive threads; the bare encoders ORT alone). Triton: N threads, one client each, requests "
              "back to back (the server's ORT threads sleep when idle, as the repository sets them). "
              "Latency is per request as the client saw it; the server columns are Triton's own means per request of "
              "the encoder (queue, compute) and the batch its scheduler achieved.", "",
              "| model | protocol | clients | items / request | Triton items/s | ORT items/s | Triton / ORT "
              "| rounds (min-max) | p50 ms | p99 ms | requests | encoder queue / compute ms | encoder batch |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for record in summary["triton"].values():
        server = record["server"].get("image_encoder" if "image" in record["model"] else "text_encoder", {})
        rounds = record["ratio"]["rounds"]
        lines.append(
            f"| {record['model']} | {record['protocol']} | {record['clients']} | {record['items_per_request']} "
            f"| {record['triton_items_per_s']['median']:.1f} | {record['ort_items_per_s']['median']:.1f} "
            f"| {ratio(record['ratio']['median'])} | {len(rounds)} ({min(rounds):.2f}-{max(rounds):.2f}) "
            f"| {record['latency']['p50_ms']:.2f} | {record['latency']['p99_ms']:.2f} "
            f"| {record['requests']} | {server.get('queue_ms', 0):.2f} / {server.get('infer_ms', 0):.2f} "
            f"| {server.get('batch_achieved')} |")
    lines += pairs_note(min(len(r["ratio"]["rounds"]) for r in summary["triton"].values()), "rounds in some rows")
    query = summary["embed_text_query"]
    lines += ["", "## One `embed_text` query", "",
              f"{query['path']}, served {query.get('precision', 'fp32').upper()} (what `xmodal export --quantize int8` "
              f"serves: INT8 when its gate accepts it): {percentiles(query['latency'])} over {query['latency']['n']} "
              "queries. The same queries in-process (tokenise + ORT), in blocks alternating with them: "
              f"{percentiles(query['in_process_latency'])}. Inside Triton, per request (ms):", "",
              "| model | whole request | queue | compute input | compute infer | compute output |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {model} | {stats['request_ms']:.3f} | {stats['queue_ms']:.3f} | {stats['input_ms']:.3f} "
              f"| {stats['infer_ms']:.3f} | {stats['output_ms']:.3f} |" for model, stats in query["server"].items()]
    lines += ["", "## perf_analyzer", ""] + perf_analyzer_lines(summary)
    sweep = summary["instance_sweep"]
    lines += ["", "## instance_group sweep", "",
              "Every configuration served at once and measured in turn, 16 gRPC clients; items/s. With export's "
              "defaults for the CPU target the server ran "
              + ", ".join(f"{model} {count}" for model, count in sweep["default_without_instance_group"].items())
              + " instance(s).", "",
              "`+ spin`: the encoders' idle ONNX Runtime threads spin (`allow_spinning: \"1\"`, ONNX Runtime's "
              "default); otherwise the repository's default, they sleep.", "",
              "| encoder / preprocess instances | " + " | ".join(sweep["workloads"])
              + f" | geometric mean vs {sweep['baseline']} |",
              "| --- | " + " | ".join("---" for _ in sweep["workloads"]) + " | --- |"]
    lines += [f"| {name} | " + " | ".join(f"{config['items_per_s'][w]['median']:.1f}" for w in sweep["workloads"])
              + f" | {config['vs_baseline']:.2f} |" for name, config in sweep["configs"].items()]
    lines += ["", recommendation(sweep)]
    return "\n".join(lines)


def percentiles(latency: dict) -> str:
    return f"p50 {latency['p50_ms']:.2f} ms, p90 {latency['p90_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms"


def perf_analyzer_lines(summary: dict) -> list[str]:
    analyzer = summary["perf_analyzer"]
    if not analyzer["available"]:
        return [f"Not run: {analyzer['about']}"]
    lines = [f"{analyzer['about']} ({analyzer['path']}), against the same server, with the same items as "
             "`--input-data`; beside it the figure of ours for the same case.", "",
             "| model | protocol | batch | concurrency | perf_analyzer items/s | p50 ms | p99 ms | ours items/s "
             "| ours p50 / p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case in analyzer["cases"]:
        ours = summary["triton"].get(f"{case['model']} {case['protocol']} c{case['concurrency']} b{case['batch']}")
        ours_cells = (f"{ours['triton_items_per_s']['median']:.1f} | {ours['latency']['p50_ms']:.2f} / "
                      f"{ours['latency']['p99_ms']:.2f}" if ours else "— | —")
        head = f"| {case['model']} | {case['protocol']} | {case['batch']} | {case['concurrency']} "
        lines.append(head + (f"| {case['items_per_s']:.1f} | {case['p50_ms']:.2f} | {case['p99_ms']:.2f} | {ours_cells} |"
                             if "items_per_s" in case else
                             f"| failed: {' '.join(case.get('error', []))[:200]} | | | {ours_cells} |"))
    return lines


def recommendation(sweep: dict) -> str:
    chosen = sweep["recommendation"]
    spinning = chosen.get("allow_spinning")
    return (f"The sweep recommends `instance_count={chosen['instance_count']}`, "
            f"`preprocess_instance_count={chosen['preprocess_instance_count']}`"
            + ("" if spinning is None else f", `allow_spinning={spinning}`") + f" ({chosen['why']}).")


def text_encoder_rates(summary: dict, batch: str) -> dict:
    return {name: rate["median"] for name, rate in summary["encoders"]["text_encoder"][batch]["items_per_s"].items()}


def int8_and_query(summary: dict) -> str:
    """The default model's INT8 gate and one embed_text query, served as export serves it."""
    gate, query = summary["export"]["int8_gate"], summary["embed_text_query"]
    directions = ", ".join(f"{direction.replace('_to_', '→')} {gate['fp32'][direction]:.2f} → "
                           f"{gate['int8'][direction]:.2f}" for direction in ("image_to_text", "text_to_image"))
    # Gates recorded before the validation split (training/splits.py) were measured on the test style.
    where = f"{gate.get('split', 'test')} ({', '.join(gate['styles'])})" if "styles" in gate else gate.get("split", "test")
    return (f"For the default model, {gate['metric']} on the {where} images (FP32 → INT8) {directions}: "
            f"{'accepted' if gate['accepted'] else 'refused'}. One `embed_text` query through Triton, served "
            f"{query.get('precision', 'fp32').upper()}, takes p50 {query['latency']['p50_ms']:.2f} ms, p99 "
            f"{query['latency']['p99_ms']:.2f} ms over {query['latency']['n']} queries "
            "(`benchmarks/serving.py`, docs/serving-benchmark.md).")


def int8_gate_record(summary: dict) -> str:
    """The card's int8_gate record as the serving benchmark's export of the default model wrote it."""
    return "\n".join(["```json", '"int8_gate": ' + json.dumps(summary["export"]["int8_gate"], indent=2), "```"])


def int8_single_query(summary: dict) -> str:
    """What per-channel INT8 does to one text query, in the encoder and through Triton."""
    rates = text_encoder_rates(summary, "1")
    return (f"{int8_and_query(summary)} The text encoder alone, one text at a time: {rates['ort_int8']:.1f} items/s "
            f"in INT8 against {rates['ort_fp32']:.1f} in FP32 ({ratio(rates['ort_int8'] / rates['ort_fp32'])}).")


def sleeping_threads(summary: dict) -> str:
    """The sweep's 1/1 with sleeping threads against the same with spinning ones."""
    configs = summary["instance_sweep"]["configs"]
    sleeping, spinning = configs.get("1/1"), configs.get("1/1 + spin")
    if not (sleeping and spinning):
        return "The last serving benchmark did not serve 1/1 both ways."
    rates = [sleeping["items_per_s"][w]["median"] / spinning["items_per_s"][w]["median"] for w in sleeping["items_per_s"]]
    return (f"With 16 gRPC clients, sleeping threads gave {ratio(geometric_mean(rates))} the items/s of spinning ones "
            f"(geometric mean over {len(rates)} workloads: text and image, single items and batches; "
            "docs/serving-benchmark.md, \"instance_group sweep\").")


PROTOCOL_NAMES = {"http": "HTTP", "grpc": "gRPC"}


def text_batches(summary: dict) -> str:
    """Triton against in-process ONNX Runtime on batches of texts, from many clients."""
    figures = [f"{ratio(r['ratio']['median'])} ({PROTOCOL_NAMES[r['protocol']]})" for r in summary["triton"].values()
               if r["model"] == "embed_text" and r["clients"] > 1 and r["items_per_request"] > 1]
    return (f"Padded to its longest text, a batch gives Triton {' and '.join(figures)} the items/s of in-process "
            "ONNX Runtime with 16 clients sending 32 texts each (docs/serving-benchmark.md).")


def packed_text_encoder(summary: dict) -> str:
    """The text encoder at batch 64: eager, the export's rewrite in PyTorch, ONNX Runtime FP32 and INT8."""
    rates = text_encoder_rates(summary, "64")
    record = summary["encoders"]["text_encoder"]["64"]
    return (f"In the last full `benchmarks/serving.py` run (docs/serving-benchmark.md), batch 64, "
            f"{summary['threads']} threads: eager {rates['eager']:,.0f} items/s, the same rewrite in PyTorch "
            f"{rates['eager_inference_form']:,.0f}, ONNX Runtime FP32 {rates['ort_fp32']:,.0f} "
            f"({ratio(record['ort_vs_eager']['median'])} eager; {ratio(record['ort_vs_eager_inference_form']['median'])} "
            f"the rewritten eager), INT8 {rates['ort_int8']:,.0f}.")


def instance_sweep(summary: dict) -> str:
    """The instance_group sweep's figures against 1/1, and what it recommends."""
    sweep = summary["instance_sweep"]
    figures = ", ".join(f"{name} {config['vs_baseline']:.2f}" for name, config in sweep["configs"].items()
                        if name != sweep["baseline"])
    return (f"The sweep in `benchmarks/serving.py` (encoder / preprocessing instances, 16 gRPC clients, the geometric "
            f"mean of items/s over {len(sweep['workloads'])} workloads against {sweep['baseline']}): {figures}. "
            + recommendation(sweep))


# -- README.md: benchmarks/rerank.py ---------------------------------------------------------------

def rerank_gain(result: dict) -> str:
    """What re-ranking the first stage's top N adds to text → image R@10 through the server, and what it costs."""
    figures = "; ".join(
        f"{r['kind'].upper()} {r['served_text_to_image']['reranked']['R@10'] - r['served_text_to_image']['first_stage']['R@10']:+.1f} "
        f"points for {r['latency']['rerank']['p50_ms']:.1f} ms p50" for r in result["results"])
    return f"Re-ranking the top {result['results'][0]['top_n']}, text → image R@10: {figures}."


# -- docs/indexing.md: benchmarks/indexing.py ---------------------------------------------------

def indexing(result: dict) -> str:
    """The indexing benchmark's figures and verdict: its machine, throughput, memory and the
    verdict it computed (a result may hold either part: the Iconify memory run has no throughput)."""
    machine = result.get("machine", {})
    lines = [f"Run at {'commit ' + result['commit'] if result.get('commit') else 'a commit it did not record'}, "
             f"on {machine.get('cpus')} CPUs (Python {machine.get('python')}).", ""]
    if result.get("throughput"):
        lines += indexing_throughput(result["throughput"])
    if result.get("memory"):
        lines += indexing_memory(result["memory"])
    if "verdict" in result:
        lines += verdict_table(result["verdict"])
    return "\n".join(lines).rstrip()


def indexing_throughput(part: dict) -> list[str]:
    """1 worker against 2, and the pipeline against the encoder alone: each round's (or, in a
    result saved before rounds, each run's) figures, then the ratios the result keeps."""
    if "rounds" in part:
        lines = [f"{part['items']:,} images, batch {part['batch_size']}; each ratio taken within a round (1 worker, "
                 "2 workers and the encoder alone, the order reversed from round to round), the median over "
                 "the rounds:", "",
                 "| round | 1 worker items/s, whole run / steady | 2 workers items/s, whole run / steady "
                 "| start-up s, 1 / 2 workers | encoder alone items/s, default threads / 1 thread "
                 "| 2 vs 1, whole run | 2 vs 1, steady | pipeline vs encoder alone |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for number, r in enumerate(part["rounds"], 1):
            one, two, alone = r["runs"]["1 worker"], r["runs"]["2 workers"], r["runs"]["encoder alone"]
            lines.append(f"| {number} | {one['items_per_second']} / {one['steady_items_per_second']} "
                         f"| {two['items_per_second']} / {two['steady_items_per_second']} "
                         f"| {one['startup_seconds']} / {two['startup_seconds']} "
                         f"| {alone['default_threads']['items_per_second']} / {alone['one_thread']['items_per_second']} "
                         f"| {r['two_vs_one_workers']} | {r['two_vs_one_workers_steady']} "
                         f"| {r['pipeline_vs_encoder_alone']} |")
        summary = "Median over the rounds"
    else:
        lines = [f"{part['items']:,} images, batch {part['batch_size']}, saved before the benchmark ran rounds: "
                 "its runs started with Ray already up (the whole run leaves Ray's start-up out), 1 worker "
                 "before 2 every time, and the encoder alone measured once:", "",
                 "| run | workers | seconds | start-up s | items/s, whole run | items/s, steady |",
                 "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {number} | {run['workers']} | {run['seconds']} | {run['startup_seconds']} "
                  f"| {run['items_per_second']} | {run['steady_items_per_second']} |"
                  for number, run in enumerate(part["runs"], 1)]
        lines += ["", f"The encoder alone: {part['encoder_alone']['items_per_second']} items/s with ONNX Runtime's "
                      f"default threads, {part['encoder_alone_one_thread']['items_per_second']} with one thread."]
        summary = "Best run of each"
    lines += ["", f"{summary}: 2 vs 1 workers {part['two_vs_one_workers']}x whole run, "
                  f"{part['two_vs_one_workers_steady']}x steady; the pipeline (2 workers) "
                  f"{part['pipeline_vs_encoder_alone']}x the encoder alone at its better thread setting over the "
                  f"whole run, {part['pipeline_steady_vs_encoder_alone']}x steady, and steady "
                  f"{part['pipeline_steady_vs_two_one_thread_encoders']}x two single-thread encoders (the same "
                  "compute).", ""]
    return lines


def indexing_memory(part: dict) -> list[str]:
    """Peak memory of the runs, smallest to largest, each peak's growth, and what each run did."""
    runs = part["runs"]
    what = part.get("input", "synthetic captions")
    over = ("--captions ", "synthetic distinct captions") if what == "synthetic captions" else ("", f"the images of `{what}`")
    lines = [f"Peak memory (MiB) of `xmodal index {over[0]}--local --workers 2 --embed-threads 1` over {over[1]}:", "",
             "| | " + " | ".join(f"{r['items']:,} items" for r in runs) + " | growth |",
             "| --- | " + " | ".join("---" for _ in runs) + " | --- |"]
    lines += [f"| {key} | " + " | ".join(str(r["peak_mib"].get(key)) for r in runs) + f" | {growth:+.1%} |"
              for key, growth in part["growth"].items()]
    lines += [f"| {label} | " + " | ".join(figure(r.get(key)) for r in runs) + " | |"
              for key, label in (("seconds", "seconds"), ("items_per_second", "items/s (the run's report)"),
                                 ("rows_written", "rows written"))]
    return lines + [""]


def indexing_encoder_rates(summary: dict) -> str:
    """The two encoders in process, batch 64: what a caption costs the indexer against an image."""
    text = text_encoder_rates(summary, "64")["ort_fp32"]
    image = summary["encoders"]["image_encoder"]["64"]["items_per_s"]["ort_fp32"]["median"]
    return (f"In the last full `benchmarks/serving.py` run (docs/serving-benchmark.md), ONNX Runtime FP32 in "
            f"process, batch 64, {summary['threads']} threads: the text encoder {text:,.0f} texts/s, the image "
            f"encoder {image:,.0f} images/s.")


# -- the blocks -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    doc: str  # relative to the checkout
    sources: tuple[str, ...]  # files under benchmarks/results, given to `make` loaded, in order
    make: Callable[..., str]


def results_page(summary: dict) -> str:
    """docs/results.md: every recipe's figures, claims and the default model (benchmarks/recipes.py)."""
    from recipes import markdown

    return markdown(summary)


BLOCKS: dict[str, Block] = {
    "results": Block("docs/results.md", ("recipes.json",), results_page),
    "index-nodes": Block("docs/scale-out.md", ("index_nodes.json",), index_nodes),
    "query-server": Block("docs/scale-out.md", ("query.json",), query_server),
    "query-targets": Block("docs/query-benchmark.md", ("query.json",), query_targets),
    "query-runs": Block("docs/query-benchmark.md", ("query.json",), query_sizes),
    "query-visibility": Block("docs/query-benchmark.md", ("query.json",), query_visibility),
    "query-100k-log": Block("docs/query-benchmark.md", ("query-100k-log.json",), query_log),
    "query-iconify": Block("docs/query-benchmark.md", ("query-iconify-100k.json",), query_iconify),
    "store-index": Block("docs/query-benchmark.md", ("store_index.json",), store_index),
    "serving-benchmark": Block("docs/serving-benchmark.md", ("serving.json",), serving_benchmark),
    "serving-int8-gate": Block("docs/serving.md", ("serving.json",), int8_gate_record),
    "serving-int8-query": Block("docs/serving.md", ("serving.json",), int8_single_query),
    "serving-sleeping-threads": Block("docs/serving.md", ("serving.json",), sleeping_threads),
    "serving-text-batches": Block("docs/serving.md", ("serving.json",), text_batches),
    "serving-packed-text-encoder": Block("docs/serving.md", ("serving.json",), packed_text_encoder),
    "serving-instance-sweep": Block("docs/serving.md", ("serving.json",), instance_sweep),
    "readme-int8": Block("README.md", ("serving.json",), int8_and_query),
    "readme-rerank": Block("README.md", ("rerank.json",), rerank_gain),
    "indexing-encoder-rates": Block("docs/indexing.md", ("serving.json",), indexing_encoder_rates),
    "indexing": Block("docs/indexing.md", ("indexing.json",), indexing),
    "indexing-iconify-memory": Block("docs/indexing.md", ("indexing-iconify-memory.json",), indexing),
}


def blocks_of(result: str) -> list[str]:
    """The blocks that read `result` (a file name under benchmarks/results)."""
    return [name for name, block in BLOCKS.items() if result in block.sources]


def content(name: str) -> str:
    block = BLOCKS[name]
    loaded = [load(source) for source in block.sources]
    missing = [source for source, result in zip(block.sources, loaded) if result is None]
    if missing:
        return f"No run saved yet (`benchmarks/results/{missing[0]}`)."
    return block.make(*loaded)


def with_block(text: str, name: str, body: str) -> str:
    """`text` with block `name`'s markers around `body`, indented as its opening marker. A text
    without the block's markers is an error: the markers say where the figures go."""
    begin, end = BEGIN.format(name), END.format(name)
    pattern = re.compile(r"^([ \t]*)" + re.escape(begin) + r"\n.*?^[ \t]*" + re.escape(end) + r"[ \t]*$",
                         re.DOTALL | re.MULTILINE)
    match = pattern.search(text)
    if match is None:
        raise SystemExit(f"{BLOCKS[name].doc}: no block {begin!r} ... {end!r}")
    indent = match.group(1)
    lines = "\n".join(indent + line if line else "" for line in body.split("\n"))
    return text[:match.start()] + f"{indent}{begin}\n{lines}\n{indent}{end}" + text[match.end():]


def render(names: list[str] | None = None, *, check: bool = False) -> list[str]:
    """Write the blocks (all, or `names`) into their documents; the documents changed. With
    `check`, write nothing: the documents that differ from what would be written."""
    unknown = sorted(set(names or []) - set(BLOCKS))
    if unknown:
        raise SystemExit(f"no such block: {', '.join(unknown)} (blocks: {', '.join(BLOCKS)})")
    docs: dict[str, list[str]] = {}
    for name, block in BLOCKS.items():
        if names is None or name in names:
            docs.setdefault(block.doc, []).append(name)
    changed = []
    for doc, doc_blocks in docs.items():
        path = ROOT / doc
        before = path.read_text(encoding="utf-8")
        after = before
        for name in doc_blocks:
            after = with_block(after, name, content(name))
        if after != before:
            changed.append(doc)
            if not check:
                path.write_text(after, encoding="utf-8")
    return changed


def stray_markers() -> list[str]:
    """Blocks the documents open that no renderer writes (a renamed or removed block)."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"<!-- figures: (\S+) \(benchmarks/render_docs\.py", path.read_text(encoding="utf-8")):
            if name not in BLOCKS:
                found.append(f"{path.relative_to(ROOT)}: {name}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"blocks to render (default all: {', '.join(BLOCKS)})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a document differs from its rendering")
    args = parser.parse_args(argv)
    changed = render(args.names or None, check=args.check)
    if not args.check:
        print("rendered: " + (", ".join(changed) or "every document was up to date"))
        return 0
    stray = stray_markers()
    for doc in changed:
        print(f"{doc}: differs from its rendering (run benchmarks/render_docs.py)")
    for marker in stray:
        print(f"{marker}: a block no renderer writes")
    return 1 if changed or stray else 0


if __name__ == "__main__":
    sys.exit(main())
