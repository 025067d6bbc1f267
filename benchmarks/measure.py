"""What the benchmark scripts share: latency distributions, and a real Triton server on a repository."""
from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


def log(message: str) -> None:
    print(message, flush=True)


def save_verdict(out: Path, summary: dict, headline: str) -> int:
    """`summary` (its computed ``verdict["met"]`` included) saved as JSON at `out`, `headline`
    logged with the verdict; the script's exit status (1 when the target was missed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    met = summary["verdict"]["met"]
    log(f"{headline}; met: {met} -> {out}")
    return 0 if met else 1


def commit(repository: Path) -> str:
    """The short hash of the checkout's HEAD, for a result's provenance."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repository, check=True,
                          capture_output=True, text=True).stdout.strip()


def distribution(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of durations, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {"n": int(ms.size), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def start_server(repository: Path):
    """The real tritonserver on `repository`, started on free ports (not yet waited for)."""
    from xmodal.server import TritonServer, free_port

    server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    return server


@contextmanager
def triton_server(repository: Path, timeout: float = 300) -> Iterator:
    """A ready server on `repository`, stopped on leaving."""
    server = start_server(repository)
    try:
        server.wait_ready(timeout=timeout)
        yield server
    finally:
        server.stop()
