import numpy as np
import pytest

from xmodal.training.evaluate import evaluate_retrieval, first_relevant_ranks, recall_summary


def test_ranks_by_hand():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    gallery_keys = ["a", "b", "c"]
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # q0 · gallery = [1, 0, .6] → "a" first; q1 = [0, 1, .8] → "b" first; q2 looks for "c": 1 > .8 → rank 1
    ranks = first_relevant_ranks(queries, gallery, ["a", "b", "c"], gallery_keys)
    assert ranks.tolist() == [0, 0, 1]


def test_ties_count_against_the_query_and_several_relevant_items_take_the_best():
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    keys = ["x", "y", "z", "z"]
    queries = np.array([[1.0, 0.0], [1.0, 0.0]])
    ranks = first_relevant_ranks(queries, gallery, ["y", "z"], keys)
    # query for "y" ties with "x" (1 == 1): rank 1. Query for "z": best z scores .5, beaten by x and y.
    assert ranks.tolist() == [1, 2]


def test_blocks_give_the_same_ranks_as_one_pass():
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(50, 8)), rng.normal(size=(40, 8))
    qkeys, gkeys = [str(i % 40) for i in range(50)], [str(i) for i in range(40)]
    np.testing.assert_array_equal(
        first_relevant_ranks(queries, gallery, qkeys, gkeys, block=7),
        first_relevant_ranks(queries, gallery, qkeys, gkeys, block=1000),
    )


def test_query_without_relevant_item_is_an_error():
    with pytest.raises(ValueError, match="no relevant gallery item"):
        first_relevant_ranks(np.eye(2), np.eye(2), ["a", "q"], ["a", "b"])


def test_recall_summary_and_rsum():
    summary = recall_summary(np.array([0, 1, 4, 9, 20]))
    assert summary["R@1"] == pytest.approx(20.0)
    assert summary["R@5"] == pytest.approx(60.0)
    assert summary["R@10"] == pytest.approx(80.0)
    assert summary["medr"] == 5.0
    metrics = evaluate_retrieval(np.eye(3), np.eye(3), ["a", "b", "c"], ["a", "b", "c"])
    assert metrics["rsum"] == pytest.approx(600.0)
