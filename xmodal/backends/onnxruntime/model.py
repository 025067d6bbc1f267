"""A Triton Python-based backend named ``onnxruntime`` that runs ONNX Runtime.

NVIDIA's Triton container has a native ``onnxruntime`` backend; the ``tritonserver`` that
the ``nvidia-pytriton`` wheel bundles has only the Python backend. Triton loads a model
whose config says ``backend: "onnxruntime"`` from ``<backend-directory>/onnxruntime/model.py``
(through ``<backend-directory>/python/libtriton_python.so``) when no native library is
there, so one ``config.pbtxt`` serves on both servers. ``xmodal.server`` copies this file
into the backend directory it assembles.

What it does, per model instance:

- loads ``<model_dir>/<version>/<default_model_filename or model.onnx>`` with
  ``onnxruntime.InferenceSession``: ``CUDAExecutionProvider`` first when ONNX Runtime has it
  and the instance is not ``KIND_CPU``, then the CPU provider. The config parameters
  ``intra_op_thread_count`` and ``inter_op_thread_count`` (the native backend's names) set
  the thread pools when present; ``allow_spinning`` ("0" or "1") whether idle intra-op
  threads spin (ONNX Runtime's default) or sleep.
- ``execute`` gathers every request's inputs by the config's input names, runs requests
  whose per-sample shapes and dtypes match as one concatenated ORT run (nothing is padded;
  mismatched requests run separately), splits the outputs back per request, and answers a
  request with bad input (missing tensor, wrong dtype or shape, or one that ORT rejects)
  with its own ``TritonError`` while the rest of the batch succeeds.
- ``auto_complete_config`` fills ``input``/``output`` from the ONNX graph when the config
  omits them.

Only numpy, onnxruntime and the Triton utilities are imported: this file must run in any
Python environment the stub runs in, with or without xmodal installed.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

DEFAULT_MODEL_FILENAME = "model.onnx"

# ONNX Runtime's type strings -> Triton's config data types.
_ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
}


class InputError(ValueError):
    """A request's inputs do not match the model's config."""


def _error(message: str, *, invalid_arg: bool = True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_arg else "INTERNAL", None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


def _parameter(config: dict, key: str) -> str | None:
    value = config.get("parameters", {}).get(key)
    if isinstance(value, dict):
        value = value.get("string_value")
    return value if value not in (None, "") else None


def _model_path_from_stub() -> str | None:
    """The stub's first argument is the model file it serves (``<model>/<version>/model.onnx``).

    ``auto_complete_config`` receives only the config, so this is the one way to find the
    graph there. Linux only; anything unexpected means "unknown".
    """
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
        path = os.fsdecode(argv[1])
    except (OSError, IndexError):
        return None
    return path if path.endswith(".onnx") and os.path.isfile(path) else None


def _triton_dims(shape, batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    return dims[1:] if batched else dims


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        config = auto_complete_model_config.as_dict()
        if config.get("input") and config.get("output"):
            return auto_complete_model_config
        path = _model_path_from_stub()
        if path is None:
            return auto_complete_model_config  # initialize() reports what is missing
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        batched = int(config.get("max_batch_size", 0)) > 0
        if not config.get("input"):
            for node in session.get_inputs():
                auto_complete_model_config.add_input(
                    {"name": node.name, "data_type": _ORT_TO_TRITON[node.type],
                     "dims": _triton_dims(node.shape, batched)})
        if not config.get("output"):
            for node in session.get_outputs():
                auto_complete_model_config.add_output(
                    {"name": node.name, "data_type": _ORT_TO_TRITON[node.type],
                     "dims": _triton_dims(node.shape, batched)})
        return auto_complete_model_config

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        filename = config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.model_name}: no ONNX model at {path}")

        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, attribute in (("intra_op_thread_count", "intra_op_num_threads"),
                               ("inter_op_thread_count", "inter_op_num_threads")):
            value = _parameter(config, key)
            if value is not None and int(value) > 0:
                setattr(options, attribute, int(value))
        spinning = _parameter(config, "allow_spinning")
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning in ("0", "false") else "1")

        providers: list = ["CPUExecutionProvider"]
        if (args.get("model_instance_kind") != "CPU"
                and "CUDAExecutionProvider" in ort.get_available_providers()):
            device_id = int(args.get("model_instance_device_id") or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)

        graph_inputs = {node.name for node in self.session.get_inputs()}
        graph_outputs = [node.name for node in self.session.get_outputs()]
        if not config.get("input") or not config.get("output"):
            raise ValueError(
                f"{self.model_name}: config.pbtxt must name the inputs and outputs "
                f"(the graph has inputs {sorted(graph_inputs)} and outputs {graph_outputs})")
        # name -> (numpy dtype, dims without the batch dimension)
        self.inputs = {
            item["name"]: (pb_utils.triton_string_to_numpy(item["data_type"]),
                           [int(d) for d in item["dims"]])
            for item in config["input"]
        }
        self.outputs = {
            item["name"]: pb_utils.triton_string_to_numpy(item["data_type"])
            for item in config["output"]
        }
        unknown_in = sorted(set(self.inputs) - graph_inputs)
        unknown_out = sorted(set(self.outputs) - set(graph_outputs))
        if unknown_in or unknown_out:
            raise ValueError(
                f"{self.model_name}: config names tensors the ONNX graph lacks: inputs {unknown_in}, "
                f"outputs {unknown_out} (graph inputs {sorted(graph_inputs)}, outputs {graph_outputs})")
        self.output_names = list(self.outputs)

    # -- execution -------------------------------------------------------------------------

    def _gather(self, request) -> dict[str, np.ndarray]:
        feeds = {}
        for name, (dtype, dims) in self.inputs.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise InputError(f"{self.model_name}: missing input '{name}'")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise InputError(
                    f"{self.model_name}: input '{name}' has dtype {array.dtype}, expected {np.dtype(dtype)}")
            expected = ([-1] if self.max_batch_size > 0 else []) + dims
            if array.ndim != len(expected) or any(
                    want not in (-1, got) for want, got in zip(expected, array.shape)):
                raise InputError(
                    f"{self.model_name}: input '{name}' has shape {list(array.shape)}, expected {expected}")
            if self.max_batch_size > 0 and array.shape[0] == 0:
                raise InputError(f"{self.model_name}: input '{name}' has an empty batch")
            feeds[name] = array
        if self.max_batch_size > 0 and len({a.shape[0] for a in feeds.values()}) > 1:
            raise InputError(f"{self.model_name}: inputs disagree on the batch size")
        return feeds

    def _respond(self, outputs: list[np.ndarray]):
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value.astype(self.outputs[name], copy=False)))
            for name, value in zip(self.output_names, outputs)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)

    def _run_group(self, members, responses) -> None:
        """members: [(request index, feeds)] whose per-sample shapes and dtypes all match."""
        if len(members) > 1:
            feeds = {name: np.concatenate([m[1][name] for m in members], axis=0)
                     for name in self.inputs}
            try:
                outputs = self._run(feeds)
            except Exception:  # noqa: BLE001 - one bad request must not fail the others
                outputs = None
            if outputs is not None:
                sizes = [next(iter(m[1].values())).shape[0] for m in members]
                bounds = np.cumsum(sizes)[:-1]
                pieces = [np.split(out, bounds, axis=0) for out in outputs]
                for k, (index, _) in enumerate(members):
                    responses[index] = self._respond([piece[k] for piece in pieces])
                return
        # One request, or the joint run failed: run each alone so the error names its request.
        for index, feeds in members:
            try:
                responses[index] = self._respond(self._run(feeds))
            except Exception as exc:  # noqa: BLE001 - becomes this request's error
                responses[index] = pb_utils.InferenceResponse(
                    error=_error(f"{self.model_name}: ONNX Runtime rejected the input: {exc}"))

    def execute(self, requests):
        responses = [None] * len(requests)
        groups: dict[tuple, list] = {}
        for index, request in enumerate(requests):
            try:
                feeds = self._gather(request)
            except InputError as exc:
                responses[index] = pb_utils.InferenceResponse(error=_error(str(exc)))
                continue
            if self.max_batch_size > 0:
                key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
            else:  # no batch dimension: nothing to concatenate along
                key = ("request", index)
            groups.setdefault(key, []).append((index, feeds))
        for members in groups.values():
            self._run_group(members, responses)
        return responses

    def finalize(self):
        self.session = None
