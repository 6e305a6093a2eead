"""The option spellings that official SegNeXt and mmsegmentation configs pass, with their meaning there.

SegNeXt users bring configs and checkpoints of the official code (Visual-Attention-Network/SegNeXt, built on
mmseg 0.x / mmcv 1.x) or of mmsegmentation 1.x (checked against mmsegmentation 1.2.2, mmcv 2.1, mmengine 0.10).
This module maps what those configs say onto the reference model:

* :func:`nmf_kwargs` -- a ``ham_kwargs`` dict (mmseg lowercase keys, official uppercase keys, or this package's
  extras) -> :class:`segnext.NMF2D` keyword arguments, with the official meaning of every key;
* :func:`build_norm_layer` -- an mmcv ``norm_cfg`` (``type``, ``requires_grad``, the layer's own keys) -> module;
* :func:`check_act_cfg` -- an mmcv ``act_cfg`` -> the activation the model has (or an error);
* :func:`config_from_meta` -- the config an mmengine / mmcv checkpoint's ``meta`` carries, read without running code.

Every key is either accepted with the official meaning or refused with an error that names it; none is ignored.
"""
from __future__ import annotations

import ast
from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["nmf_kwargs", "build_norm_layer", "check_act_cfg", "config_from_meta", "head_settings",
           "parse_config_text", "as_nested_tuple", "MMSEG_HAM_KWARGS",
           "OFFICIAL_NMF_DEFAULTS"]

#: ``ham_kwargs`` of every mmsegmentation 1.2.2 SegNeXt config (``configs/segnext/*.py``): T sets them and S/B/L
#: inherit them (S and T override MD_R with the same 16), so mmseg's B and L use MD_R=16, where the official B/L
#: configs set no ham_kwargs and get the NMF2D default MD_R=64.
MMSEG_HAM_KWARGS = dict(MD_S=1, MD_R=16, train_steps=6, eval_steps=7, inv_t=100, rand_init=True)

#: NMF2D defaults of the official ``_MatrixDecomposition2DBase`` and mmseg's ``Matrix_Decomposition_2D_Base``
#: (the keys a config leaves out take these).
OFFICIAL_NMF_DEFAULTS = dict(MD_S=1, MD_R=64, train_steps=6, eval_steps=7, rand_init=True, spatial=True)

# ham_kwargs key -> (NMF2D keyword, spelling). ``None`` keyword: accepted, no effect (as in the official code).
_HAM_KEYS = {
    # mmseg 1.x ``Matrix_Decomposition_2D_Base(**ham_kwargs)``
    "MD_S": "MD_S", "MD_R": "MD_R", "train_steps": "train_steps", "eval_steps": "eval_steps",
    "inv_t": None, "rand_init": "rand_init",
    # official ``_MatrixDecomposition2DBase(args)`` (``args.setdefault('TRAIN_STEPS', 6)``, ...)
    "SPATIAL": "spatial", "MD_D": None, "TRAIN_STEPS": "train_steps", "EVAL_STEPS": "eval_steps",
    "INV_T": None, "ETA": None, "RAND_INIT": "rand_init",
    # this package's own options (not in the official code)
    "eps": "eps", "grad_mode": "grad_mode", "generator": "generator", "softmax_inv_t": "inv_t",
    "spatial": "spatial",
}


