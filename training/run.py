"""The training-run format: what a finished run directory holds, written by the trainer and read by export.

A run directory holds everything export needs: `model.safetensors` (weights only, a safe
format), `config.json` (the recipe with overrides), `tokenizer.json` and `eval.json` (the
training report with its held-out evaluation); while training it also holds `checkpoint.pt`
(weights, optimiser and schedule after the last finished epoch; a killed run resumes from it).

This module is the library side of a run, apart from the training loop (`train.py`), so export,
the CLI and the benchmarks read runs without importing the loop.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from xmodal.training.models import DualEncoder
from xmodal.training.tokenizer import load_tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EVAL_FILE = "eval.json"
CHECKPOINT_FILE = "checkpoint.pt"


def save_run(run_dir: Path, model: DualEncoder, tokenizer: Tokenizer, report: dict[str, Any]) -> None:
    """Write a finished run (weights, config, tokenizer, report) and drop its checkpoint."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / WEIGHTS_FILE))
    (run_dir / CONFIG_FILE).write_text(json.dumps(model.config, indent=2) + "\n")
    tokenizer.save(str(run_dir / TOKENIZER_FILE))
    (run_dir / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def load_run(run_dir: str | Path) -> tuple[DualEncoder, Tokenizer, dict[str, Any]]:
    """The trained model (in eval mode), its tokenizer and its config."""
    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a training run: no {WEIGHTS_FILE}")
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    model = DualEncoder({**config, "pretrained": False})
    model.load_state_dict(load_file(str(run_dir / WEIGHTS_FILE)))
    model.eval()
    return model, load_tokenizer(run_dir / TOKENIZER_FILE), config
