"""What the benchmark scripts share: verdicts on targets fixed in advance, paired runs in
alternating order, latency distributions, and a real Triton server on a repository."""
from __future__ import annotations

import argparse
import json
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
# Issue 18 item 6: a ratio is the median of at least this many pairs (or rounds) of runs, the
# order alternating from one to the next, so that a machine drifting in speed weighs on both sides.
MIN_PAIRS = 3


def log(message: str) -> None:
    print(message, flush=True)


# -- verdicts ---------------------------------------------------------------------------------
# Every benchmark states its targets as constants (with the issue that fixed them), and one
# function of its saved figures, `verdict(summary)`, judges them, so that a stored result can be
# judged again without measuring (``--verdict-from``) and the docs render what it computed.

def check(target: str, measured: Any, met: bool | None) -> dict:
    """One target judged: what it asks, what was measured, whether it holds (None: not measured)."""
    return {"target": target, "measured": measured, "met": met}


def at_least(target: str, measured: float | None, bound: float) -> dict:
    return check(f"{target} >= {bound}", measured, None if measured is None else measured >= bound)


def at_most(target: str, measured: float | None, bound: float) -> dict:
    return check(f"{target} <= {bound}", measured, None if measured is None else measured <= bound)


def verdict(checks: list[dict], *, pairs: int | None = None) -> dict:
    """The checks and whether all hold: ``met`` False when one is missed, None when one was not
    measured. `pairs`: how many paired runs (or rounds) the ratios are the median of, beside
    how many the benchmark takes now."""
    states = [c["met"] for c in checks]
    judged = {"met": False if False in states else None if None in states else True, "checks": checks}
    if pairs is not None:
        judged |= {"pairs": pairs, "pairs_required": MIN_PAIRS}
    return judged


def verdict_line(judged: dict) -> str:
    """The verdict in one line, as the benchmarks log it and the docs show it."""
    missed = [c["target"] for c in judged["checks"] if c["met"] is False]
    unmeasured = [c["target"] for c in judged["checks"] if c["met"] is None]
    line = ("every target met" if judged["met"] else f"missed: {'; '.join(missed)}" if missed
            else f"not measured: {'; '.join(unmeasured)}")
    if judged.get("pairs") is not None and judged["pairs"] < judged["pairs_required"]:
        line += f" (measured with {judged['pairs']} pair(s); the benchmark now takes {judged['pairs_required']})"
    return line


def save_verdict(out: Path, summary: dict, headline: str) -> int:
    """`summary` (its computed ``verdict`` included) saved as JSON at `out`, `headline` logged
    with the verdict; the script's exit status: 1 when a target was missed, 0 otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log(f"{headline}; {verdict_line(summary['verdict'])} -> {out}")
    return 1 if summary["verdict"]["met"] is False else 0


def verdict_from(path: Path, judge: Callable[[dict], dict]) -> int:
    """The stored result at `path` judged again by `judge` (the benchmark's own verdict function),
    without measuring; saved back with its verdict. The exit status of ``save_verdict``."""
    summary = json.loads(path.read_text())
    summary["verdict"] = judge(summary)
    return save_verdict(path, summary, f"{path.name} judged again from its stored figures")


def alternating(index: int, contenders: Sequence[T]) -> list[T]:
    """The order of round `index`: as given on even rounds, reversed on odd ones."""
    return list(contenders) if index % 2 == 0 else list(reversed(contenders))


def pairs_count(text: str) -> int:
    """argparse type of a count of pairs or rounds: at least ``MIN_PAIRS``."""
    count = int(text)
    if count < MIN_PAIRS:
        raise argparse.ArgumentTypeError(f"at least {MIN_PAIRS} (issue 18 item 6), got {count}")
    return count


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