def nmf_kwargs(ham_kwargs: Optional[Mapping]) -> dict:
    """Translate a ``ham_kwargs`` dict into :class:`segnext.NMF2D` keyword arguments, official meaning.

    Accepted keys:

    * mmseg 1.x: ``MD_S, MD_R, train_steps, eval_steps, inv_t, rand_init``;
    * official SegNeXt (Enjoy-Hamburger spelling): ``SPATIAL, MD_S, MD_D, MD_R, TRAIN_STEPS, EVAL_STEPS, INV_T,
      ETA, RAND_INIT``;
    * this package: ``eps, grad_mode, generator, spatial`` and ``softmax_inv_t`` (see below).

    ``inv_t`` / ``INV_T`` have no effect, as in both official implementations: their ``NMF2D.__init__`` overwrites
    ``self.inv_t = 1`` after reading it, so the ``inv_t=100`` of every config gives a softmax with inverse
    temperature 1. ``softmax_inv_t`` is a real inverse temperature (this package's option; NMF2D's own ``inv_t``
    keyword). ``MD_D`` (stored, never read: D = C / S) and ``ETA`` (the online-update rate, which neither
    implementation applies) have no effect either.

    Returns:
        dict of NMF2D keywords (only those given).

    Raises:
        TypeError: ``ham_kwargs`` is not a mapping, or a key is unknown (the message names it).
        ValueError: two spellings of one option (e.g. ``train_steps`` and ``TRAIN_STEPS``) with different values.
    """
    if ham_kwargs is None:
        return {}
    if not isinstance(ham_kwargs, Mapping):
        raise TypeError(f"ham_kwargs: expected a dict, got {type(ham_kwargs).__name__}")
    out: dict = {}
    spelled: dict = {}
    for key, value in ham_kwargs.items():
        if key not in _HAM_KEYS:
            raise TypeError(f"ham_kwargs: unknown option {key!r}; accepted: mmseg "
                            "MD_S, MD_R, train_steps, eval_steps, inv_t, rand_init; official SPATIAL, MD_D, "
                            "TRAIN_STEPS, EVAL_STEPS, INV_T, ETA, RAND_INIT; and eps, grad_mode, generator, spatial, "
                            "softmax_inv_t")
        target = _HAM_KEYS[key]
        if target is None:
            continue
        if target in out and out[target] != value:
            raise ValueError(f"ham_kwargs: {spelled[target]!r}={out[target]!r} and {key!r}={value!r} set the same "
                             f"option differently")
        out[target], spelled[target] = value, key
    return out


# ------------------------------------------------------------------------------------------------------ norm / act
_NORM_KEYS = {
    "BN": {"eps", "momentum", "affine", "track_running_stats"},
    "SyncBN": {"eps", "momentum", "affine", "track_running_stats"},
    "GN": {"num_groups", "eps", "affine"},
}


def build_norm_layer(norm_cfg, channels: int, *, where: str = "norm_cfg") -> Tuple[str, nn.Module]:
    """mmcv ``build_norm_layer`` for the norm types SegNeXt uses; returns ``(name, layer)``.

    Args:
        norm_cfg: ``"BN"`` / ``"BN2d"`` (``nn.BatchNorm2d``), ``"SyncBN"`` (``nn.SyncBatchNorm``; without an
            initialised process group it behaves like BN in eval), ``"GN"`` (``nn.GroupNorm``, 32 groups), or an
            mmcv dict ``{"type": ..., "requires_grad": bool, ...}``: the other keys are the layer's own
            constructor arguments (BN/SyncBN: eps, momentum, affine, track_running_stats; GN: num_groups, eps,
            affine), as mmcv passes them. ``requires_grad=False`` freezes the layer's parameters (mmcv).
            ``eps`` defaults to 1e-5 (mmcv and torch). A GN dict without ``num_groups`` uses 32 (mmcv requires it).
        channels: C of the (B, C, H, W) input.
        where: the option's name, for error messages.

    Returns:
        ``("bn" | "gn", module)`` -- mmcv's abbreviation (the ConvModule submodule name) and the layer.

    Raises:
        ValueError: unknown type or key (named), or ``requires_grad`` not a bool.
    """
    if norm_cfg is None:
        raise ValueError(f"{where}: expected a norm config, got None")
    cfg = dict(norm_cfg) if isinstance(norm_cfg, Mapping) else {"type": norm_cfg}
    kind = cfg.pop("type", None)
    kind = "BN" if kind == "BN2d" else kind
    if kind not in _NORM_KEYS:
        raise ValueError(f"{where}: norm type must be 'BN', 'SyncBN' or 'GN', got {kind!r}")
    requires_grad = cfg.pop("requires_grad", True)
    if not isinstance(requires_grad, bool):
        raise ValueError(f"{where}: requires_grad must be a bool, got {requires_grad!r}")
    unknown = sorted(set(cfg) - _NORM_KEYS[kind])
    if unknown:
        raise ValueError(f"{where}: unsupported key(s) {unknown} for type {kind!r} "
                         f"(accepted: type, requires_grad, {', '.join(sorted(_NORM_KEYS[kind]))})")
    if kind == "GN":
        groups = cfg.pop("num_groups", 32)
        name, layer = "gn", nn.GroupNorm(groups, channels, **cfg)
    else:
        name, layer = "bn", (nn.BatchNorm2d if kind == "BN" else nn.SyncBatchNorm)(channels, **cfg)
    for p in layer.parameters():
        p.requires_grad = requires_grad
    return name, layer


