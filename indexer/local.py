"""`xmodal index --local`: the embedding stage without a server.

Each Ray actor runs what the Triton ensembles run, from the same model repository: the
version its ensembles pin, that version's preprocessing (``xmodal/preprocessing.py`` with
``preprocess_image/<v>/params.json``; ``xmodal/text_preprocessing.py`` with
``preprocess_text/<v>/tokenizer.json`` and its ``params.json``: the code ``preprocess_text``
runs, so the same ids and the same refusals) and its encoder ONNX files, in-process with
ONNX Runtime (the CUDA provider first where onnxruntime-gpu has it). The card is the
repository's ``card.json``, the one the ensembles carry. A text refused there is refused
here in the same words: ``local: text is empty`` for the server's ``TEXT[0] is empty``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xmodal.card import ModelCard
from xmodal.contract import IMAGE_ENCODER, INPUT_IDS, PIXEL_VALUES, PREPROCESS_IMAGE, PREPROCESS_TEXT, TEXT_ENCODER
from xmodal.export.repository import PARAMS_FILE, pinned_version
from xmodal.indexer.embed import EmbedStage


def repository_version(repository: str | Path) -> int:
    """The version the repository's ensembles serve; ValueError when it is no xmodal repository."""
    version = pinned_version(Path(repository))
    if version is None:
        raise ValueError(f"{repository} is not an xmodal model repository (no embed_text/config.pbtxt pinning a "
                         f"version): write one with `xmodal export`, or pass its path as --model-repository")
    return version


def repository_card(repository: str | Path) -> ModelCard:
    """The card the repository serves (its root ``card.json``)."""
    repository_version(repository)
    return ModelCard.load(Path(repository))


class LocalEmbedder(EmbedStage):
    """The embedding stage in-process: `kind` "image" or "text" of the model repository.

    `threads`: ONNX Runtime's intra-op threads (None: its default, one per core), e.g. 1 when
    each of several actors should keep to one core.
    """

    error_prefix = "local: "

    def __init__(self, repository: str | Path, kind: str, dims: dict[str, int] | int, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(dims)
        if kind not in ("image", "text"):
            raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
        root = Path(repository)
        version = str(repository_version(root))
        self.kind = kind
        if kind == "image":
            self.params = json.loads((root / PREPROCESS_IMAGE / version / PARAMS_FILE).read_text())
            encoder, self.input_name = IMAGE_ENCODER, PIXEL_VALUES
        else:
            from xmodal.text_preprocessing import TextPreprocessor

            directory = root / PREPROCESS_TEXT / version
            params = json.loads((directory / PARAMS_FILE).read_text())
            self.text_preprocessor = TextPreprocessor.from_file(directory / "tokenizer.json",
                                                                int(params.get("pad_id", 0)))
            encoder, self.input_name = TEXT_ENCODER, INPUT_IDS
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(root / encoder / version / "model.onnx"), sess_options=options,
                                            providers=providers)

    def embed_outputs(self, items: list[bytes]) -> tuple[dict[str, np.ndarray], list[str | None]]:
        inputs, errors = self._images(items) if self.kind == "image" else self._texts(items)
        good = [i for i, error in enumerate(errors) if error is None]
        levels = list(self.dims)
        vectors = {level: np.zeros((len(items), dim), dtype=np.float32) for level, dim in self.dims.items()}
        if good:
            outputs = self.session.run(levels, {self.input_name: inputs})
            for level, output in zip(levels, outputs):
                vectors[level][good] = output
        return vectors, errors

    def _images(self, items: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
        from xmodal.preprocessing import ImageDecodeError, preprocess_image_bytes

        rows, errors = [], []
        for data in items:
            try:
                rows.append(preprocess_image_bytes(data, int(self.params["size"]), self.params["mean"],
                                                   self.params["std"], self.params.get("background", [255, 255, 255])))
                errors.append(None)
            except ImageDecodeError as exc:
                errors.append(f"not an image: {exc}")
        return (np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0,), np.float32)), errors

    def _texts(self, items: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
        ids, reasons = self.text_preprocessor.input_ids(items)
        return ids, [None if reason is None else f"text {reason}" for reason in reasons]
