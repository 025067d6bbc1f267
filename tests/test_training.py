"""Tiny end-to-end trainings of every recipe, export of their towers, and resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from xmodal.export.onnx import export_run
from xmodal.training.run import CHECKPOINT_FILE, WEIGHTS_FILE
from xmodal.training.train import train

pytestmark = pytest.mark.slow

# Small random towers keep this fast; the frozen image side exercises the feature cache.
SMALL = dict(image_encoder="small_cnn", text_encoder="small_text_cnn", image_size=32, dim=32,
             head_hidden=64, batch_size=8, minutes=60.0)


@pytest.fixture
def manifest(emoji_manifest):
    """The session's 12-concept emoji corpus: every training here reads it, none writes it."""
    return emoji_manifest


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_DATA", str(tmp_path / "data"))  # the feature cache goes here


@pytest.mark.parametrize("recipe", ["infonce", "vsepp", "dualpath", "mthcn", "ccl", "cmgans", "cran", "mcsm"])
def test_each_recipe_trains_evaluates_and_exports(recipe, manifest, tmp_path):
    overrides = dict(SMALL, epochs=4)
    if recipe == "mthcn":
        overrides["stages"] = [
            {"name": "warmup", "fraction": 0.5, "losses": [
                {"loss": "vsepp", "level": "concept", "weight": 1.0, "hardest": False},
                {"loss": "vsepp", "level": "exterior", "weight": 1.0, "hardest": False}]},
            {"name": "main", "fraction": 0.5, "losses": [
                {"loss": "hbtr", "level": "concept", "weight": 1.0},
                {"loss": "hbtr", "level": "exterior", "weight": 1.0},
                {"loss": "ssc", "level": "concept", "cluster_level": "exterior", "weight": 0.5, "clusters": 4}]},
        ]
    report = train(manifest, tmp_path / "run", recipe=recipe, progress=False, **overrides)

    assert report["epochs"] == 4
    assert all(np.isfinite(h["loss"]) for h in report["history"])
    assert report["train_styles"] == ["google", "twitter"] and report["test_styles"] == ["openmoji"]
    outputs = {"mthcn": {"global", "concept", "exterior"}, "ccl": {"global", "instance", "fragment"}}.get(recipe, {"global"})
    reranked = {"rerank@20"} if recipe in ("cran", "mcsm") else set()  # the scorer's second stage over `global`
    assert set(report["test"]) == outputs | reranked
    for output in outputs:
        assert report["test"][output]["image_to_text"]["MAP"] is not None
    for output in reranked:
        assert 0 <= report["test"][output]["rsum"] <= 600
    stages = {"dualpath": ["I", "I", "II", "II"], "mthcn": ["warmup", "warmup", "main", "main"],
              "ccl": ["warmup", "main", "main", "main"]}
    if recipe in stages:
        assert [h["stage"] for h in report["history"]] == stages[recipe]
    assert (tmp_path / "run" / "recall.png").exists()
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()  # a finished run leaves only its results

    exported = export_run(tmp_path / "run", tmp_path / "onnx")
    assert set(exported.card.embeddings) == outputs
    assert max(exported.parity.values()) <= 1e-4


def test_mthcn_global_is_the_weighted_fusion_of_its_levels(manifest, tmp_path):
    import onnxruntime as ort

    train(manifest, tmp_path / "run", recipe="mthcn", progress=False, epochs=1, **{k: v for k, v in SMALL.items()},
          fusion={"concept": 0.7, "exterior": 0.3})
    exported = export_run(tmp_path / "run", tmp_path / "onnx")
    session = ort.InferenceSession(str(exported.text_onnx), providers=["CPUExecutionProvider"])
    a, b = (np.array([[2, 3, 4]]), np.array([[5, 6, 0]]))
    (ga, ca, ea), (gb, cb, eb) = (session.run(["global", "concept", "exterior"], {"input_ids": x}) for x in (a, b))
    assert float(ga @ gb.T) == pytest.approx(0.7 * float(ca @ cb.T) + 0.3 * float(ea @ eb.T), abs=1e-5)
    assert np.linalg.norm(ga) == pytest.approx(1.0, abs=1e-5)