def check_act_cfg(act_cfg, allowed: str, *, where: str = "act_cfg") -> dict:
    """Check an mmcv ``act_cfg`` against the one activation a SegNeXt module has.

    Args:
        act_cfg: ``None`` is not accepted here (callers handle "no activation"); ``"GELU"`` / ``"ReLU"`` or
            ``{"type": ..., ...}``. GELU may carry ``approximate`` (``nn.GELU``'s argument, as mmcv passes it);
            ReLU may carry ``inplace`` (no effect on values).
        allowed: ``"GELU"`` (MSCAN) or ``"ReLU"`` (head ConvModules).

    Returns:
        the constructor keywords for the activation (``{"approximate": ...}`` or ``{}``).

    Raises:
        ValueError: another type, or an unknown key (named).
    """
    cfg = dict(act_cfg) if isinstance(act_cfg, Mapping) else {"type": act_cfg}
    kind = cfg.pop("type", None)
    if kind != allowed:
        raise ValueError(f"{where}: only {allowed!r} is supported (the SegNeXt activation), got {kind!r}")
    keys = {"GELU": {"approximate"}, "ReLU": {"inplace"}}[allowed]
    unknown = sorted(set(cfg) - keys)
    if unknown:
        raise ValueError(f"{where}: unsupported key(s) {unknown} for {allowed} (accepted: type, {', '.join(keys)})")
    cfg.pop("inplace", None)
    return cfg


