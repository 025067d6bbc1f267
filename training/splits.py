"""Which rows train, which select, which report: the splits every run and every figure share.

- **train**: the manifests' ``train`` rows, except those of the validation style and those of
  unseen concepts.
- **validation**: the rows of ``validation_style``, a style the manifests mark for training
  that no run trains on. Every choice (a recipe's settings, the default model, the INT8 gate)
  is made on it. A manifest's own ``val`` rows are validation rows too.
- **test**: the manifests' ``test`` rows (the emoji corpus: OpenMoji), reported once, never
  chosen on.
- **unseen concepts**: a fixed share of concepts, chosen by a stable hash of the concept key,
  that no style trains on. They are evaluated apart (``validation_unseen``, ``test_unseen``) so
  a figure says how the model does on things it never saw, not only in a drawing style it
  never saw.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

from xmodal.manifest import ManifestRow

VALIDATION_SPLIT = "val"
# The evaluated sets a run reports, in order: the selection sets first.
EVALUATED = ("validation", "validation_unseen", "test", "test_unseen")


def concept_share(concept: str) -> float:
    """Where a concept falls in [0, 1): the same on every machine and run (not Python's hash())."""
    digest = hashlib.sha256(concept.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_unseen_concept(concept: str, share: float) -> bool:
    return concept_share(concept) < share


@dataclass
class Splits:
    train: list[ManifestRow] = field(default_factory=list)
    validation: list[ManifestRow] = field(default_factory=list)
    validation_unseen: list[ManifestRow] = field(default_factory=list)
    test: list[ManifestRow] = field(default_factory=list)
    test_unseen: list[ManifestRow] = field(default_factory=list)
    # Rows of unseen concepts in trained styles: never trained on, not evaluated either.
    withheld: int = 0

    def evaluated(self) -> dict[str, list[ManifestRow]]:
        """The non-empty evaluated sets by name, in EVALUATED's order."""
        return {name: getattr(self, name) for name in EVALUATED if getattr(self, name)}

    def held_out(self) -> tuple[str, list[ManifestRow]]:
        """The set choices are made on: validation, or test when the data has no validation rows."""
        return ("validation", self.validation) if self.validation else ("test", self.test)


def split_rows(rows: Iterable[ManifestRow], *, validation_style: str | None, unseen_concepts: float) -> Splits:
    """Sort manifest rows into the run's sets (module docstring). ``unseen_concepts`` is the share
    of concepts held out of training, 0 for none."""
    if not 0.0 <= unseen_concepts < 1.0:
        raise ValueError(f"unseen_concepts must be a share in [0, 1), got {unseen_concepts!r}")
    splits = Splits()
    for row in rows:
        unseen = unseen_concepts > 0 and is_unseen_concept(row.concept, unseen_concepts)
        if row.split == "test":
            (splits.test_unseen if unseen else splits.test).append(row)
        elif row.split == VALIDATION_SPLIT or (row.split == "train" and row.style == validation_style):
            (splits.validation_unseen if unseen else splits.validation).append(row)
        elif row.split == "train":
            if unseen:
                splits.withheld += 1
            else:
                splits.train.append(row)
        else:
            raise ValueError(f"{row.id}: split must be 'train', '{VALIDATION_SPLIT}' or 'test', not {row.split!r}")
    return splits
