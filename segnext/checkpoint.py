"""Loading official SegNeXt / mmsegmentation checkpoints into the reference model.

Checkpoint layouts (docs/reference_model.md, "Checkpoints"): mmcv/mmengine ``save_checkpoint`` files
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
from typing import Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from .config import config_from_meta, head_settings
from .ham_head import NMF2D, LightHamHead

__all__ = ["CheckpointError", "LoadReport", "load_checkpoint", "read_state_dict"]


class _LoadReportFields(NamedTuple):
    missing_keys: list
    unexpected_keys: list
    mismatched: list


class LoadReport(_LoadReportFields):
    """What :func:`load_checkpoint` found: the tuple ``(missing_keys, unexpected_keys, mismatched)``;
    ``mismatched`` holds ``(key, checkpoint_shape, model_shape)`` tuples; keys are in the model's spelling.

    Two more attributes (not part of the tuple, so ``report == ([], [], [])`` and three-way unpacking work):

    * ``config_source``: where the head's NMF2D / resize settings came from -- e.g. ``"meta['cfg'] (config
      text)"`` when the checkpoint's config was applied, ``"model"`` when the model's own settings were kept
      (no config in the checkpoint, ``use_config=False``, or a config that could not be read or is not a SegNeXt
      one: then ``config_problem`` says why);
    * ``config_applied``: ``{setting: value}`` set on the model from the checkpoint's config (e.g.
      ``{"decode_head.hamburger.ham.R": 16, ...}``), empty when nothing was taken from it.
    """

    def __new__(cls, missing_keys, unexpected_keys, mismatched, config_source: str = "model",
                config_applied: Optional[dict] = None, config_problem: Optional[str] = None):
        self = super().__new__(cls, missing_keys, unexpected_keys, mismatched)
        self.config_source, self.config_applied = config_source, dict(config_applied or {})
        self.config_problem = config_problem
        return self

    def __repr__(self) -> str:
        return (f"LoadReport(missing_keys={self.missing_keys!r}, unexpected_keys={self.unexpected_keys!r}, "
                f"mismatched={self.mismatched!r}, config_source={self.config_source!r}, "
                f"config_applied={self.config_applied!r})")


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
    return _read(path_or_state_dict, map_location, trust_pickle)[0]


def _read(obj, map_location, trust_pickle: bool):
    """(state dict, meta or None) of a path or loaded object; see :func:`read_state_dict`."""
    if isinstance(obj, (str, os.PathLike)):
        obj = _torch_load(obj, map_location, trust_pickle)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise TypeError("checkpoint does not contain a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}, meta


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
                    strict: bool = True, map_location="cpu", *, trust_pickle: bool = False,
                    use_config: bool = True) -> LoadReport:
    """Load SegNeXt weights (official or mmseg spelling) into ``model``, with the head settings of the
    checkpoint's own config where it carries one.

    Args:
        model: e.g. :func:`segnext.segnext_t` (keys ``backbone.*``, ``decode_head.*``) or an
            :class:`segnext.MSCAN` backbone (un-prefixed keys).
        path_or_state_dict: file path or loaded object, see :func:`read_state_dict`.
        strict: if True, raise when anything is missing, unexpected or of another shape --
            before any tensor is copied or any setting changed, so the model is left untouched.
        map_location: passed to ``torch.load``.
        trust_pickle: allow a full pickle load (runs code from the file; trusted files only), see
            :func:`read_state_dict`. Default False: ``torch.load(weights_only=True)`` only.
        use_config: apply the config in the checkpoint's ``meta`` (default True), see below.

    The checkpoint's config: some settings have no tensor in the state_dict, yet change the logits -- the NMF2D
    rank and steps (mmseg's SegNeXt-B/L configs use MD_R=16, the official ones 64) and ``align_corners``.
    mmengine checkpoints (mmseg 1.x) carry their training config as text in ``meta['cfg']``, mmseg 0.x ones
    (official SegNeXt) in ``meta['config']``; it is read without running code (:func:`segnext.config.
    config_from_meta`; a plain dict there is used too). When its ``model.decode_head`` is a LightHamHead, its
    ``ham_kwargs`` (official meaning: ``inv_t`` has no effect; keys left out take the official defaults MD_S=1,
    MD_R=64, 6 / 7 steps, rand_init=True) are set on every :class:`segnext.NMF2D` of ``model`` (fused ones too)
    and its ``align_corners`` on every :class:`segnext.LightHamHead`; a ``UserWarning`` names each value that
    differs from the model's. Without a config (a bare state dict, official release files without meta, or
    ``use_config=False``) the model keeps its settings: the factories' official ones (``segnext_b()``: MD_R=64;
    ``segnext_b(config="mmseg")`` for mmseg's). A config that cannot be read (an object only a trusted full
    pickle load gives, unparsable text) leaves the model's settings, with a warning. ``LoadReport.config_source``
    / ``config_applied`` say which was used.

    An NMF2D with ``rand_init=False`` accepts its ``bases`` buffer from the checkpoint (key ``...ham.bases``)
    before its first forward.

    Returns:
        :class:`LoadReport` (missing_keys, unexpected_keys, mismatched; config_source, config_applied). With
        ``strict=False`` every key present in both with equal shape is loaded, the rest only reported.

    Raises:
        RuntimeError: ``strict`` and a problem was found; the message gives the counts and the first few
            offending keys of each kind (with checkpoint and model shapes for mismatches).
        CheckpointError, TypeError: see :func:`read_state_dict`.
    """
    state, meta = _read(path_or_state_dict, map_location, trust_pickle)
    source, settings, problem = "model", {}, None
    if use_config:
        found, config, problem = config_from_meta(meta)
        if config is not None:
            settings, problem = head_settings(config)
        if settings:
            source = found
        elif found is not None:
            problem = f"{found}: {problem}"
            warnings.warn(f"load_checkpoint: the checkpoint's config in {problem}; the model's head settings are "
                          f"kept", UserWarning, stacklevel=2)
    nmfs = [(n, m) for n, m in model.named_modules() if isinstance(m, NMF2D)]
    rand_init_after = {n: settings.get("nmf", {}).get("rand_init", m.rand_init) for n, m in nmfs}
    model_state = model.state_dict()
    # the lazily registered buffer of rand_init=False (official / mmseg): loadable before the first forward
    lazy = {f"{n}.bases" if n else "bases" for n, m in nmfs if not rand_init_after[n] and m.bases is None}
    remapped = {_to_model_key(k, model_state): v for k, v in state.items()}
    unexpected = [k for k in remapped if k not in model_state and k not in lazy]
    missing = [k for k in model_state if k not in remapped]
    mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in remapped.items()
                  if k in model_state and v.shape != model_state[k].shape]
    if strict and (missing or unexpected or mismatched):
        raise RuntimeError(_mismatch_summary(missing, unexpected, mismatched, len(state), len(model_state)))
    applied = _apply_settings(model, nmfs, settings, source)
    if not applied:
        source = "model"
    bad = {k for k, _, _ in mismatched}
    loadable = {k: v for k, v in remapped.items() if (k in model_state or k in lazy) and k not in bad}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(missing, unexpected, mismatched, source, applied, problem)


_NMF_ATTRS = (("MD_S", "S"), ("MD_R", "R"), ("train_steps", "train_steps"), ("eval_steps", "eval_steps"),
              ("rand_init", "rand_init"), ("spatial", "spatial"))


def _apply_settings(model: nn.Module, nmfs, settings: dict, source: str) -> dict:
    applied, changed = {}, []
    for name, m in nmfs:
        for key, attr in _NMF_ATTRS:
            if key not in settings.get("nmf", {}):
                continue
            value = settings["nmf"][key]
            full = f"{name}.{attr}" if name else attr
            if getattr(m, attr) != value:
                changed.append(f"{full}={value!r} (model: {getattr(m, attr)!r})")
            setattr(m, attr, value)
            applied[full] = value
    if "align_corners" in settings:
        for name, m in model.named_modules():
            if isinstance(m, LightHamHead):
                full = f"{name}.align_corners" if name else "align_corners"
                if m.align_corners != settings["align_corners"]:
                    changed.append(f"{full}={settings['align_corners']!r} (model: {m.align_corners!r})")
                m.align_corners = settings["align_corners"]
                applied[full] = settings["align_corners"]
    if changed:
        warnings.warn(f"load_checkpoint: applied the checkpoint's config ({source}): {', '.join(changed)}; "
                      f"pass use_config=False to keep the model's settings", UserWarning, stacklevel=3)
    return applied


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
