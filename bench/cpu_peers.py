"""CPU inference peers of the MSCA benchmark: ONNX Runtime and OpenVINO running the reference MSCA module, set up
exactly as ``shared/spec/cpu.md`` describes (how the anchor figures were measured):

* export: ``torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17)`` of ``segnext.AttentionModule(C)``
  holding the benchmark's weights (fp32; static input shape);
* ONNX Runtime: ``InferenceSession(path, SessionOptions(intra_op_num_threads=T), providers=["CPUExecutionProvider"])``,
  ``session.run`` on a numpy input; fp32 only (bf16 rows are n/a: the CPU execution provider has no bf16 convs);
* OpenVINO: ``Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": T})`` (bf16 rows add
  ``"INFERENCE_PRECISION_HINT": "bf16"``; the model's inputs and outputs stay fp32, its convolutions run in bf16),
  one infer request reused.

Forward only: the peers have no backward.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Callable

import torch

PEERS = ("ort", "openvino")
LABELS = {"ort": "ONNX Runtime", "openvino": "OpenVINO"}
_MODULES = {"ort": "onnxruntime", "openvino": "openvino"}


def peer_status(name: str, dtype_name: str = "fp32", mode: str = "fwd") -> tuple[bool, str]:
    """(runs, reason): importable, forward only, ORT fp32 only."""
    if importlib.util.find_spec(_MODULES[name]) is None:
        return False, f"skipped: {_MODULES[name]} is not importable (pip install {_MODULES[name]})"
    if importlib.util.find_spec("onnx") is None:
        return False, "skipped: the onnx package (needed by torch.onnx.export) is not importable"
    if mode != "fwd":
        return False, "n/a (forward only: no backward)"
    if name == "ort" and dtype_name != "fp32":
        return False, "n/a (ONNX Runtime is measured in fp32 only)"
    return True, ""


def msca_module(weights) -> torch.nn.Module:
    """``segnext.AttentionModule(C)`` (fp32, eval) holding the weights ``[w0, b0, [6 strip w], [6 strip b], w3, b3]``
    of ``bench.msca.make_inputs``."""
    import segnext

    w0, b0, sw, sb, w3, b3 = weights
    m = segnext.AttentionModule(w0.shape[0]).eval()
    names = ["conv0_1", "conv0_2", "conv1_1", "conv1_2", "conv2_1", "conv2_2"]
    with torch.no_grad():
        m.conv0.weight.copy_(w0.float())
        m.conv0.bias.copy_(b0.float())
        for n, w, b in zip(names, sw, sb):
            getattr(m, n).weight.copy_(w.float())
            getattr(m, n).bias.copy_(b.float())
        m.conv3.weight.copy_(w3.float())
        m.conv3.bias.copy_(b3.float())
    return m


class Exporter:
    """ONNX files of the MSCA module, one per (shape, weights id), in a temporary directory removed by ``close``."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="bench-msca-onnx-")
        self._paths: dict[tuple, Path] = {}

    def path(self, shape, weights) -> Path:
        key = (tuple(shape), id(weights))
        if key not in self._paths:
            m = msca_module(weights)
            x = torch.zeros(shape, dtype=torch.float32)
            p = Path(self._dir.name) / f"msca_{'x'.join(map(str, shape))}_{len(self._paths)}.onnx"
            torch.onnx.export(m, (x,), str(p), dynamo=False, opset_version=17)
            self._paths[key] = p
        return self._paths[key]

    def close(self) -> None:
        self._dir.cleanup()


def build_peer(name: str, onnx_path: Path, threads: int, dtype_name: str) -> tuple[Callable, dict]:
    """``(run, info)``: ``run(x_numpy) -> numpy`` of one forward; ``info`` records the settings used."""
    if name == "ort":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        iname = sess.get_inputs()[0].name

        def run(x):
            return sess.run(None, {iname: x})[0]
        return run, {"peer_settings": f"onnxruntime {ort.__version__} CPUExecutionProvider, intra_op_num_threads="
                                      f"{threads}, opset 17, fp32"}
    if name == "openvino":
        import openvino as ov

        cfg = {"INFERENCE_NUM_THREADS": threads}
        if dtype_name == "bf16":
            cfg["INFERENCE_PRECISION_HINT"] = "bf16"
        elif dtype_name == "fp32":
            cfg["INFERENCE_PRECISION_HINT"] = "f32"  # OpenVINO's CPU default may be bf16 on AMX parts: pin it
        compiled = ov.Core().compile_model(str(onnx_path), "CPU", cfg)
        req = compiled.create_infer_request()

        def run(x):
            req.infer({0: x})
            return req.get_output_tensor(0).data
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        return run, {"peer_settings": f"openvino {ov.__version__} CPU, " +
                                      ", ".join(f"{k}={v}" for k, v in cfg.items()) + f" (compiled: {got})"}
    raise ValueError(name)
