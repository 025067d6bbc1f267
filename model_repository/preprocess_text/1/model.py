"""Triton Python model ``preprocess_text``: UTF-8 text -> token ids.

Input ``TEXT`` (TYPE_STRING, dims [1]: one UTF-8 string per row) -> output ``input_ids``
(TYPE_INT64, dims [-1]). The ids are computed by ``text_preprocessing.py`` next to this
file: a copy of ``xmodal/text_preprocessing.py`` that the repository writer puts there, so
the server runs exactly the code of ``xmodal index --local`` (its length buckets, its
checks and their words). The tokenizer is ``tokenizer.json`` next to this file (the training
run's own file, loaded with HF ``tokenizers``); it carries truncation to the card's max
length. The pad id comes from ``params.json`` in the version directory, else the config
parameter ``xmodal_text`` (JSON ``{"pad_id": 0}``; default 0).

A request holding a text that is refused (not UTF-8, empty or whitespace only, no tokens but
the tokenizer's special ones) is that request's error, naming its first bad row
(``TEXT[1] is empty``); the other requests in the same call are answered normally. Imports
only numpy, tokenizers (through text_preprocessing.py) and the Triton utilities: it runs in
NVIDIA's container without xmodal.
"""
import importlib.util
import json
import os

import triton_python_backend_utils as pb_utils

PARAMETER = "xmodal_text"
PARAMS_FILE = "params.json"


def _load_sibling(directory, name):
    """Import ``<directory>/<name>.py`` under a private module name (no sys.path games)."""
    path = os.path.join(directory, name + ".py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"preprocess_text: {path} is missing (the repository writer copies it)")
    spec = importlib.util.spec_from_file_location("xmodal_serving_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _invalid(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # the tensor names from the model's own config (export writes them from xmodal/contract.py)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        text_preprocessing = _load_sibling(version_dir, "text_preprocessing")
        path = os.path.join(version_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"preprocess_text: {path} is missing")
        params_path = os.path.join(version_dir, PARAMS_FILE)
        if os.path.isfile(params_path):
            with open(params_path, encoding="utf-8") as handle:
                params = json.load(handle)
        else:
            raw = config.get("parameters", {}).get(PARAMETER, {}).get("string_value")
            params = json.loads(raw) if raw else {}
        self.preprocessor = text_preprocessing.TextPreprocessor.from_file(path, int(params.get("pad_id", 0)))

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses.append(_invalid(f"preprocess_text: missing input '{self.input_name}'"))
                continue
            column = tensor.as_numpy()
            if column.ndim != 2 or column.shape[1] != 1:
                responses.append(_invalid(
                    f"preprocess_text: {self.input_name} must have shape [batch, 1], got {list(column.shape)}"))
                continue
            ids, reasons = self.preprocessor.input_ids(list(column.reshape(-1)))
            bad = next((index for index, reason in enumerate(reasons) if reason is not None), None)
            if bad is not None:
                responses.append(_invalid(f"preprocess_text: {self.input_name}[{bad}] {reasons[bad]}"))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, ids)]))
        return responses