def test_a_killed_run_resumes_to_the_same_weights(manifest, tmp_path):
    """kill -9 after a checkpoint, run the same command again: the result equals an uninterrupted run."""
    epochs = 12  # killed after the first, so the resumed run trains the other 11
    command = [sys.executable, "-m", "xmodal.cli", "train", "--recipe", "infonce_small", "--data", str(manifest),
               "--epochs", str(epochs), "--minutes", "60", "--batch-size", "8"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    killed = tmp_path / "killed"
    process = subprocess.Popen(command + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (killed / CHECKPOINT_FILE).exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / WEIGHTS_FILE).exists(), "the run finished before it could be killed"

    resumed = subprocess.run(command + ["--out", str(killed)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout

    whole = tmp_path / "whole"
    subprocess.run(command + ["--out", str(whole)], env=env, capture_output=True, check=True, timeout=300)
    assert json.loads((killed / "eval.json").read_text())["epochs"] == epochs
    resumed_weights, whole_weights = load_file(str(killed / WEIGHTS_FILE)), load_file(str(whole / WEIGHTS_FILE))
    assert resumed_weights.keys() == whole_weights.keys()
    for name in whole_weights:
        np.testing.assert_allclose(resumed_weights[name], whole_weights[name], atol=1e-5, err_msg=name)


def test_a_checkpoint_of_an_earlier_format_is_refused_with_what_to_do(tmp_path):
    """A run killed under the loss modules before objectives.py cannot resume here: its loss
    parameters are stored under other keys. It is refused by name, not with a state-dict error."""
    import torch

    from xmodal.training.recipes import recipe_config
    from xmodal.training.train import CHECKPOINT_FORMAT, _config_fingerprint, _load_checkpoint

    config = recipe_config("infonce_small")
    torch.save({"config": _config_fingerprint(config)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="checkpoint format 1.*delete the checkpoint"):
        _load_checkpoint(tmp_path, config)
    torch.save({"config": _config_fingerprint(config), "format": CHECKPOINT_FORMAT}, tmp_path / CHECKPOINT_FILE)
    assert _load_checkpoint(tmp_path, config)["format"] == CHECKPOINT_FORMAT


def chance_recall_at(k: int, candidates: int) -> float:
    """R@K in percent of a model that ranks the candidates at random, one right answer per query."""
    return 100.0 * min(k, candidates) / candidates


def mean_r1(figures) -> float:
    """Mean R@1 of the two directions of one evaluated set's `global` output."""
    return sum(figures["global"][d]["R@1"] for d in ("image_to_text", "text_to_image")) / 2


def test_a_tiny_model_beats_chance_on_held_out_styles_and_shuffled_captions_do_not(tmp_path):
    """The check that a broken loss or shuffled labels fail: a model trained on the shapes corpus
    retrieves the validation and test styles' 40 concepts at R@1 at least 5x chance; the same
    training on the captions shuffled among the trained images stays below that bar."""
    import tinymodel

    chance = chance_recall_at(1, len(tinymodel.SHAPE_COLOURS) * len(tinymodel.SHAPES))
    settings = dict(recipe="infonce_small", progress=False, image_size=32, dim=16, head_hidden=32,
                    batch_size=16, epochs=10, minutes=60.0, seed=0, validation_style=tinymodel.SHAPES_VALIDATION_STYLE)
    learnt = train(tinymodel.write_shapes_manifest(tmp_path / "corpus"), tmp_path / "run", **settings)
    shuffled = train(tinymodel.write_shapes_manifest(tmp_path / "shuffled", shuffle_trained_captions=True),
                     tmp_path / "shuffled-run", **settings)
    assert learnt["train_styles"] == ["alpha", "beta"]
    for held_out in ("validation", "test"):
        assert mean_r1(learnt[held_out]) >= 5 * chance, (held_out, learnt[held_out]["global"])
        assert mean_r1(shuffled[held_out]) < 5 * chance, (held_out, shuffled[held_out]["global"])


def test_unseen_concepts_are_never_trained_and_are_evaluated_apart(tmp_path):
    import tinymodel
    from xmodal.training.splits import is_unseen_concept

    concepts = {f"{c}_{s}" for c in tinymodel.SHAPE_COLOURS for s in tinymodel.SHAPES}
    unseen = {c for c in concepts if is_unseen_concept(c, 0.2)}
    assert 0 < len(unseen) < len(concepts)
    report = train(tinymodel.write_shapes_manifest(tmp_path / "corpus"), tmp_path / "run", recipe="infonce_small",
                   progress=False, image_size=32, dim=16, head_hidden=32, batch_size=16, epochs=1, minutes=60.0,
                   validation_style=tinymodel.SHAPES_VALIDATION_STYLE, unseen_concepts=0.2)
    assert report["train_concepts"] == len(concepts) - len(unseen)
    evaluated = report["evaluated"]
    assert list(evaluated) == ["validation", "validation_unseen", "test", "test_unseen"]
    for name, style in (("validation", "delta"), ("test", "gamma")):
        assert evaluated[name] == {"styles": [style], "images": len(concepts) - len(unseen),
                                   "concepts": len(concepts) - len(unseen)}
        assert evaluated[f"{name}_unseen"] == {"styles": [style], "images": len(unseen), "concepts": len(unseen)}
        assert report[f"{name}_unseen"]["global"]["rsum"] > 0
