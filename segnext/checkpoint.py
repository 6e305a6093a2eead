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
from typing import Mapping, NamedTuple, Union

import torch
from torch import nn

__all__ = ["CheckpointError", "LoadReport", "load_checkpoint", "read_state_dict"]


class LoadReport(NamedTuple):
    """What :func:`load_checkpoint` found. ``mismatched`` holds
    ``(key, checkpoint_shape, model_shape)`` tuples; keys are in the model's spelling."""
    missing_keys: list
    unexpected_keys: list
    mismatched: list


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (missing, corrupt, or holding objects that only a full pickle load
    could build). The message names the file and the reason."""


class _Unresolved:
    """Stand-in for objects whose class cannot be imported (e.g. mmengine ``HistoryBuffer`` in
    a ``message_hub`` entry when mmengine is not installed) in a ``trust_pickle=True`` load; keeps nothing
    useful."""

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


def _numpy_safe_globals() -> list:
    """numpy's array-rebuilding functions and types (plain data, no code), which mmcv/mmengine ``meta`` entries
    often hold; allowed in the ``weights_only=True`` load."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    found = [np.ndarray, np.dtype, getattr(core.multiarray, "_reconstruct", None),
             getattr(core.multiarray, "scalar", None)]
    found += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return [g for g in found if g is not None]


def _torch_load(path, map_location, trust_pickle: bool):
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise CheckpointError(f"checkpoint {name!r}: no such file")
    if trust_pickle:
        try:
            return torch.load(name, map_location=map_location, weights_only=False, pickle_module=_lenient_pickle)
        except Exception as err:  # noqa: BLE001 - one clear error naming the file, not a raw traceback
            raise CheckpointError(f"checkpoint {name!r} cannot be read: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(name, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if needed is None:  # e.g. "Unsupported operand": not a pickle of torch objects at all
            detail = re.search(r"Unsupported [^\n]*", str(err))
            raise CheckpointError(f"checkpoint {name!r} cannot be read (not a torch checkpoint, or corrupt): "
                                  f"{detail.group(0) if detail else str(err)[:200]}") from None
        raise CheckpointError(
            f"checkpoint {name!r} holds objects that only a full pickle load can build (the first: "
            f"{needed.group(1)}). "
            "A full pickle load runs code from the file: if you trust the file, pass trust_pickle=True "
            "(demo: --trust-pickle), or re-save its weights alone with torch.save(state_dict, path)") from None
    except Exception as err:  # noqa: BLE001 - corrupt / truncated / not a torch file
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"checkpoint {name!r} cannot be read (not a torch checkpoint, or corrupt): "
                              f"{type(err).__name__}: {first[:300]}") from None


def read_state_dict(path_or_state_dict, map_location="cpu", *, trust_pickle: bool = False) -> dict:
    """Return the plain ``{key: tensor}`` weights of a checkpoint file or loaded object.

    Accepts a path (``str``/``os.PathLike``), an mmcv/mmengine dict (weights under
    ``"state_dict"``), a ``{"model": ...}`` dict, or a bare state dict. A leading ``"module."``
    (DataParallel/DDP) is stripped from every key that has it.

    Files are read with ``torch.load(weights_only=True)`` (numpy arrays, as in mmcv/mmengine ``meta``, are
    allowed): no code from the file runs. mmengine files whose ``message_hub`` / optimizer entries hold other
    objects (mmengine classes, ...) cannot be read that way; they need ``trust_pickle=True``, a full pickle load
    that RUNS CODE FROM THE FILE (only for files you trust), where classes that cannot be imported are replaced
    by inert stand-ins.

    Raises:
        CheckpointError (a ValueError): the file is missing, corrupt, not a torch file, or needs a full pickle
            load and ``trust_pickle`` is False; the message names the file and the reason.
        TypeError: the object holds no mapping of tensors.
    """
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        obj = _torch_load(obj, map_location, trust_pickle)
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
                    strict: bool = True, map_location="cpu", *, trust_pickle: bool = False) -> LoadReport:
    """Load SegNeXt weights (official or mmseg spelling) into ``model``.

    Args:
        model: e.g. :func:`segnext.segnext_t` (keys ``backbone.*``, ``decode_head.*``) or an
            :class:`segnext.MSCAN` backbone (un-prefixed keys).
        path_or_state_dict: file path or loaded object, see :func:`read_state_dict`.
        strict: if True, raise when anything is missing, unexpected or of another shape --
            before any tensor is copied, so the model is left untouched.
        map_location: passed to ``torch.load``.
        trust_pickle: allow a full pickle load (runs code from the file; trusted files only), see
            :func:`read_state_dict`. Default False: ``torch.load(weights_only=True)`` only.

    Returns:
        :class:`LoadReport` (missing_keys, unexpected_keys, mismatched). With ``strict=False``
        every key present in both with equal shape is loaded, the rest only reported.

    Raises:
        RuntimeError: ``strict`` and a problem was found; the message gives the counts and the first few
            offending keys of each kind (with checkpoint and model shapes for mismatches).
        CheckpointError, TypeError: see :func:`read_state_dict`.
    """
    state = read_state_dict(path_or_state_dict, map_location, trust_pickle=trust_pickle)
    model_state = model.state_dict()
    remapped = {_to_model_key(k, model_state): v for k, v in state.items()}
    unexpected = [k for k in remapped if k not in model_state]
    missing = [k for k in model_state if k not in remapped]
    mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in remapped.items()
                  if k in model_state and v.shape != model_state[k].shape]
    report = LoadReport(missing, unexpected, mismatched)
    if strict and (missing or unexpected or mismatched):
        raise RuntimeError(_mismatch_summary(missing, unexpected, mismatched, len(state), len(model_state)))
    bad = {k for k, _, _ in mismatched}
    loadable = {k: v for k, v in remapped.items() if k in model_state and k not in bad}
    model.load_state_dict(loadable, strict=False)
    return report


_SHOWN = 5  # names shown per kind in a mismatch summary


def _mismatch_summary(missing, unexpected, mismatched, n_ckpt: int, n_model: int) -> str:
    """One short message: counts, then at most ``_SHOWN`` keys of each kind (not hundreds of lines)."""
    head = (f"checkpoint does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} of another shape (checkpoint {n_ckpt} keys, model {n_model})")
    if len(missing) == n_model and n_ckpt:
        head += "; no key matches: is this a checkpoint of this model (or of its backbone alone: use MSCAN)?"
    lines = []
    for label, items in (("missing key", missing), ("unexpected key", unexpected)):
        lines += [f"{label}: {k}" for k in items[:_SHOWN]]
        if len(items) > _SHOWN:
            lines.append(f"... and {len(items) - _SHOWN} more {label}s")
    lines += [f"shape mismatch: {k}: checkpoint {c} vs model {m}" for k, c, m in mismatched[:_SHOWN]]
    if len(mismatched) > _SHOWN:
        lines.append(f"... and {len(mismatched) - _SHOWN} more shape mismatches")
    return head + "\n  " + "\n  ".join(lines)
