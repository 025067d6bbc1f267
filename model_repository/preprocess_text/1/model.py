"""Triton Python model ``preprocess_text``: UTF-8 text -> token ids.

Input ``TEXT`` (TYPE_STRING, dims [1]: one UTF-8 string per row) -> output ``input_ids``
(TYPE_INT64, dims [-1]). The tokenizer is ``tokenizer.json`` next to this file (the
training run's own file, loaded with HF ``tokenizers``); it carries truncation to the card's
max length. A request is padded with the pad id (``params.json`` in the version directory,
else the config parameter ``xmodal_text``, JSON ``{"pad_id": 0}``; default 0), which the
text encoder masks. A request of one text is padded up to the first length bucket that holds
it: 8, 16, 32, … and the max length itself. Triton's dynamic batcher joins only requests of one
shape; padded to their exact lengths, concurrent single queries almost never shared an encoder
call (1.1 texts a call at 16 clients, benchmarks/serving.py). A request of several texts is
already a batch and is padded to its longest text only: with MiniLM, whose cost grows with
every token, bucket padding made a batch of 32 labels 1.7x slower to encode (62 vs 37 ms).

Empty or whitespace-only text, text with no tokens but the tokenizer's special ones
(e.g. only zero-width characters, which BERT's normaliser removes), and bytes that are not
UTF-8 are that request's error; the other requests in the same call are answered
normally. Imports only numpy, tokenizers and the Triton utilities: it runs in NVIDIA's
container without xmodal.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

PARAMETER = "xmodal_text"
PARAMS_FILE = "params.json"


def _invalid(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        path = os.path.join(version_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"preprocess_text: {path} is missing")
        self.tokenizer = Tokenizer.from_file(path)
        params_path = os.path.join(version_dir, PARAMS_FILE)
        if os.path.isfile(params_path):
            with open(params_path, encoding="utf-8") as handle:
                params = json.load(handle)
        else:
            raw = config.get("parameters", {}).get(PARAMETER, {}).get("string_value")
            params = json.loads(raw) if raw else {}
        self.pad_id = int(params.get("pad_id", 0))
        truncation = self.tokenizer.truncation or {}
        self.max_length = truncation.get("max_length")

    def _padded_length(self, longest, texts):
        if texts > 1:
            return longest  # a batch already: bucket padding would only add tokens to every row
        length = 8
        while length < longest:
            length *= 2
        return min(length, self.max_length) if self.max_length else length

    def _texts(self, column):
        texts = []
        for index, item in enumerate(column.reshape(-1)):
            data = item if isinstance(item, bytes) else bytes(item)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"TEXT[{index}] is not valid UTF-8: {exc}") from exc
            if not text.strip():
                raise ValueError(f"TEXT[{index}] is empty")
            texts.append(text)
        return texts

    def _ids(self, texts):
        encodings = self.tokenizer.encode_batch(texts)
        for index, encoding in enumerate(encodings):
            # A WordPiece (BERT) tokenizer wraps every text in [CLS] ... [SEP]: a text the
            # normaliser removes entirely (zero-width or control characters only) still has
            # those two ids, and no others.
            if not encoding.ids or all(encoding.special_tokens_mask):
                raise ValueError(f"TEXT[{index}] has no tokens (only characters the tokenizer removes)")
        width = self._padded_length(max(len(e.ids) for e in encodings), len(encodings))
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
        return ids

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "TEXT")
            if tensor is None:
                responses.append(_invalid("preprocess_text: missing input 'TEXT'"))
                continue
            column = tensor.as_numpy()
            if column.ndim != 2 or column.shape[1] != 1:
                responses.append(_invalid(
                    f"preprocess_text: TEXT must have shape [batch, 1], got {list(column.shape)}"))
                continue
            try:
                ids = self._ids(self._texts(column))
            except ValueError as exc:
                responses.append(_invalid(f"preprocess_text: {exc}"))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("input_ids", ids)]))
        return responses
