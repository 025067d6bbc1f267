"""Triton Python model ``preprocess_image``: encoded image bytes -> normalised pixels.

Input ``IMAGE`` (TYPE_STRING, dims [1]: one encoded image per row) -> output
``pixel_values`` (TYPE_FP32, dims [3, S, S]). Size, mean, std and background come from
``params.json`` in the version directory (so two versions served side by side each keep
their own), else from the config parameter ``xmodal_image`` (a JSON string written from
the model card). The pixels
are computed by ``preprocessing.py`` next to this file: a copy of ``xmodal/preprocessing.py``
that the repository writer puts there, so the server runs exactly the trainer's code.

The input and output names are read from the model's own config (which export writes from
``xmodal/contract.py``), as Triton's python_backend examples do. A request whose bytes are
not an image gets its own error naming the reason; the other requests in the same call are
answered normally. Imports only numpy, Pillow (through
preprocessing.py) and the Triton utilities: it runs in NVIDIA's container without xmodal.
"""
import importlib.util
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

PARAMETER = "xmodal_image"
PARAMS_FILE = "params.json"


def _load_sibling(directory, name):
    """Import ``<directory>/<name>.py`` under a private module name (no sys.path games)."""
    path = os.path.join(directory, name + ".py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"preprocess_image: {path} is missing (the repository writer copies it)")
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
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.preprocessing = _load_sibling(version_dir, "preprocessing")
        params_path = os.path.join(version_dir, PARAMS_FILE)
        if os.path.isfile(params_path):
            with open(params_path, encoding="utf-8") as handle:
                params = json.load(handle)
        else:
            raw = config.get("parameters", {}).get(PARAMETER, {}).get("string_value")
            if not raw:
                raise ValueError(f"preprocess_image: neither {params_path} nor the config parameter "
                                 f"'{PARAMETER}' is there")
            params = json.loads(raw)
        self.size = int(params["size"])
        self.mean = [float(v) for v in params["mean"]]
        self.std = [float(v) for v in params["std"]]
        self.background = [int(v) for v in params.get("background", [255, 255, 255])]

    def _pixels(self, images):
        rows = []
        for index, item in enumerate(images.reshape(-1)):
            data = item if isinstance(item, bytes) else bytes(item)
            try:
                rows.append(self.preprocessing.preprocess_image_bytes(
                    data, self.size, self.mean, self.std, self.background))
            except self.preprocessing.ImageDecodeError as exc:
                raise ValueError(f"{self.input_name}[{index}] is not an image: {exc}") from exc
        return np.stack(rows).astype(np.float32, copy=False)

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses.append(_invalid(f"preprocess_image: missing input '{self.input_name}'"))
                continue
            images = tensor.as_numpy()
            if images.ndim != 2 or images.shape[1] != 1:
                responses.append(_invalid(
                    f"preprocess_image: {self.input_name} must have shape [batch, 1], got {list(images.shape)}"))
                continue
            try:
                pixels = self._pixels(images)
            except ValueError as exc:
                responses.append(_invalid(f"preprocess_image: {exc}"))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, pixels)]))
        return responses
