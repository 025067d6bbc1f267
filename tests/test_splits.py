"""training/splits.py: which rows train, select and report, and the unseen concepts."""
from pathlib import Path

import pytest

from xmodal.manifest import ManifestRow
from xmodal.training.splits import concept_share, is_unseen_concept, split_rows


def row(concept: str, style: str, split: str) -> ManifestRow:
    return ManifestRow(id=f"{style}/{concept}", concept=concept, style=style, split=split, image=Path("x.png"),
                       captions=[concept])


CONCEPTS = [f"concept-{i}" for i in range(2000)]


def test_the_unseen_concepts_are_a_stable_share_by_hash():
    unseen = [c for c in CONCEPTS if is_unseen_concept(c, 0.1)]
    assert 150 <= len(unseen) <= 250  # 10 % of 2000, as a hash spreads them
    # Fixed values: the same set on every machine and Python (hash() is salted per process).
    assert concept_share("1f600") == pytest.approx(0.18967408723675724)
    assert [c for c in CONCEPTS[:60] if is_unseen_concept(c, 0.1)] == ["concept-4", "concept-22", "concept-23", "concept-42"]
    assert not any(is_unseen_concept(c, 0.0) for c in CONCEPTS)
    # A larger share holds every concept of a smaller one: growing it never moves a concept back.
    assert set(unseen) <= {c for c in CONCEPTS if is_unseen_concept(c, 0.2)}


def test_rows_split_into_train_validation_test_and_the_unseen_sets():
    rows = [row(c, style, split) for c in CONCEPTS[:300]
            for style, split in (("google", "train"), ("fluent", "train"), ("openmoji", "test"))]
    rows.append(row("own-val", "mine", "val"))
    splits = split_rows(rows, validation_style="fluent", unseen_concepts=0.1)
    unseen = {c for c in CONCEPTS[:300] if is_unseen_concept(c, 0.1)}
    assert unseen and len(unseen) < 300
    assert {r.style for r in splits.train} == {"google"}
    assert {r.concept for r in splits.train} == set(CONCEPTS[:300]) - unseen  # no style trains an unseen concept
    assert splits.withheld == len(unseen)
    assert {(r.style, r.concept in unseen) for r in splits.validation} == {("fluent", False), ("mine", False)}
    assert {r.concept for r in splits.validation_unseen} == unseen and {r.style for r in splits.validation_unseen} == {"fluent"}
    assert {r.concept for r in splits.test} == set(CONCEPTS[:300]) - unseen
    assert {r.concept for r in splits.test_unseen} == unseen
    assert list(splits.evaluated()) == ["validation", "validation_unseen", "test", "test_unseen"]
    assert splits.held_out()[0] == "validation"


def test_without_a_validation_style_or_unseen_share_the_test_set_is_the_held_out_one():
    rows = [row(c, "google", "train") for c in CONCEPTS[:20]] + [row(c, "openmoji", "test") for c in CONCEPTS[:20]]
    splits = split_rows(rows, validation_style="fluent", unseen_concepts=0.0)
    assert len(splits.train) == len(splits.test) == 20 and splits.withheld == 0
    assert list(splits.evaluated()) == ["test"] and splits.held_out() == ("test", splits.test)


def test_a_bad_split_or_share_is_refused_by_name():
    with pytest.raises(ValueError, match="x/1: split must be 'train', 'val' or 'test', not 'dev'"):
        split_rows([ManifestRow(id="x/1", concept="1", style="x", split="dev", image=Path("a"), captions=["a"])],
                   validation_style=None, unseen_concepts=0.0)
    with pytest.raises(ValueError, match="unseen_concepts"):
        split_rows([], validation_style=None, unseen_concepts=1.5)