# ---------------------------------------------------------------------------------------------- checkpoint meta
class _Unreadable:
    """Marks a config value the safe reader does not evaluate (a call other than dict(), a name, an expression)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"<unreadable: {self.text}>"


def _literal(node: ast.AST, names: dict) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_literal(e, names) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # {**other}
                spread = _literal(v, names)
                if isinstance(spread, dict):
                    out.update(spread)
                continue
            out[_literal(k, names)] = _literal(v, names)
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        out = {}
        for kw in node.keywords:
            value = _literal(kw.value, names)
            if kw.arg is None:
                if isinstance(value, dict):
                    out.update(value)
            else:
                out[kw.arg] = value
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, names)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    return _Unreadable(type(node).__name__)


def parse_config_text(text: str) -> dict:
    """Read an mmengine / mmcv ``Config.pretty_text`` (Python source of top-level assignments) WITHOUT running it.

    Literals, ``dict(...)`` calls and names assigned earlier are evaluated; anything else (other calls, lambdas,
    expressions) becomes an "unreadable" marker, which :func:`head_settings` refuses to use.

    Raises:
        ValueError: the text is not Python source.
    """
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise ValueError(f"config text is not Python source ({err.msg}, line {err.lineno})") from None
    names: dict = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            names[stmt.targets[0].id] = _literal(stmt.value, names)
    return names


def config_from_meta(meta) -> Tuple[Optional[str], Optional[dict], Optional[str]]:
    """The training config a checkpoint's ``meta`` carries.

    Where it is: mmengine's runner (mmseg 1.x) stores ``meta["cfg"] = cfg.pretty_text``; mmseg 0.x (the official
    SegNeXt code) stores ``meta["config"] = cfg.pretty_text``. Both are Python source text, read by
    :func:`parse_config_text` (no code runs). A plain dict there is used as it is. An mmengine ``Config`` object
    (only in a ``trust_pickle=True`` load with mmengine installed) is used through its dict; anything else (e.g. the
    inert stand-in of a trusted load without mmengine) is reported as unreadable.

    Returns:
        ``(source, config, problem)``: ``source`` names the entry (``"meta['cfg']"``) or is None when there is none;
        ``config`` the dict or None; ``problem`` why it could not be read, or None.
    """
    if not isinstance(meta, Mapping):
        return None, None, None
    for key in ("cfg", "config"):
        if key not in meta:
            continue
        value, source = meta[key], f"meta[{key!r}]"
        if isinstance(value, str):
            try:
                return source + " (config text)", parse_config_text(value), None
            except ValueError as err:
                return source, None, str(err)
        if isinstance(value, Mapping):
            return source + " (dict)", dict(value), None
        inner = getattr(value, "_cfg_dict", None)
        if isinstance(inner, Mapping):
            return source + " (mmengine Config)", _plain(inner), None
        return source, None, f"a {type(value).__name__} object, neither config text nor a dict"
    return None, None, None


def _plain(obj):
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj) if isinstance(obj, tuple) else [_plain(v) for v in obj]
    return obj


def head_settings(config: Mapping) -> Tuple[dict, Optional[str]]:
    """The NMF2D and resize settings of a SegNeXt config's ``model.decode_head`` (type ``LightHamHead``).

    Returns:
        ``(settings, problem)``: settings ``{"nmf": {MD_S, MD_R, train_steps, eval_steps, rand_init, spatial},
        "align_corners": bool}`` -- the config's ``ham_kwargs`` with the official meaning (:func:`nmf_kwargs`), the
        keys it leaves out at the official NMF2D defaults (:data:`OFFICIAL_NMF_DEFAULTS`); only the shape-free
        options (the rest decides parameter shapes, which the state_dict checks). ``problem``: why nothing could be
        taken (not a LightHamHead config, unreadable values), or None.
    """
    model = config.get("model") if isinstance(config, Mapping) else None
    head = model.get("decode_head") if isinstance(model, Mapping) else None
    if not isinstance(head, Mapping):
        return {}, "the config has no model.decode_head dict"
    if head.get("type", "LightHamHead") != "LightHamHead":
        return {}, f"model.decode_head is a {head.get('type')!r}, not a LightHamHead"
    ham = head.get("ham_kwargs", {})
    if not isinstance(ham, Mapping) or any(isinstance(v, _Unreadable) for v in ham.values()):
        return {}, f"model.decode_head.ham_kwargs cannot be read safely: {ham!r}"
    try:
        given = nmf_kwargs({k: v for k, v in ham.items() if k not in ("eps", "grad_mode", "generator",
                                                                       "softmax_inv_t")})
    except (TypeError, ValueError) as err:
        return {}, f"model.decode_head.ham_kwargs: {err}"
    nmf = {**OFFICIAL_NMF_DEFAULTS, **given}
    settings = {"nmf": nmf}
    align = head.get("align_corners", False)
    if isinstance(align, bool):
        settings["align_corners"] = align
    return settings, None


def as_nested_tuple(value):
    """Lists/tuples (nested) -> tuples, for comparing config values such as ``[5, [1, 7], ...]``."""
    if isinstance(value, (list, tuple)):
        return tuple(as_nested_tuple(v) for v in value)
    if isinstance(value, torch.Size):
        return tuple(value)
    return value
