"""Files written so that a crash never leaves a half-written one trusted, and the log of the
inputs a long run skipped; shared by the corpus fetchers, the readers and the indexer."""
from __future__ import annotations

import json
import os
from pathlib import Path


class SkipLog:
    """Images that could not be produced, one JSON line each (path + reason); started empty per run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def record(self, source: str, reason: str) -> None:
        self.count += 1
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"path": source, "reason": reason}, ensure_ascii=False) + "\n")


def write_atomic(path: Path, data: bytes) -> None:
    # a half-written image would be trusted as done by the next run's skip-existing check
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
