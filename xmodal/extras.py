"""Which of xmodal's optional parts are installed, so that a command says which extra it needs.

The base install is the client alone; training, export, serving, indexing and the corpora
are extras (pyproject.toml's ``[project.optional-dependencies]``). Their lists are read from
xmodal's installed metadata, so pyproject.toml stays the only place that names them. A
command whose extra is missing raises :class:`MissingExtra` naming the extra to install,
before any of its imports fail.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re

PACKAGE = "xmodal"

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class MissingExtra(ImportError):
    """A command needs an extra of xmodal that is not installed."""


def _requirements() -> list[str] | None:
    try:
        return importlib.metadata.requires(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return None


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def missing(extra: str) -> list[str]:
    """The distributions of ``xmodal[extra]`` (and of the extras it names) that are not installed."""
    requirements = _requirements()
    if requirements is None:
        return []
    absent: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for requirement in requirements:
            spec, _, marker = requirement.partition(";")
            wanted = _EXTRA_MARKER.search(marker)
            if wanted is None or wanted.group(1) != name:
                continue
            match = _NAME.match(spec)
            distribution, extras = match.group(1), match.group(2)
            if distribution.lower() == PACKAGE:
                for inner in (extras or "").split(","):
                    if inner.strip():
                        visit(inner.strip())
            elif not _installed(distribution) and distribution not in absent:
                absent.append(distribution)

    visit(extra)
    return absent


def has_onnxruntime() -> bool:
    """Either runtime extra: [cpu] (onnxruntime) and [gpu] (onnxruntime-gpu) both install the
    ``onnxruntime`` package, and only one of them may be installed."""
    return importlib.util.find_spec("onnxruntime") is not None


def require(command: str, *extras: str, onnxruntime: bool = False) -> None:
    """Raise :class:`MissingExtra` unless every extra in `extras` is installed (and, with
    `onnxruntime`, one of the runtime extras), naming the pip command that installs them."""
    absent_by_extra = {extra: missing(extra) for extra in extras}
    needed = [extra for extra, absent in absent_by_extra.items() if absent]
    runtime_missing = onnxruntime and not has_onnxruntime()
    if not needed and not runtime_missing:
        return
    absent = sorted({name for extra in needed for name in absent_by_extra[extra]})
    parts = []
    if needed:
        parts.append(f"{', '.join(f'xmodal[{extra}]' for extra in needed)} (missing: {', '.join(absent)})")
    if runtime_missing:
        parts.append("an ONNX Runtime: xmodal[cpu], or xmodal[gpu] on a GPU machine (never both)")
    install = ",".join(needed + (["cpu"] if runtime_missing else []))
    raise MissingExtra(f"`xmodal {command}` needs {' and '.join(parts)}; install with "
                       f"pip install 'xmodal[{install}]' (from a clone of the repository: pip install '.[{install}]')")
