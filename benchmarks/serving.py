"""Serving speed, every figure a ratio or a distribution from one run (issue 5, items 2 and 5).

    .venv/bin/python benchmarks/serving.py [--quick] [--run DIR] [--data emoji] [--perf-analyzer PATH]
    .venv/bin/python benchmarks/serving.py --latency-only --run DIR   # section 3 alone, for another model

Measured side by side in one process, on the same 64 images and captions of the corpus:

1. PyTorch eager vs ONNX Runtime items/s per encoder at batch 1, 16 and 64, and INT8 vs FP32
   ONNX Runtime. torch and ONNX Runtime get the same number of intra-op threads (``--threads``),
   both waiting passively (``OMP_WAIT_POLICY=PASSIVE``, ORT's ``allow_spinning=0``, as the
   repository configures Triton's backend); ORT's own default (spinning) is measured beside,
   since on 2 shared cores spin-waiting threads lose a lot to any neighbouring job.
2. Triton (HTTP and gRPC; 1 and 16 concurrent clients, one thread and one client each;
   single items and batches of 32) vs in-process ONNX Runtime doing the same work: the
   ensembles ``embed_text`` / ``embed_image`` against tokenise or decode + ORT in-process,
   the bare encoders against ORT alone.
3. The p50/p99 latency of one ``embed_text`` query through the SDK's embedder
   (``xmodal.triton.Embedder``, HTTP), with Triton's own per-model breakdown, alternating
   in blocks with the same queries in-process (whose tail is the machine's noise floor).
4. NVIDIA's ``perf_analyzer`` against the same server, when one is found (``--perf-analyzer``,
   else ``perf_analyzer`` on PATH or beside the Python); otherwise the reason is recorded.
5. The ``instance_group`` sweep: repositories with ``instance_count`` and
   ``preprocess_instance_count`` 1 and 2, and 1/1 with the encoders' idle ONNX Runtime threads
   spinning (``allow_spinning=True``, ONNX Runtime's own default; the repository's is to sleep),
   each served at once, measured with 16 gRPC clients.

The run is exported again into a temporary directory with ``export_run`` (a full run also
passes the INT8 variant through export's held-out gate; ``--quick`` quantises with the same
function export uses, without the gate) and served from repositories written by
``write_model_repository``, FP32 as ``xmodal export`` writes it by default.

The machine is small (2 cores) and shared, so nothing is compared across time: A and B are
measured next to each other in rounds with the order alternating, ratios are taken within a
round, and each figure is the median over rounds (the spread goes into the JSON).

Targets, fixed by issue 5 item 5 before any run (the constants below), judged by ``verdict``
from the saved figures. Writes ``benchmarks/results/serving.json`` and renders the docs' blocks
of it (benchmarks/render_docs.py: docs/serving-benchmark.md and the figures quoted elsewhere); a
``--quick`` run writes ``benchmarks/results/serving-quick.json`` only, so a smoke run never
replaces the figures of a full one.

    .venv/bin/python benchmarks/serving.py --verdict-from benchmarks/results/serving.json   # judge again, measure nothing
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import measure  # noqa: E402 - the benchmarks' shared helpers
from measure import at_least, at_most, distribution, log, save_verdict, start_server  # noqa: E402

# issue 5 item 5, fixed before any run:
ORT_VS_EAGER_TARGET = 1.5  # ONNX Runtime / eager items/s at batch 64
TRITON_VS_ORT_TARGET = 0.85  # Triton / in-process ONNX Runtime items/s, client batches of 32 (16 clients)
EMBED_TEXT_P99_TARGET_MS = 5.0  # one embed_text query through the SDK, p99
EAGER_BATCHES = (1, 16, 64)
CLIENT_BATCH = 32
CONCURRENCY = (1, 16)
PROTOCOLS = ("http", "grpc")
ITEMS = 64  # distinct images and captions; also the repositories' max_batch_size
TIMEOUT_S = 300.0  # one request; 16 clients sending 32 images each queue for seconds


@dataclass(frozen=True)
class Plan:
    """How long each part runs: a full run, or --quick (a smoke run whose figures are not results)."""

    eager_rounds: int
    eager_seconds: float  # least time per eager / ORT measurement
    matrix_rounds: int
    scenario_seconds: float  # each client keeps sending for this long ...
    min_requests: int  # ... and a single client at least this many requests (16 clients: one each)
    latency_queries: int
    int8_gate: bool
    # (instance_count, preprocess_instance_count, allow_spinning: None = the repository's defaults)
    sweep_configs: tuple[tuple[int, int, bool | None], ...]
    sweep_rounds: int
    sweep_seconds: float
    perf_analyzer_cases: tuple[tuple[str, str, int, int], ...]  # (model, protocol, batch, concurrency)
    perf_analyzer_window_ms: int
    matrix_skip: frozenset[str] = frozenset()  # Scenario.key values left out
    sweep_workloads: tuple[tuple[str, int], ...] = (("embed_text", 1), ("embed_text", CLIENT_BATCH),
                                                    ("embed_image", 1), ("embed_image", CLIENT_BATCH))


FULL = Plan(
    eager_rounds=measure.MIN_PAIRS, eager_seconds=0.6, matrix_rounds=measure.MIN_PAIRS, scenario_seconds=1.5,
    min_requests=3,
    latency_queries=1000, int8_gate=True, sweep_configs=((1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 1, True)),
    sweep_rounds=measure.MIN_PAIRS,
    sweep_seconds=1.0,
    perf_analyzer_cases=(("embed_text", "grpc", 1, 1), ("embed_text", "http", 1, 1),
                         ("embed_text", "grpc", CLIENT_BATCH, 16), ("embed_image", "grpc", 1, 16)),
    perf_analyzer_window_ms=2000,
)
QUICK = Plan(
    eager_rounds=1, eager_seconds=0.1, matrix_rounds=1, scenario_seconds=0.4, min_requests=1,
    latency_queries=200, int8_gate=False, sweep_configs=((1, 1, None), (2, 2, None), (1, 1, True)), sweep_rounds=1, sweep_seconds=0.4,
    perf_analyzer_cases=(("embed_text", "grpc", 1, 1),), perf_analyzer_window_ms=1000,
    # The slowest cases (16 clients x 32 images each) add nothing to a smoke run.
    matrix_skip=frozenset({"embed_image http c16 b32", "image_encoder grpc c16 b32", "text_encoder grpc c16 b32"}),
    sweep_workloads=(("embed_text", CLIENT_BATCH), ("embed_image", 1)),
)


@dataclass(frozen=True)
class Scenario:
    model: str
    protocol: str
    clients: int
    size: int  # items per request

    @property
    def key(self) -> str:
        return f"{self.model} {self.protocol} c{self.clients} b{self.size}"


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """The median over rounds, and every round's value so the spread can be judged."""
    return {"median": round(statistics.median(values), digits), "rounds": [round(v, digits) for v in values]}


