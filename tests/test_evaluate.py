import numpy as np
import pytest

from xmodal.training.evaluate import evaluate_report, first_relevant_ranks, mean_average_precision, recall_summary


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
    report = evaluate_report({"global": np.eye(3)}, {"global": np.eye(3)}, ["a", "b", "c"], ["a", "b", "c"])
    assert report["global"]["rsum"] == pytest.approx(600.0)


def test_map_at_all_by_hand():
    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    # the query ranks g0 (A), g1 (B), g2 (A): precision 1/1 at g0 and 2/3 at g2 → AP = (1 + 2/3) / 2
    ap = mean_average_precision(np.array([[1.0, 0.0]]), gallery, ["A"], ["A", "B", "A"])
    assert ap == pytest.approx(100 * (1 + 2 / 3) / 2)
    # a second query of category B: g1 is its only relevant item, at rank 2 → AP = 1/2
    ap = mean_average_precision(np.array([[1.0, 0.0], [1.0, 0.0]]), gallery, ["A", "B"], ["A", "B", "A"], block=1)
    assert ap == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 2) / 2)


def test_map_is_none_without_categories_and_report_writes_a_plot(tmp_path):
    assert mean_average_precision(np.eye(2), np.eye(2), [None, None], ["A", "B"]) is None
    plot = tmp_path / "recall.png"
    report = evaluate_report(
        {"global": np.eye(3), "concept": np.eye(3)}, {"global": np.eye(3), "concept": np.eye(3)},
        ["a", "b", "c"], ["a", "b", "c"], image_categories=["x", "x", "y"], text_categories=["x", "x", "y"],
        plot_path=plot,
    )
    assert set(report) == {"global", "concept"}
    # identity embeddings: each query ranks its own item first, then the tie-broken rest in
    # index order, so both x-queries see x, x, y and the y-query sees y first: AP = 1 each.
    assert report["concept"]["image_to_text"]["MAP"] == pytest.approx(100.0)
    assert report["concept"]["text_to_image"]["R@1"] == pytest.approx(100.0)
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reranked_scores_reorder_only_the_top_n() -> None:
    from xmodal.training.evaluate import ranks_in_scores, reranked_scores

    first = np.array([[0.9, 0.5, 0.1, 0.0],
                      [0.0, 0.2, 0.8, 0.3]])
    calls = []

    def rescore(rows, columns):
        calls.append((rows.tolist(), columns.tolist()))
        return np.where(columns == 1, 5.0, 0.0) + np.where(columns == 3, 9.0, 0.0)  # the second stage likes 3, then 1

    result = reranked_scores(first, 2, rescore)
    assert calls == [([[0, 0], [1, 1]], [[0, 1], [2, 3]])]  # each row's top 2 by the first stage
    assert np.argsort(-result, axis=1).tolist() == [[1, 0, 2, 3], [3, 2, 1, 0]]
    # row 0: column 3 is outside the top 2, so the second stage never sees it and it stays last
    relevant = np.array([[False, False, False, True], [False, True, False, False]])
    assert ranks_in_scores(result, relevant).tolist() == [3, 2]
