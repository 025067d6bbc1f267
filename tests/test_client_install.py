"""The client installs alone: `pip install <repo>` without extras gives an environment with
no torch, Ray, ONNX Runtime or tritonserver, whose Python answers a query against the tiny
stack (the real Triton server and a milvus-lite collection) with the full install's hits.

Slow the first time: the venv is built once per set of base dependencies and Python version under
~/.cache/xmodal/client-venv ($XMODAL_CLIENT_VENV_CACHE), and xmodal itself once per state
of its source; a rerun with both cached costs the tiny stack and a few subprocesses.
$XMODAL_CLIENT_PYTHON picks another interpreter for the client venv (the client installs on
Python 3.13, where the full stack does not).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Callable

import pytest

from xmodal import store
from xmodal.client import Client
from xmodal.indexer import IndexJob

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
# Import names that only the extras bring: pytriton is the wheel that ships tritonserver.
HEAVY_MODULES = ("torch", "ray", "onnxruntime", "pytriton")
QUERY = "a red face"
# Cache entries nobody used for this long are removed when a new one is built.
UNUSED_DAYS = 7


def cache_root() -> Path:
    return Path(os.environ.get("XMODAL_CLIENT_VENV_CACHE", Path.home() / ".cache" / "xmodal" / "client-venv"))


def package_folders() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted(set(pyproject["tool"]["setuptools"]["package-dir"].values()))


def source_digest() -> str:
    """pyproject.toml and every file of the packages it ships, as a wheel built now would hold them."""
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    for folder in package_folders():
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def clean_source(directory: Path) -> Path:
    """What a wheel is built from, copied into `directory`: pyproject.toml, the README and the
    package folders. Built in the checkout, setuptools would leave build/ there and reuse it, so a
    module removed from the source would still ship from build/lib."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, directory / name)
    for folder in package_folders():
        shutil.copytree(REPO / folder, directory / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return directory


def cached(directory: Path, build: Callable[[Path], None]) -> Path:
    """`directory`, built by `build` in a temporary sibling and renamed into place: test runs
    of other checkouts sharing the cache never see half an entry."""
    if directory.exists():
        os.utime(directory)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    for old in directory.parent.iterdir():
        if time.time() - old.stat().st_mtime > UNUSED_DAYS * 86400:
            shutil.rmtree(old, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        build(partial)
        os.rename(partial, directory)
    except OSError:
        if not directory.exists():  # not another run's entry that arrived first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                   check=True, timeout=1200)


@pytest.fixture(scope="module")
def client_env() -> dict[str, str]:
    """The environment of a Python that has the client install only.

    The venv holds the dependencies `pip install <repo>` resolved (xmodal itself uninstalled
    again), keyed by the base dependencies in pyproject.toml; xmodal is a build of the current source put first on
    PYTHONPATH, keyed by that source, so a code change costs one wheel build, not a venv.
    """
    base_python = os.environ.get("XMODAL_CLIENT_PYTHON", sys.executable)
    python_tag = subprocess.run([base_python, "-c", "import sys; print('py%d.%d' % sys.version_info[:2])"],
                                check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dependencies = json.dumps([project["build-system"], project["project"]["dependencies"]])
    dependencies_key = hashlib.sha256(dependencies.encode()).hexdigest()[:16]

    def build_venv(path: Path) -> None:
        subprocess.run([base_python, "-m", "venv", str(path)], check=True, timeout=120)
        with tempfile.TemporaryDirectory() as source:
            # --no-compile: no byte code written for every module of every dependency (Python
            # compiles what a test imports)
            pip(path / "bin" / "python", "--no-compile", str(clean_source(Path(source))))
        subprocess.run([str(path / "bin" / "python"), "-m", "pip", "uninstall", "--quiet", "--yes", "xmodal"],
                       check=True, timeout=120)

    venv = cached(cache_root() / f"venv-{python_tag}-{dependencies_key}", build_venv)
    python = venv / "bin" / "python"

    def build_xmodal(path: Path) -> None:
        with tempfile.TemporaryDirectory() as source:
            pip(python, "--no-deps", "--no-compile", "--target", str(path), str(clean_source(Path(source))))

    build = cached(cache_root() / f"xmodal-{python_tag}-{source_digest()}", build_xmodal)
    # No PYTHONPATH or venv of the test run leaks in.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PYTHONPATH": str(build), "PYTHON": str(python)}


def run_client_python(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd outside the repository: its top-level xmodal/ folder must not shadow the installed build
    return subprocess.run([env["PYTHON"], *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_triton, tiny_corpus, ray_local):
    """The tiny model served by Triton (the session's), its images indexed into milvus-lite, the
    full install's answer to QUERY; the database released so that another process can open it."""
    manifest, images = tiny_corpus
    db = tmp_path_factory.mktemp("client_install") / "milvus" / "xmodal.db"
    report = IndexJob(manifest=manifest, triton_url=tiny_triton.url, milvus_uri=str(db), batch_size=4,
                      progress=False).run()
    assert report.rows_written == len(images)
    with Client(tiny_triton.url, db) as client:
        expected = client.search_text(QUERY, k=3)
    store.release_local(db)
    yield {"url": tiny_triton.url, "db": db, "expected": expected}


def test_the_client_install_has_no_training_serving_or_indexing_parts(client_env, tmp_path):
    code = ("import importlib.util, json, xmodal, xmodal.client, xmodal.client.sdk\n"
            f"print(json.dumps({{'xmodal': xmodal.__file__, 'present': [m for m in {HEAVY_MODULES!r} "
            "if importlib.util.find_spec(m)]}))")
    result = run_client_python(client_env, "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["present"] == []
    assert found["xmodal"].startswith(client_env["PYTHONPATH"])
    assert not list((Path(client_env["PYTHON"]).parent).glob("tritonserver*"))


@pytest.mark.parametrize("command, extras", [
    (["train"], "train"), (["export"], "train,cpu"), (["serve"], "serve,cpu"), (["index"], "index"),
    (["data", "fetch", "emoji"], "data"),
])
def test_a_command_of_an_extra_names_the_extra_to_install(client_env, tmp_path, command, extras):
    result = run_client_python(client_env, "-m", "xmodal.cli", *command, cwd=tmp_path)
    assert result.returncode == 1
    assert f"pip install 'xmodal[{extras}]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_client_install_answers_a_query(client_env, stack, tmp_path):
    code = ("import json, sys\nfrom xmodal.client import Client\n"
            "with Client(sys.argv[1], sys.argv[2]) as client:\n"
            f"    hits = client.search_text({QUERY!r}, k=3)\n"
            "print(json.dumps([[hit.id, hit.score] for hit in hits]))")
    result = run_client_python(client_env, "-c", code, stack["url"], str(stack["db"]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout.splitlines()[-1])
    assert [hit_id for hit_id, _ in hits] == [hit.id for hit in stack["expected"]]
    assert [score for _, score in hits] == pytest.approx([hit.score for hit in stack["expected"]], abs=1e-5)