def time_calls(call: Callable[[], Any], *, min_calls: int, min_seconds: float) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return times


def ort_session(path: Path, threads: int, *, spinning: bool = False):
    """A CPU session at the default (ALL) graph level, as Triton's backend loads the served file.

    Without ``spinning`` the intra-op threads wait passively, like torch's under
    OMP_WAIT_POLICY=PASSIVE: with another job on these 2 cores, spinning threads lose their
    time slices to it, which would make any comparison a measure of the neighbour's load. The
    repository configures Triton's backend the same way (``allow_spinning: "0"``); the encoder
    stage measures both.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


# -- the model, its export and the items ---------------------------------------------------


@dataclass
class Exported:
    directory: Path
    card: Any  # ModelCard of the FP32 files
    fp32: dict[str, Path]
    int8: dict[str, Path]
    tokenizer_json: Path
    int8_provenance: str
    int8_gate: dict[str, Any] | None = None
    seconds: float = 0.0


def quantize_as_export_does(out_dir: Path) -> dict[str, Path]:
    """The INT8 files from the raw export: export's own quantisation, then its offline optimisation."""
    from xmodal.export import variants
    from xmodal.export.onnx import IMAGE_INT8_ONNX, IMAGE_RAW_ONNX, TEXT_INT8_ONNX, TEXT_RAW_ONNX

    targets = {"image_encoder": (IMAGE_RAW_ONNX, IMAGE_INT8_ONNX), "text_encoder": (TEXT_RAW_ONNX, TEXT_INT8_ONNX)}
    for raw, int8 in targets.values():
        unoptimised = out_dir / f".{int8}.unoptimised.onnx"
        try:
            variants.quantize_int8(out_dir / raw, unoptimised)
            variants.optimize_onnx(unoptimised, out_dir / int8, level="extended")
        finally:
            unoptimised.unlink(missing_ok=True)
    return {encoder: out_dir / int8 for encoder, (_, int8) in targets.items()}


def export(run_dir: Path, out_dir: Path, manifests: list[Path], *, gate: bool) -> Exported:
    from xmodal.card import ModelCard
    from xmodal.export.onnx import (IMAGE_INT8_ONNX, IMAGE_ONNX, TEXT_INT8_ONNX, TEXT_ONNX, QuantizationRejected,
                                    export_run)
    from xmodal.training.run import TOKENIZER_FILE

    started = time.monotonic()
    gate_record = None
    if gate:
        try:
            exported = export_run(run_dir, out_dir, manifests=manifests, quantize="int8", fp16=False)
            gate_record = exported.int8_gate
            provenance = "export_run's INT8 variant, accepted by its held-out R@10 gate"
        except QuantizationRejected as refused:
            gate_record = refused.gate
            quantize_as_export_does(out_dir)
            provenance = ("export_run's INT8 gate refused it (see int8_gate); quantised anyway with "
                          "xmodal.export.variants.quantize_int8 + optimize_onnx to measure its speed")
    else:
        export_run(run_dir, out_dir, fp16=False)
        quantize_as_export_does(out_dir)
        provenance = ("--quick: quantised with xmodal.export.variants.quantize_int8 + optimize_onnx, as export_run "
                      "does, without the held-out gate")
    return Exported(
        directory=out_dir, card=ModelCard.load(out_dir),
        fp32={"image_encoder": out_dir / IMAGE_ONNX, "text_encoder": out_dir / TEXT_ONNX},
        int8={"image_encoder": out_dir / IMAGE_INT8_ONNX, "text_encoder": out_dir / TEXT_INT8_ONNX},
        tokenizer_json=out_dir / TOKENIZER_FILE, int8_provenance=provenance, int8_gate=gate_record,
        seconds=round(time.monotonic() - started, 1))


@dataclass
class Items:
    """The same items for every measurement: encoded images and their label captions, and
    what preprocessing makes of them (pixels, token ids)."""

    images: list[bytes]
    texts: list[str]
    pixels: np.ndarray  # [ITEMS, 3, S, S]
    styles: list[str]

    def ids(self, tokenizer, start: int, count: int) -> np.ndarray:
        from xmodal.training.train import tokenize

        return tokenize(tokenizer, self.texts[start:start + count]).numpy()


