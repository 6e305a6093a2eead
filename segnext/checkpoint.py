"""Loading official SegNeXt / mmsegmentation checkpoints into the reference model.

Checkpoint layouts (spec section 3): mmcv/mmengine ``save_checkpoint`` files
``{"state_dict": ..., "meta": ..., ["optimizer", "message_hub", ...]}``, ``{"model": ...}``
files, and bare state dicts. Key spellings: official ``*.mlp.dwconv.dwconv.*`` and mmseg
(PR #2653 and 1.x) ``*.mlp.dwconv.*`` are both accepted and mapped to the model's spelling.
"""
from __future__ import annotations

import os
import pickle
import re
import types
import warnings
from typing import Mapping, NamedTuple, Union

import torch
from torch import nn

__all__ = ["LoadReport", "load_checkpoint", "read_state_dict"]


class LoadReport(NamedTuple):
    """What :func:`load_checkpoint` found. ``mismatched`` holds
    ``(key, checkpoint_shape, model_shape)`` tuples; keys are in the model's spelling."""
    missing_keys: list
    unexpected_keys: list
    mismatched: list


class _Unresolved:
    """Stand-in for objects whose class cannot be imported (e.g. mmengine ``HistoryBuffer`` in
    a ``message_hub`` entry when mmengine is not installed); keeps nothing useful."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Unresolved,), {"__module__": module})


_lenient_pickle = types.SimpleNamespace(__name__="segnext_lenient_pickle",
                                        Unpickler=_LenientUnpickler, load=pickle.load)


def _torch_load(path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler" in ln),
                      str(err)[:200])
        warnings.warn(f"{os.fspath(path)!r} cannot be read with weights_only=True ({reason}); "
                      "retrying with weights_only=False (runs pickle code: trusted files only)",
                      stacklevel=3)
        return torch.load(path, map_location=map_location, weights_only=False,
                          pickle_module=_lenient_pickle)


def read_state_dict(path_or_state_dict, map_location="cpu") -> dict:
    """Return the plain ``{key: tensor}`` weights of a checkpoint file or loaded object.

    Accepts a path (``str``/``os.PathLike``), an mmcv/mmengine dict (weights under
    ``"state_dict"``), a ``{"model": ...}`` dict, or a bare state dict. A leading ``"module."``
    (DataParallel/DDP) is stripped from every key that has it.

    Files are read with ``torch.load(weights_only=True)``. mmcv/mmengine files whose ``meta`` /
    ``message_hub`` / optimizer entries hold objects outside torch's safe allowlist (numpy
    arrays, mmengine classes, ...) make that fail; they are then re-read with
    ``weights_only=False`` (a warning is issued: this executes pickle code, so only load trusted
    files), classes that cannot be imported being replaced by inert stand-ins.

    Raises:
        TypeError: the object holds no mapping of tensors.
    """
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        obj = _torch_load(obj, map_location)
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise TypeError("checkpoint does not contain a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


_MMSEG_DW = re.compile(r"\.mlp\.dwconv\.(weight|bias)$")
_OFFICIAL_DW = re.compile(r"\.mlp\.dwconv\.dwconv\.(weight|bias)$")


def _to_model_key(key: str, model_keys) -> str:
    if key in model_keys:
        return key
    for pattern, repl in ((_MMSEG_DW, r".mlp.dwconv.dwconv.\1"), (_OFFICIAL_DW, r".mlp.dwconv.\1")):
        alt = pattern.sub(repl, key)
        if alt != key and alt in model_keys:
            return alt
    return key


def load_checkpoint(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping],
                    strict: bool = True, map_location="cpu") -> LoadReport:
    """Load SegNeXt weights (official or mmseg spelling) into ``model``.

    Args:
        model: e.g. :func:`segnext.segnext_t` (keys ``backbone.*``, ``decode_head.*``) or an
            :class:`segnext.MSCAN` backbone (un-prefixed keys).
        path_or_state_dict: file path or loaded object, see :func:`read_state_dict`.
        strict: if True, raise when anything is missing, unexpected or of another shape --
            before any tensor is copied, so the model is left untouched.
        map_location: passed to ``torch.load``.

    Returns:
        :class:`LoadReport` (missing_keys, unexpected_keys, mismatched). With ``strict=False``
        every key present in both with equal shape is loaded, the rest only reported.

    Raises:
        RuntimeError: ``strict`` and a problem was found; the message names every offending key
            (with checkpoint and model shapes for mismatches).
        TypeError: see :func:`read_state_dict`.
    """
    state = read_state_dict(path_or_state_dict, map_location)
    model_state = model.state_dict()
    remapped = {_to_model_key(k, model_state): v for k, v in state.items()}
    unexpected = [k for k in remapped if k not in model_state]
    missing = [k for k in model_state if k not in remapped]
    mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in remapped.items()
                  if k in model_state and v.shape != model_state[k].shape]
    report = LoadReport(missing, unexpected, mismatched)
    if strict and (missing or unexpected or mismatched):
        lines = [f"missing key: {k}" for k in missing]
        lines += [f"unexpected key: {k}" for k in unexpected]
        lines += [f"shape mismatch: {k}: checkpoint {c} vs model {m}" for k, c, m in mismatched]
        raise RuntimeError("checkpoint does not match the model:\n  " + "\n  ".join(lines))
    bad = {k for k, _, _ in mismatched}
    loadable = {k: v for k, v in remapped.items() if k in model_state and k not in bad}
    model.load_state_dict(loadable, strict=False)
    return report
