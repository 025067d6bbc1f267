"""The test suite's wall time against the suite of an earlier commit, side by side on this machine.

The architecture issue set the target before the change (``TARGET_RATIO``): the whole suite in
a fraction of the time of the suite before it (commit ``BASELINE``), with no test dropped. Each pair runs the earlier
commit's suite (a git worktree and its own build of the package, with this checkout's
installed dependencies, in one process as it was run then) and this checkout's suite (`make test`'s
pytest command, with the options pyproject.toml gives it), in turn, the order alternating from
pair to pair; the ratio is taken pair by pair, so a machine that drifts in speed affects both
sides of it. ``verdict`` judges the saved pairs: the median ratio at most ``TARGET_RATIO``, every
run green, and this suite at least as many tests as the earlier one.

    .venv/bin/python benchmarks/suite_time.py
    .venv/bin/python benchmarks/suite_time.py --verdict-from benchmarks/results/suite_time.json
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import measure  # noqa: E402 - the benchmarks' shared helpers
from measure import at_most, check, commit, log, save_verdict  # noqa: E402

BASELINE = "e9bcd65"
TARGET_RATIO = 0.5  # the architecture issue: this suite's wall time / the baseline's
SUMMARY = re.compile(r"(\d+) passed(?:, (\d+) skipped)?(?:, \d+ \w+)* in ([\d.]+)s")


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def overlay_venv(venv: Path, tree: Path) -> Path:
    """A venv whose packages are this one's, except xmodal: the build of `tree`. A path line in a
    .pth file adds this venv's site-packages without running the .pth files in it, so the
    editable install of this checkout (a finder that a .pth file installs, ahead of the path) is
    left out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    current_site = next(path for path in map(Path, sys.path) if path.name == "site-packages" and
                        path.is_relative_to(Path(sys.prefix)))
    log(f"building {tree.name} into {site}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(tree)], check=True)
    (site / "zz_dependencies.pth").write_text(f"{current_site}\n")
    return venv / "bin" / "python"


def run_suite(name: str, command: list[str], cwd: Path, env: dict[str, str], log_file: Path) -> dict:
    started = time.monotonic()
    with open(log_file, "w") as out:
        result = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    wall = time.monotonic() - started
    tail = log_file.read_text()[-3000:]
    found = SUMMARY.findall(tail)
    passed, skipped, pytest_seconds = (int(found[-1][0]), int(found[-1][1] or 0), float(found[-1][2])) if found else (0, 0, None)
    run = {"suite": name, "returncode": result.returncode, "passed": passed, "skipped": skipped,
           "wall_s": round(wall, 1), "pytest_s": pytest_seconds}
    log(f"  {name}: {passed} passed, {skipped} skipped, rc {result.returncode}, wall {wall:.1f} s")
    return run


def verdict(summary: dict) -> dict:
    """``TARGET_RATIO`` judged on the saved pairs, with every run green and no test dropped."""
    pairs = summary["pairs"]
    ratio = statistics.median(pair["ratio"] for pair in pairs)
    green = all(pair[side]["returncode"] == 0 and pair[side]["skipped"] == 0 for pair in pairs
                for side in ("baseline", "current"))
    kept = all(pair["current"]["passed"] >= pair["baseline"]["passed"] for pair in pairs)
    return measure.verdict([at_most(f"suite wall time / {summary['baseline']}'s, median of the pairs", ratio,
                                    TARGET_RATIO),
                            check("every run green, none skipped", green, green),
                            check("no test dropped", kept, kept)], pairs=len(pairs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=measure.pairs_count, default=measure.MIN_PAIRS,
                        help="baseline/current pairs to run (default %(default)s)")
    parser.add_argument("--baseline", default=BASELINE, help="the earlier commit (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "suite_time.json")
    parser.add_argument("--verdict-from", type=Path, help="judge this saved result again, measuring nothing")
    args = parser.parse_args()
    if args.verdict_from:
        return measure.verdict_from(args.verdict_from, verdict)

    work = Path(tempfile.mkdtemp(prefix="suite-time-"))
    tree = work / "baseline"
    git("worktree", "add", "--detach", str(tree), args.baseline)
    try:
        baseline_python = overlay_venv(work / "venv", tree)
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        # Run from outside the worktree: its top-level xmodal/ folder is not the package (the
        # subpackages live in training/, indexer/ ...), and Ray puts its driver's working
        # directory on its workers' path. -P: nor on the driver's.
        baseline_command = [str(baseline_python), "-P", "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
                            "-c", str(tree / "pyproject.toml"), "--rootdir", str(tree), str(tree / "tests")]
        current_command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]

        pairs = []
        for pair in range(args.pairs):
            log(f"pair {pair + 1}/{args.pairs}")
            order = measure.alternating(pair, ("baseline", "current"))
            runs = {}
            for name in order:
                if name == "baseline":
                    runs[name] = run_suite(name, baseline_command, work, env, work / f"baseline-{pair}.log")
                else:
                    runs[name] = run_suite(name, current_command, REPO, env, work / f"current-{pair}.log")
            runs["ratio"] = round(runs["current"]["wall_s"] / runs["baseline"]["wall_s"], 3)
            log(f"  ratio {runs['ratio']}")
            pairs.append(runs)
    finally:
        git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(work, ignore_errors=True)

    ratio = statistics.median(pair["ratio"] for pair in pairs)
    summary = {
        "benchmark": "suite_time",
        "commit": commit(REPO),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "baseline": args.baseline,
        "cpus": os.cpu_count(),
        "pairs": pairs,
        "median_ratio": ratio,
    }
    summary["verdict"] = verdict(summary)
    return save_verdict(args.out, summary, f"median ratio {ratio}")


if __name__ == "__main__":
    sys.exit(main())