def load_items(manifest: Path, card) -> Items:
    from xmodal.preprocessing import preprocess_image_bytes
    from xmodal.manifest import read_manifest

    rows = read_manifest(manifest)
    rows = rows[:: max(1, len(rows) // ITEMS)][:ITEMS]  # spread over the styles the manifest holds
    images = [Path(row.image).read_bytes() for row in rows]
    pixels = np.stack([preprocess_image_bytes(data, card.image.size, card.image.mean, card.image.std,
                                              card.image.background) for data in images])
    return Items(images=images, texts=[row.captions[0] for row in rows], pixels=pixels,
                 styles=sorted({row.style for row in rows}))


# -- 1. eager vs ONNX Runtime, INT8 vs FP32 -------------------------------------------------


def bench_encoders(run_dir: Path, exported: Exported, items: Items, tokenizer, plan: Plan, threads: int) -> dict:
    import torch

    from xmodal.export.onnx import inference_form
    from xmodal.training.models import ServedTower
    from xmodal.training.run import load_run

    torch.set_num_threads(threads)
    model, _, config = load_run(run_dir)
    towers = {"image_encoder": ServedTower(model.image, config).eval(),
              "text_encoder": ServedTower(model.text, config).eval()}
    sessions = {(encoder, precision): ort_session(paths[encoder], threads)
                for precision, paths in (("fp32", exported.fp32), ("int8", exported.int8)) for encoder in towers}
    spinning = {encoder: ort_session(exported.fp32[encoder], threads, spinning=True) for encoder in towers}

    def runners(encoder: str, batch: int) -> dict[str, Callable[[], Any]]:
        if encoder == "image_encoder":
            name, array = "pixel_values", np.ascontiguousarray(items.pixels[:batch])
        else:
            name, array = "input_ids", items.ids(tokenizer, 0, batch)
        tensor = torch.from_numpy(array)

        def eager():
            with torch.inference_mode():
                return towers[encoder](tensor)

        def eager_inference_form():
            with torch.inference_mode(), inference_form(towers[encoder]):
                return towers[encoder](tensor)

        return {"eager": eager,
                # The same algorithm as the exported graph (MiniLM without padding tokens), in
                # PyTorch: what ORT's runtime adds beyond the export's rewrite.
                "eager_inference_form": eager_inference_form,
                "ort_fp32": lambda: sessions[(encoder, "fp32")].run(None, {name: array}),
                "ort_int8": lambda: sessions[(encoder, "int8")].run(None, {name: array}),
                "ort_fp32_spinning": lambda: spinning[encoder].run(None, {name: array})}

    cases = {(encoder, batch): runners(encoder, batch) for encoder in towers for batch in EAGER_BATCHES}
    for case in cases.values():
        for call in case.values():
            call(), call()  # first calls allocate and pick kernels
    rates: dict[tuple, dict[str, list[float]]] = {key: {name: [] for name in case} for key, case in cases.items()}
    ratios: dict[tuple, dict[str, list[float]]] = {
        key: {"ort_vs_eager": [], "ort_vs_eager_inference_form": [], "int8_vs_fp32": [], "spinning_vs_passive": []}
        for key in cases}
    for round_index in range(plan.eager_rounds):
        for (encoder, batch), case in cases.items():
            names = list(case)
            shift = round_index % len(names)  # who goes first changes every round
            for name in names[shift:] + names[:shift]:
                times = time_calls(case[name], min_calls=3, min_seconds=plan.eager_seconds)
                rates[(encoder, batch)][name].append(batch / statistics.median(times))
            rate = {name: values[-1] for name, values in rates[(encoder, batch)].items()}
            ratios[(encoder, batch)]["ort_vs_eager"].append(rate["ort_fp32"] / rate["eager"])
            ratios[(encoder, batch)]["ort_vs_eager_inference_form"].append(
                rate["ort_fp32"] / rate["eager_inference_form"])
            ratios[(encoder, batch)]["int8_vs_fp32"].append(rate["ort_int8"] / rate["ort_fp32"])
            ratios[(encoder, batch)]["spinning_vs_passive"].append(rate["ort_fp32_spinning"] / rate["ort_fp32"])
        log(f"  eager vs ORT round {round_index + 1}/{plan.eager_rounds}: " + ", ".join(
            f"{encoder.split('_')[0]} b{batch} {ratios[(encoder, batch)]['ort_vs_eager'][-1]:.2f}x"
            for encoder, batch in cases))
    return {encoder: {str(batch): {
        "items_per_s": {name: summary(values, 1) for name, values in rates[(encoder, batch)].items()},
        **{name: summary(values) for name, values in ratios[(encoder, batch)].items()},
    } for batch in EAGER_BATCHES} for encoder in towers}


# -- 2. Triton vs in-process ONNX Runtime ----------------------------------------------------


def request_payloads(model: str, size: int, items: Items, tokenizer) -> list[Any]:
    """What each request of ``size`` items carries, cycling over the same items."""
    from xmodal.triton import IMAGE_MODEL, TEXT_MODEL
    from xmodal.contract import IMAGE_ENCODER

    starts = range(0, ITEMS, size)
    if model == TEXT_MODEL:
        return [[text.encode() for text in items.texts[s:s + size]] for s in starts]
    if model == IMAGE_MODEL:
        return [items.images[s:s + size] for s in starts]
    if model == IMAGE_ENCODER:
        return [np.ascontiguousarray(items.pixels[s:s + size]) for s in starts]
    return [items.ids(tokenizer, s, size) for s in starts]


def in_process_call(model: str, payloads: list[Any], sessions: dict[str, Any], tokenizer, card) -> Callable[[], Any]:
    """One request's work done in this process: tokenise or decode + preprocess, then ORT."""
    from xmodal.triton import IMAGE_MODEL, TEXT_MODEL
    from xmodal.contract import IMAGE_ENCODER
    from xmodal.preprocessing import preprocess_image_bytes
    from xmodal.training.train import tokenize

    position = [0]

    def call():
        payload = payloads[position[0] % len(payloads)]
        position[0] += 1
        if model == TEXT_MODEL:
            ids = tokenize(tokenizer, [item.decode() for item in payload]).numpy()
            return sessions["text_encoder"].run(["global"], {"input_ids": ids})
        if model == IMAGE_MODEL:
            pixels = np.stack([preprocess_image_bytes(data, card.image.size, card.image.mean, card.image.std,
                                                      card.image.background) for data in payload])
            return sessions["image_encoder"].run(["global"], {"pixel_values": pixels})
        if model == IMAGE_ENCODER:
            return sessions["image_encoder"].run(["global"], {"pixel_values": payload})
        return sessions["text_encoder"].run(["global"], {"input_ids": payload})

    return call


def request_tensors(protocol: str, model: str, payload: Any):
    """The inputs and requested output of one request, built once and sent many times."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from xmodal.triton import IMAGE_INPUT, IMAGE_MODEL, OUTPUT, TEXT_INPUT, TEXT_MODEL
    from xmodal.contract import IMAGE_ENCODER

    module = httpclient if protocol == "http" else grpcclient
    if model in (TEXT_MODEL, IMAGE_MODEL):
        data = np.empty((len(payload), 1), dtype=object)
        data[:, 0] = list(payload)
        name, datatype = (TEXT_INPUT if model == TEXT_MODEL else IMAGE_INPUT), "BYTES"
    else:
        data = payload
        name, datatype = ("pixel_values", "FP32") if model == IMAGE_ENCODER else ("input_ids", "INT64")
    tensor = module.InferInput(name, list(data.shape), datatype)
    if protocol == "http":
        tensor.set_data_from_numpy(data, binary_data=True)
        return [tensor], [module.InferRequestedOutput(OUTPUT, binary_data=True)]
    tensor.set_data_from_numpy(data)
    return [tensor], [module.InferRequestedOutput(OUTPUT)]


def open_client(protocol: str, server):
    if protocol == "http":
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(server.url, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S)
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


def drive(server, scenario: Scenario, payloads: list[Any], *, seconds: float, min_requests: int) -> dict:
    """``scenario.clients`` threads, one client each, send requests back to back for ``seconds``
    (at least ``min_requests`` each); items/s is every item answered over the time until the
    last answer, and the latency distribution is over every request."""
    from xmodal.triton import OUTPUT

    count = scenario.clients
    latencies: list[list[float]] = [[] for _ in range(count)]
    finished = [0.0] * count
    errors: list[BaseException] = []
    start = [0.0]
    # The action runs once every client is warm, before any is released: the common start.
    barrier = threading.Barrier(count, action=lambda: start.__setitem__(0, time.perf_counter()))

    def client_thread(index: int) -> None:
        client = open_client(scenario.protocol, server)
        try:
            requests = [request_tensors(scenario.protocol, scenario.model, p) for p in payloads]
            inputs, outputs = requests[index % len(requests)]
            client.infer(scenario.model, inputs, outputs=outputs, **_timeout(scenario.protocol))  # warm-up
            barrier.wait()
            deadline = start[0] + seconds
            sent = 0
            while sent < min_requests or time.perf_counter() < deadline:
                inputs, outputs = requests[(index + sent * count) % len(requests)]
                begin = time.perf_counter()
                result = client.infer(scenario.model, inputs, outputs=outputs, **_timeout(scenario.protocol))
                latencies[index].append(time.perf_counter() - begin)
                if result.as_numpy(OUTPUT) is None:
                    raise RuntimeError(f"{scenario.model} answered without {OUTPUT!r}")
                sent += 1
            finished[index] = time.perf_counter()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            barrier.abort()
        finally:
            client.close()  # before the server stops: Triton waits for open HTTP connections

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{scenario.key}: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    every = [value for per_client in latencies for value in per_client]
    wall = max(finished) - start[0]
    return {"items_per_s": len(every) * scenario.size / wall, "requests": len(every), "wall_s": round(wall, 3),
            "latency": distribution(every)}


def _timeout(protocol: str) -> dict[str, float]:
    # The HTTP client takes its timeouts at construction; gRPC per call.
    return {} if protocol == "http" else {"client_timeout": TIMEOUT_S}


def server_stats(admin) -> dict[str, dict[str, int]]:
    """Triton's cumulative per-model counters (all versions added up)."""
    totals: dict[str, dict[str, int]] = {}
    for entry in admin.get_inference_statistics()["model_stats"]:
        stats = entry["inference_stats"]
        total = totals.setdefault(entry["name"], dict.fromkeys(
            ("requests", "inferences", "executions", "request_ns", "queue_ns", "input_ns", "infer_ns",
             "output_ns"), 0))
        total["requests"] += int(stats["success"]["count"])
        total["request_ns"] += int(stats["success"]["ns"])
        for key, name in (("queue_ns", "queue"), ("input_ns", "compute_input"), ("infer_ns", "compute_infer"),
                          ("output_ns", "compute_output")):
            total[key] += int(stats[name]["ns"])
        total["inferences"] += int(entry.get("inference_count", 0))
        total["executions"] += int(entry.get("execution_count", 0))
    return totals


def stats_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model: requests, the batch the scheduler achieved, and mean milliseconds per request."""
    delta = {}
    for model, end in after.items():
        begin = before.get(model, dict.fromkeys(end, 0))
        requests = end["requests"] - begin["requests"]
        if requests <= 0:
            continue
        executions = end["executions"] - begin["executions"]
        per_request = {key.replace("_ns", "_ms"): round((end[key] - begin[key]) / requests / 1e6, 3)
                       for key in ("request_ns", "queue_ns", "input_ns", "infer_ns", "output_ns")}
        delta[model] = {"requests": requests,
                        "batch_achieved": round((end["inferences"] - begin["inferences"]) / executions, 2)
                        if executions else None, **per_request}
    return delta


def matrix_scenarios() -> list[Scenario]:
    from xmodal.triton import IMAGE_MODEL, TEXT_MODEL
    from xmodal.contract import IMAGE_ENCODER, TEXT_ENCODER

    scenarios = [Scenario(model, protocol, clients, size) for model in (TEXT_MODEL, IMAGE_MODEL)
                 for protocol in PROTOCOLS for clients in CONCURRENCY for size in (1, CLIENT_BATCH)]
    # The bare encoders show what preprocessing in the server costs; one protocol is enough there.
    scenarios += [Scenario(model, "grpc", clients, CLIENT_BATCH) for model in (TEXT_ENCODER, IMAGE_ENCODER)
                  for clients in CONCURRENCY]
    return scenarios


def bench_triton_vs_ort(server, admin, scenarios: list[Scenario], items: Items, tokenizer, card,
                        sessions: dict[str, Any], plan: Plan) -> dict:
    payloads = {(s.model, s.size): request_payloads(s.model, s.size, items, tokenizer) for s in scenarios}
    references = {key: in_process_call(key[0], value, sessions, tokenizer, card) for key, value in payloads.items()}
    for call in references.values():
        call()
    records: dict[str, dict[str, list]] = {s.key: {"triton": [], "ort": [], "ratio": [], "latency": [], "server": []}
                                           for s in scenarios}

    for round_index in range(plan.matrix_rounds):
        for scenario in measure.alternating(round_index, scenarios):
            reference = references[(scenario.model, scenario.size)]

            def measure_ort() -> float:
                times = time_calls(reference, min_calls=3, min_seconds=min(1.0, plan.scenario_seconds / 2))
                return scenario.size / statistics.median(times)

            ort_first = round_index % 2 == 0
            ort_rate = measure_ort() if ort_first else None
            before = server_stats(admin)
            result = drive(server, scenario, payloads[(scenario.model, scenario.size)], seconds=plan.scenario_seconds,
                           min_requests=plan.min_requests if scenario.clients == 1 else 1)
            breakdown = stats_delta(before, server_stats(admin))
            if not ort_first:
                ort_rate = measure_ort()
            record = records[scenario.key]
            record["triton"].append(result["items_per_s"])
            record["ort"].append(ort_rate)
            record["ratio"].append(result["items_per_s"] / ort_rate)
            record["latency"].append(result)
            record["server"].append(breakdown)
            log(f"  {scenario.key:<28} {result['items_per_s']:8.1f} items/s vs ORT {ort_rate:8.1f} "
                f"= {record['ratio'][-1]:.2f}x   p50 {result['latency']['p50_ms']:.1f} ms "
                f"p99 {result['latency']['p99_ms']:.1f} ms  ({result['requests']} requests)")
    results = {}
    for scenario in scenarios:
        record = records[scenario.key]
        # The round closest to the median ratio gives the distribution and the breakdown shown.
        ratio = statistics.median(record["ratio"])
        middle = min(range(len(record["ratio"])), key=lambda i: abs(record["ratio"][i] - ratio))
        results[scenario.key] = {
            "model": scenario.model, "protocol": scenario.protocol, "clients": scenario.clients,
            "items_per_request": scenario.size,
            "triton_items_per_s": summary(record["triton"], 1), "ort_items_per_s": summary(record["ort"], 1),
            "ratio": summary(record["ratio"]),
            "latency": record["latency"][middle]["latency"], "requests": record["latency"][middle]["requests"],
            "server": record["server"][middle],
        }
    return results


# -- 3. one embed_text query -----------------------------------------------------------------


def bench_embed_text_latency(server, admin, items: Items, tokenizer, card, sessions: dict[str, Any],
                             queries: int, blocks: int = 10) -> dict:
    """Sequential single-text queries through the SDK's embedder, as ``Client.embed_text`` sends
    them, in blocks alternating with the same queries done in-process (tokenise + ORT): the
    in-process tail shows how much of the served tail is this machine's noise."""
    from xmodal.triton import TEXT_INPUT, TEXT_MODEL, Embedder

    texts = [text.encode() for text in items.texts]
    in_process = in_process_call(TEXT_MODEL, [[text] for text in texts], sessions, tokenizer, card)
    embedder = Embedder(server.url, TEXT_MODEL, TEXT_INPUT)
    served: list[float] = []
    local: list[float] = []
    try:
        for text in texts[:20]:
            embedder.embed([text])
            in_process()
        before = server_stats(admin)
        per_block = max(1, queries // blocks)
        for block in range(blocks):
            for turn in ((served, local) if block % 2 == 0 else (local, served)):
                for index in range(block * per_block, (block + 1) * per_block):
                    begin = time.perf_counter()
                    if turn is served:
                        _, errors = embedder.embed([texts[index % len(texts)]])
                        if errors[0]:
                            raise RuntimeError(f"embed_text failed: {errors[0]}")
                    else:
                        in_process()
                    turn.append(time.perf_counter() - begin)
        breakdown = stats_delta(before, server_stats(admin))
    finally:
        embedder.close()
    return {"path": "xmodal.triton.Embedder (the SDK's embed_text), HTTP, one text per request, sequential",
            "latency": distribution(served), "in_process_latency": distribution(local), "server": breakdown}


# -- 4. perf_analyzer ---------------------------------------------------------------------------


def find_perf_analyzer(explicit: str | None) -> tuple[str | None, str]:
    """The binary and its version, or None and why not."""
    candidates = [explicit] if explicit else [shutil.which("perf_analyzer"),
                                              str(Path(sys.executable).parent / "perf_analyzer")]
    found = [c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)]
    if not found:
        return None, ("perf_analyzer not found (" + (explicit or "not on PATH nor beside " + sys.executable) +
                      "). PyPI's perf-analyzer resolves to a 0.1.0 placeholder with no binary on this Python and "
                      "glibc; the tritonclient 2.41.1 manylinux1 wheel ships one (it needs libb64.so.0d and "
                      "libcudart.so.12 on LD_LIBRARY_PATH); pass it with --perf-analyzer")
    try:
        probe = subprocess.run([found[0], "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return None, f"{found[0]} cannot run: {exc}"
    text = (probe.stdout + probe.stderr).strip()
    if probe.returncode != 0 or "error while loading shared libraries" in text:
        return None, f"{found[0]} cannot run: {text.splitlines()[-1] if text else f'exit {probe.returncode}'}"
    return found[0], text.splitlines()[0] if text else "unknown version"


def perf_analyzer_data(model: str, items: Items, directory: Path) -> Path:
    """perf_analyzer's --input-data file: one step per item; images as Triton's raw BYTES layout in base64."""
    from xmodal.triton import IMAGE_INPUT, TEXT_INPUT, TEXT_MODEL
    from xmodal.export.repository import serialize_bytes

    if model == TEXT_MODEL:
        steps = [{TEXT_INPUT: [text]} for text in items.texts]
    else:
        steps = [{IMAGE_INPUT: {"b64": base64.b64encode(serialize_bytes([data])).decode()}} for data in items.images]
    path = directory / f"perf_analyzer-{model}.json"
    path.write_text(json.dumps({"data": steps}))
    return path


def run_perf_analyzer(binary: str, server, items: Items, plan: Plan, directory: Path) -> list[dict]:
    results = []
    for model, protocol, batch, concurrency in plan.perf_analyzer_cases:
        csv_path = directory / f"perf_analyzer-{model}-{protocol}-b{batch}-c{concurrency}.csv"
        command = [binary, "-m", model, "-u", server.grpc_url if protocol == "grpc" else server.url,
                   "-i", protocol, "-b", str(batch), "--concurrency-range", str(concurrency),
                   "--input-data", str(perf_analyzer_data(model, items, directory)),
                   # Lenient: the last 3 windows within 2x of each other; this machine is shared.
                   "--measurement-interval", str(plan.perf_analyzer_window_ms), "--max-trials", "8",
                   "--stability-percentage", "100", "-f", str(csv_path)]
        case = {"model": model, "protocol": protocol, "batch": batch, "concurrency": concurrency,
                "command": " ".join(["perf_analyzer", *command[1:]])}
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=180)
            case["exit_code"] = completed.returncode
            if completed.returncode == 0 and csv_path.exists():
                with csv_path.open() as handle:
                    row = next(csv.DictReader(handle))
                case["items_per_s"] = float(row["Inferences/Second"])
                case.update({f"{p}_ms": int(row[f"{p} latency"]) / 1000 for p in ("p50", "p90", "p95", "p99")})
                case["server_queue_ms"] = int(row["Server Queue"]) / 1000
                case["server_compute_infer_ms"] = int(row["Server Compute Infer"]) / 1000
            else:
                case["error"] = (completed.stdout + completed.stderr).strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            case["error"] = ["timed out after 180 s"]
        log(f"  perf_analyzer {model} {protocol} b{batch} c{concurrency}: " + (
            f"{case['items_per_s']:.1f} items/s, p50 {case['p50_ms']:.2f} ms, p99 {case['p99_ms']:.2f} ms"
            if "items_per_s" in case else f"failed: {case.get('error')}"))
        results.append(case)
    return results


# -- 5. instance_group sweep ----------------------------------------------------------------


def instance_groups(admin, models: Sequence[str]) -> dict[str, list[dict]]:
    """What the running server made of each model's instance_group (its default when none is written)."""
    return {model: [{"kind": group.get("kind"), "count": group.get("count")}
                    for group in admin.get_model_config(model).get("instance_group", [])] for model in models}


@contextmanager
def served(exported: Exported, workdir: Path, summary_: dict, precision: str = "fp32"):
    """A server on the repository `xmodal export` would write (FP32 unless told), ready, with an HTTP
    admin client; stopped on leaving. Records Triton's version in the summary."""
    import tritonclient.http as httpclient

    server = start_server(write_repository(exported, workdir / "repository", precision))
    admin = None
    try:
        server.wait_ready(timeout=300)
        admin = httpclient.InferenceServerClient(server.url)
        summary_["machine"]["triton"] = admin.get_server_metadata()["version"]
        yield server, admin
    finally:
        if admin is not None:
            admin.close()
        server.stop()


def write_repository(exported: Exported, path: Path, precision: str = "fp32", **options) -> Path:
    from xmodal.export.repository import write_model_repository

    from xmodal.card import fingerprint_files

    files = exported.int8 if precision == "int8" else exported.fp32
    # the card a repository serving these files carries (as export_run writes Variant.card); built
    # here because the INT8 files measured may be ones the gate refused, which have none
    card = dataclasses.replace(exported.card, fingerprint=fingerprint_files([files["image_encoder"], files["text_encoder"]]))
    return write_model_repository(path, card, image_onnx=files["image_encoder"],
                                  text_onnx=files["text_encoder"], tokenizer_json=exported.tokenizer_json,
                                  max_batch_size=ITEMS, keep_previous=False, **options)


def sweep_scenarios(plan: Plan) -> list[Scenario]:
    return [Scenario(model, "grpc", 16, size) for model, size in plan.sweep_workloads]


def sweep_label(instances: int, preprocess: int, spinning: bool | None) -> str:
    """'1/1' (encoder / preprocessing instances), '+ sleep' or '+ spin' when every encoder's threads are set."""
    return f"{instances}/{preprocess}" + ("" if spinning is None else " + spin" if spinning else " + sleep")


def bench_instance_sweep(exported: Exported, workdir: Path, items: Items, tokenizer, plan: Plan,
                         default_groups: dict) -> dict:
    import tritonclient.http as httpclient

    from xmodal.contract import IMAGE_ENCODER, PREPROCESS_IMAGE, PREPROCESS_TEXT, TEXT_ENCODER

    scenarios = sweep_scenarios(plan)
    payloads = {(s.model, s.size): request_payloads(s.model, s.size, items, tokenizer) for s in scenarios}
    servers: dict[tuple[int, int, bool | None], Any] = {}
    rates: dict[tuple[int, int, bool | None], dict[str, list[float]]] = {}
    groups = {}
    try:
        # All configurations are up at once, so each workload is measured on every one of them
        # within seconds; an idle server costs nothing.
        for instances, preprocess, spinning in plan.sweep_configs:
            repository = write_repository(exported, workdir / f"repository-{sweep_label(instances, preprocess, spinning).replace('/', '-').replace(' ', '-')}",
                                          instance_count=instances, preprocess_instance_count=preprocess,
                                          allow_spinning=spinning)
            servers[(instances, preprocess, spinning)] = start_server(repository)
        for config, server in servers.items():
            server.wait_ready(timeout=300)
            admin = httpclient.InferenceServerClient(server.url)
            try:
                groups[config] = instance_groups(admin, (IMAGE_ENCODER, TEXT_ENCODER, PREPROCESS_IMAGE, PREPROCESS_TEXT))
            finally:
                admin.close()
            rates[config] = {s.key: [] for s in scenarios}
        log(f"  {len(servers)} servers ready: " + ", ".join(sweep_label(*config) for config in servers))
        configs = list(servers)
        for round_index in range(plan.sweep_rounds):
            for scenario in scenarios:
                for config in measure.alternating(round_index, configs):
                    # Items/s only: one request per client is enough, and 16 x 32 images take seconds.
                    result = drive(servers[config], scenario, payloads[(scenario.model, scenario.size)],
                                   seconds=plan.sweep_seconds, min_requests=1)
                    rates[config][scenario.key].append(result["items_per_s"])
                log(f"  sweep round {round_index + 1} {scenario.key}: " + ", ".join(
                    f"{sweep_label(*config)} {rates[config][scenario.key][-1]:.1f}" for config in configs) + " items/s")
    finally:
        for server in servers.values():
            server.stop()
    baseline = configs[0]
    table = {}
    for config in configs:
        medians = {key: statistics.median(values) for key, values in rates[config].items()}
        relative = [medians[key] / statistics.median(rates[baseline][key]) for key in medians]
        table[sweep_label(*config)] = {
            "instance_count": config[0], "preprocess_instance_count": config[1], "allow_spinning": config[2],
            "instance_groups": groups[config],
            "items_per_s": {key: summary(values, 1) for key, values in rates[config].items()},
            "vs_baseline": round(float(np.exp(np.mean(np.log(relative)))), 3),
        }
    best = max(table, key=lambda key: table[key]["vs_baseline"])
    per_workload = {s.key: max(table, key=lambda key: table[key]["items_per_s"][s.key]["median"]) for s in scenarios}
    # Within 5 % is within this machine's noise: then the fewer processes the better.
    simplest = min(table, key=lambda key: (table[key]["instance_count"] + table[key]["preprocess_instance_count"]
                                           + (table[key]["allow_spinning"] is not None)))
    noise = best != simplest and table[best]["vs_baseline"] < table[simplest]["vs_baseline"] * 1.05
    choice = simplest if noise else best
    if best == simplest:
        why = f"{best} has the most items/s (geometric mean over {len(scenarios)} workloads) and the fewest processes"
    elif noise:
        why = (f"{best} is within 5 % of {simplest} (geometric mean items/s over {len(scenarios)} workloads): "
               "noise here, so the fewest processes")
    else:
        why = (f"{best}: {100 * (table[best]['vs_baseline'] / table[simplest]['vs_baseline'] - 1):+.0f} % items/s "
               f"(geometric mean over {len(scenarios)} workloads) over {simplest}")
    default_counts = {model: sum(g["count"] or 0 for g in groups_) for model, groups_ in default_groups.items()}
    return {
        "configs": table, "baseline": sweep_label(*baseline), "best_by_workload": per_workload,
        "best_overall": best,
        "recommendation": {
            "instance_count": table[choice]["instance_count"],
            "preprocess_instance_count": table[choice]["preprocess_instance_count"],
            "allow_spinning": table[choice]["allow_spinning"],
            "why": why,
        },
        "default_without_instance_group": default_counts,
        "workloads": [s.key for s in scenarios],
    }


# -- the whole run ----------------------------------------------------------------------------


def machine() -> dict:
    from importlib.metadata import version

    import onnxruntime
    import torch

    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), platform.processor())
    return {"cpu": model_name, "cores": os.cpu_count(), "machine": platform.machine(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": sys.version.split()[0], "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "tritonclient": version("tritonclient"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def run(args: argparse.Namespace) -> dict:
    from xmodal.cli import resolve_data
    from xmodal.contract import IMAGE_ENCODER, PREPROCESS_IMAGE, PREPROCESS_TEXT, TEXT_ENCODER
    from xmodal.training.tokenizer import load_tokenizer

    plan = QUICK if args.quick else FULL
    if not (args.run / "model.safetensors").exists():
        raise SystemExit(f"no trained run at {args.run} (train one with `xmodal train`, or pass --run)")
    manifests = resolve_data(args.data)
    started = time.monotonic()
    stages: dict[str, float] = {}
    summary_: dict[str, Any] = {"mode": "quick" if args.quick else "full", "run": str(args.run),
                                "data": [str(m) for m in manifests], "threads": args.threads,
                                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": machine()}
    workdir = Path(tempfile.mkdtemp(prefix="xmodal-serving-bench-"))
    try:
        log(f"[1/6] exporting {args.run} into {workdir} (INT8 {'with' if plan.int8_gate else 'without'} its gate)")
        exported = export(args.run, workdir / "onnx", manifests, gate=plan.int8_gate)
        tokenizer = load_tokenizer(exported.tokenizer_json)
        items = load_items(manifests[0], exported.card)
        summary_["export"] = {"seconds": exported.seconds, "card_fingerprint": exported.card.fingerprint,
                              "int8": exported.int8_provenance, "int8_gate": exported.int8_gate}
        summary_["items"] = {"count": ITEMS, "manifest": str(manifests[0]), "styles": items.styles,
                             "texts": "captions[0] (the label) of each row"}
        stages["export"] = exported.seconds

        log(f"[2/6] eager vs ONNX Runtime, INT8 vs FP32 ({plan.eager_rounds} rounds, {args.threads} threads each)")
        begin = time.monotonic()
        summary_["encoders"] = bench_encoders(args.run, exported, items, tokenizer, plan, args.threads)
        stages["encoders"] = round(time.monotonic() - begin, 1)

        log("[3/6] Triton vs in-process ONNX Runtime (repository as `xmodal export` writes it, FP32)")
        begin = time.monotonic()
        sessions = {encoder: ort_session(path, args.threads) for encoder, path in exported.fp32.items()}
        with served(exported, workdir, summary_) as (server, admin):
            default_groups = instance_groups(admin, (IMAGE_ENCODER, TEXT_ENCODER, PREPROCESS_IMAGE, PREPROCESS_TEXT))
            summary_["default_instance_groups"] = default_groups
            scenarios = [s for s in matrix_scenarios() if s.key not in plan.matrix_skip]
            summary_["triton"] = bench_triton_vs_ort(server, admin, scenarios, items, tokenizer,
                                                     exported.card, sessions, plan)
            stages["triton"] = round(time.monotonic() - begin, 1)

            log("[4/6] perf_analyzer")
            begin = time.monotonic()
            binary, about = find_perf_analyzer(args.perf_analyzer)
            summary_["perf_analyzer"] = {"available": binary is not None, "about": about, "path": binary}
            if binary is None:
                log(f"  {about}")
            else:
                summary_["perf_analyzer"]["cases"] = run_perf_analyzer(binary, server, items, plan, workdir)
            stages["perf_analyzer"] = round(time.monotonic() - begin, 1)

        # The query path as deployed: `xmodal export --quantize int8` (and the demo) serve INT8 when
        # its gate accepts it, FP32 otherwise.
        precision = "int8" if exported.int8_gate and exported.int8_gate.get("accepted") else "fp32"
        log(f"[5/6] one embed_text query, {plan.latency_queries} times, served {precision.upper()}")
        begin = time.monotonic()
        files = exported.int8 if precision == "int8" else exported.fp32
        latency_sessions = {encoder: ort_session(path, args.threads) for encoder, path in files.items()}
        with served(exported, workdir / "latency", summary_, precision) as (server, admin):
            summary_["embed_text_query"] = bench_embed_text_latency(server, admin, items, tokenizer, exported.card,
                                                                    latency_sessions, plan.latency_queries)
        summary_["embed_text_query"]["precision"] = precision
        latency = summary_["embed_text_query"]["latency"]
        local = summary_["embed_text_query"]["in_process_latency"]
        log(f"  p50 {latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms "
            f"(in-process tokenise + ORT: p50 {local['p50_ms']:.2f} ms, p99 {local['p99_ms']:.2f} ms)")
        stages["embed_text_query"] = round(time.monotonic() - begin, 1)

        log(f"[6/6] instance_group sweep: {', '.join(sweep_label(*config) for config in plan.sweep_configs)} "
            f"(encoder / preprocessing instances)")
        begin = time.monotonic()
        summary_["instance_sweep"] = bench_instance_sweep(exported, workdir, items, tokenizer, plan, default_groups)
        stages["instance_sweep"] = round(time.monotonic() - begin, 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary_["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summary_["stage_seconds"] = stages
    summary_["total_seconds"] = round(time.monotonic() - started, 1)
    summary_["verdict"] = verdict(summary_)
    return summary_


def run_latency_only(args: argparse.Namespace) -> dict:
    """Only the one-query `embed_text` latency (section 3), for another run: export with the INT8 gate,
    serve what `xmodal export --quantize int8` serves (INT8 when the gate accepts it, else FP32),
    measure it beside in-process tokenise + ORT of the same files, stop."""
    from xmodal.cli import resolve_data
    from xmodal.training.tokenizer import load_tokenizer

    if not (args.run / "model.safetensors").exists():
        raise SystemExit(f"no trained run at {args.run} (train one with `xmodal train`, or pass --run)")
    manifests = resolve_data(args.data)
    started = time.monotonic()
    summary_: dict[str, Any] = {"mode": "latency-only", "run": str(args.run), "threads": args.threads,
                                "machine": machine()}
    workdir = Path(tempfile.mkdtemp(prefix="xmodal-serving-latency-"))
    try:
        exported = export(args.run, workdir / "onnx", manifests, gate=True)
        precision = "int8" if exported.int8_gate and exported.int8_gate["accepted"] else "fp32"
        tokenizer = load_tokenizer(exported.tokenizer_json)
        items = load_items(manifests[0], exported.card)
        summary_["card"] = {"name": exported.card.name, "fingerprint": exported.card.fingerprint,
                            "text_encoder": json.loads((args.run / "config.json").read_text())["text_encoder"]}
        summary_["precision"] = precision
        summary_["int8_gate"] = exported.int8_gate
        files = exported.int8 if precision == "int8" else exported.fp32
        sessions = {encoder: ort_session(path, args.threads) for encoder, path in files.items()}
        with served(exported, workdir, summary_, precision) as (server, admin):
            summary_["embed_text_query"] = bench_embed_text_latency(server, admin, items, tokenizer, exported.card,
                                                                    sessions, (QUICK if args.quick else FULL).latency_queries)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary_["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summary_["total_seconds"] = round(time.monotonic() - started, 1)
    summary_["verdict"] = verdict(summary_)
    return summary_


def triton_key(model: str, protocol: str, clients: int) -> str:
    """The key of a Triton vs ORT scenario with client batches of ``CLIENT_BATCH``, as ``Scenario.key``."""
    return Scenario(model, protocol, clients, CLIENT_BATCH).key


def verdict(summary_: dict) -> dict:
    """Issue 5 item 5's targets judged on the saved figures (a --latency-only result holds the
    query's alone); ``pairs``: the fewest rounds a judged ratio is the median of."""
    from xmodal.contract import EMBED_IMAGE, EMBED_TEXT

    checks, rounds = [], []
    for encoder, by_batch in summary_.get("encoders", {}).items():
        ratio = by_batch["64"]["ort_vs_eager"]
        rounds.append(len(ratio["rounds"]))
        checks.append(at_least(f"ONNX Runtime / PyTorch eager items/s, {encoder}, batch 64", ratio["median"],
                               ORT_VS_EAGER_TARGET))
    if "triton" in summary_:
        for model in (EMBED_TEXT, EMBED_IMAGE):
            for protocol in PROTOCOLS:
                record = summary_["triton"].get(triton_key(model, protocol, CONCURRENCY[-1]))
                if record is not None:
                    rounds.append(len(record["ratio"]["rounds"]))
                checks.append(at_least(f"Triton / in-process ONNX Runtime items/s, {model} {protocol}, "
                                       f"{CONCURRENCY[-1]} clients x {CLIENT_BATCH} items",
                                       record and record["ratio"]["median"], TRITON_VS_ORT_TARGET))
    checks.append(at_most("one embed_text query through the SDK (HTTP), p99 ms",
                          summary_["embed_text_query"]["latency"]["p99_ms"], EMBED_TEXT_P99_TARGET_MS))
    return measure.verdict(checks, pairs=min(rounds) if rounds else None)


def main() -> int:
    from xmodal.cli import default_run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=default_run(),
                        help="the training run (default: the default model's, the one `make demo` trains)")
    parser.add_argument("--data", action="append", help="corpus names or manifests: the items, and the INT8 "
                        "gate's held-out set (default emoji)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, whose figures are not results")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime alike")
    parser.add_argument("--perf-analyzer", help="NVIDIA's perf_analyzer binary (default: on PATH or beside Python)")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/serving.json, "
                        "serving-quick.json with --quick)")
    parser.add_argument("--latency-only", action="store_true", help="only the one-query embed_text latency, for "
                        "another run (e.g. a MiniLM model): writes benchmarks/results/serving-latency-<run>.json")
    parser.add_argument("--verdict-from", type=Path, help="judge this saved result again, measuring nothing")
    args = parser.parse_args()
    if args.verdict_from:
        return measure.verdict_from(args.verdict_from, verdict)
    args.data = args.data or ["emoji"]
    # GNU OpenMP (torch's thread pool) spins at its barriers; on 2 shared cores a partner thread
    # that is descheduled stalls every operator, and the spinning threads slow whatever runs
    # next. Passive waiting makes eager a fair baseline. Set before torch loads; an explicit
    # setting is respected.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import render_docs

    if args.latency_only:
        summary_ = run_latency_only(args)
        out = args.out or ROOT / "benchmarks" / "results" / f"serving-latency-{args.run.name}.json"
        query = summary_["embed_text_query"]
        headline = (f"one embed_text query ({summary_['card']['text_encoder']}, {summary_['precision']}): "
                    f"p50 {query['latency']['p50_ms']:.2f} ms, p99 {query['latency']['p99_ms']:.2f} ms; in-process "
                    f"p50 {query['in_process_latency']['p50_ms']:.2f} ms, p99 {query['in_process_latency']['p99_ms']:.2f} ms")
    else:
        summary_ = run(args)
        out = args.out or ROOT / "benchmarks" / "results" / ("serving-quick.json" if args.quick else "serving.json")
        log(render_docs.serving_benchmark(summary_))
        headline = f"{summary_['mode']} run"
    status = save_verdict(out, summary_, headline)
    if not args.quick:
        log("rendered: " + ", ".join(render_docs.render(render_docs.blocks_of(out.name))))
    return status


if __name__ == "__main__":
    sys.exit(main())
