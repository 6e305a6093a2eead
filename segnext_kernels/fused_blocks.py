"""Fused MSCAN blocks and 1x1 head convolutions for inference on CPU: ``FusedBlock`` / ``fuse_blocks`` and
``FusedConv1x1`` / ``fuse_head_convs`` (``fuse`` in ``modules.py`` applies them).

An MSCAN block (official ``mscan.py`` ``Block``; ``segnext.Block``) in eval mode, with BatchNorm norms::

    x1 = x + ls1 * (proj_2(MSCA(GELU(proj_1(BN1(x))))) + BN1(x))
    x2 = x1 + ls2 * fc2(GELU(dw3x3(fc1(BN2(x1)))))

runs as four kernels: ``pwconv(x, proj_1 with BN1 folded in, act="gelu")``, the MSCA module, ``pwconv`` for
proj_2 with the shortcut, the layer scale and the residual in its epilogue (``gamma = ls1``, ``alpha = 1 + ls1 *
s1``: BN1's scale ``s1`` and shift fold into the epilogue), and the fused MLP with BN2 as its input affine, ls2 as
its output scale and the residual in its epilogue. Only proj_1's C x C weight gets a folded copy; the per-channel
vectors and that copy are computed from the parameters and running statistics (a few small ops; ``state_dict`` is
what it was) and cached while none of them changes (tensor version counters).

Under ``torch.autocast("cpu", torch.bfloat16)`` (inference) the same four kernels run with their GEMMs on bfloat16
operands and fp32 accumulation (AVX512-BF16 where the CPU has it; the kernels round x and the float32 weights while
they pack them, so no weight copies are made), the epilogues in fp32. Dtypes follow eager autocast: proj_1 + GELU
and the MSCA give bfloat16, the residual stream (x1, the block's output) stays float32, as ``x + ls * (bfloat16)``
promotes in eager.

In plain eager inference (float32 NCHW-contiguous ``torch.Tensor`` input, without autocast or under bfloat16
autocast, nothing observing the ops:
no profiler, torch function / dispatch mode or functorch transform, see ``_direct_ok``) the block calls the "cpu"
backend's kernel functions itself instead of through the custom ops: the same kernels, with the weights checked by
the ops' own argument checks once when they were packed (MSCA's packed strips are cached with the rest), without the
per-op dispatch and checks (four ops per block).

Everything else runs the block's own submodules, op for op as eager: training mode, a gradient needed, a norm that
is not an eval-mode BatchNorm, GELU with ``approximate="tanh"``, a tensor that is not float32 on CPU (or bfloat16
under bfloat16 autocast), another autocast dtype, and under ``torch.export`` / ``torch.compile`` tracing of the
cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._direct import eager_direct_ok
from .backends import check_backend_name, kernel_module, resolve, supports
from .mlp import mlp
from .mlp.interface import check_mlp_args
from .mlp.reference import pack_weights as pack_mlp_weights
from .modules import MSCA_CONV_NAMES, _dw_conv, _is_mlp, _is_msca, swap_modules
from .msca.interface import check_msca_args
from .msca.reference import pack_weights as pack_msca_weights
from .pwconv import pwconv
from .pwconv.interface import check_pwconv_args

__all__ = ["FusedBlock", "FusedConv1x1", "fuse_blocks", "fuse_head_convs"]


def _is_eval_bn(norm: nn.Module) -> bool:
    """An eval-mode BatchNorm with running statistics (an affine map per channel)."""
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.running_mean is not None


def _bn_affine(norm: nn.Module):
    """(scale, shift) of an eval-mode BatchNorm2d, such that norm(x) = scale[c] * x + shift[c]; None otherwise."""
    if not _is_eval_bn(norm):
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def _bf16_autocast() -> bool:
    """CPU autocast is on with dtype bfloat16."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _exact_gelu(act: nn.Module) -> bool:
    return isinstance(act, nn.GELU) and act.approximate == "none"


_CPU_BLOCK_OPS_OK: set = set()


def _cpu_block_ops(dtype: torch.dtype) -> bool:
    """Whether the cpu pwconv and mlp kernels take CPU tensors of ``dtype`` (``backends.supports``); a yes is kept
    (the extension does not become unavailable once it is), a no is asked again next time."""
    if dtype in _CPU_BLOCK_OPS_OK:
        return True
    cpu = torch.device("cpu")
    ok = supports("pwconv", "cpu", cpu, dtype)[0] and supports("mlp", "cpu", cpu, dtype)[0]
    if ok:
        _CPU_BLOCK_OPS_OK.add(dtype)
    return ok


def _direct_ok(x: torch.Tensor) -> bool:
    """Whether a fused module may call the "cpu" kernel functions directly for ``x``: float32, NCHW-contiguous,
    not empty, and ``_direct.eager_direct_ok`` (a plain tensor, nothing observing or transforming ops, not tracing).
    Callers check grad and autocast."""
    return x.dtype == torch.float32 and x.numel() > 0 and x.is_contiguous() and eager_direct_ok(x)


class _Lazy:
    """A value computed on the first call and kept."""

    def __init__(self, make):
        self._make, self._value = make, None

    def __call__(self):
        if self._make is not None:
            self._value, self._make = self._make(), None
        return self._value


def _pack_msca_bf16(ws):
    """MSCA's packed weights as the op gets them under bfloat16 autocast: each of the 16 weights / biases (``ws``,
    the official conv order, weight then bias) rounded to bfloat16 as autocast casts it, then packed in float32."""
    with torch.no_grad():
        r = [t.to(torch.bfloat16) for t in ws]
        return pack_msca_weights(r[0], r[1], r[2:14:2], r[3:14:2], r[14], r[15], torch.float32)


def _is_block(module: nn.Module) -> bool:
    """A ``segnext.Block`` (NCHW forward) whose attention and MLP have the official structure."""
    if type(module).__name__ != "Block" or not hasattr(module, "layer_scale_1"):
        return False
    attn, m = getattr(module, "attn", None), getattr(module, "mlp", None)
    if attn is None or m is None or not all(hasattr(attn, n) for n in ("proj_1", "proj_2", "spatial_gating_unit")):
        return False
    msca_ok = _is_msca(attn.spatial_gating_unit) or type(attn.spatial_gating_unit).__name__ == "FusedMSCA"
    mlp_ok = _is_mlp(m) or type(m).__name__ == "FusedMlp"
    return msca_ok and mlp_ok and _dw_conv(m) is not None


class FusedBlock(nn.Module):
    """Drop-in for ``segnext.Block`` (official MSCAN ``Block``) running four fused kernels in eval mode.

    Same submodules (layer_scale_1/2, norm1, attn (proj_1, activation, spatial_gating_unit, proj_2), drop_path,
    norm2, mlp) and therefore the same ``state_dict``. See the module docstring for what runs when.

    Args (``from_module``): block: the ``segnext.Block`` whose submodules and parameters it takes over (shared
    objects); backend: "auto" or "cpu" for the fused ops (``pwconv``, ``mlp``), read at every forward.

    forward(x): (B, C, H, W) -> (B, C, H, W), same dtype (under bfloat16 autocast: float32, as eager's block).
    """

    @classmethod
    def from_module(cls, block: nn.Module, backend: str = "auto") -> "FusedBlock":
        """Raises: TypeError when ``block`` is not an MSCAN block with the official structure."""
        if not _is_block(block):
            raise TypeError(f"block: expected a segnext.Block (norm1, attn.proj_1/spatial_gating_unit/proj_2, "
                            f"norm2, mlp), got {type(block).__name__}")
        check_backend_name(backend)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, p in block.named_parameters(recurse=False):
            fused.register_parameter(name, p)
        for name, child in block.named_children():
            fused.add_module(name, child)
        fused.backend = backend
        fused._cache_key = None
        fused._cache = None
        fused._direct_key = None
        fused._direct = None
        fused.train(block.training)
        return fused

    def extra_repr(self) -> str:
        return f"dim={self.layer_scale_1.numel()}, backend={self.backend!r}"

    # ---------------------------------------------------------------------------------------------- eager path
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))

    # ---------------------------------------------------------------------------------------------- fused path
    def _sources(self):
        """The tensors the folded vectors depend on (their version counters key the cache). Read from the modules'
        own dicts (``_parameters`` / ``_buffers`` / ``_modules``, what nn.Module.__getattr__ reads, without its cost:
        this runs on every forward)."""
        p, mods = self._parameters, self._modules
        a = mods["attn"]._modules
        p1, p2 = a["proj_1"]._parameters, a["proj_2"]._parameters
        ts = [p["layer_scale_1"], p["layer_scale_2"], p1["weight"], p1.get("bias"), p2.get("bias")]
        for name in ("norm1", "norm2"):
            nb, np_ = mods[name]._buffers, mods[name]._parameters
            ts += [nb.get("running_mean"), nb.get("running_var"), np_.get("weight"), np_.get("bias")]
        return ts

    def _folded(self):
        """The per-channel vectors of the fused path, and proj_1's weight with BN1 folded in (C x C); the large
        weights (proj_2, fc1, fc2) are used as they are: BN2 and the layer scales are applied inside the kernels."""
        ts = self._sources()
        key = tuple((id(t), t._version) if t is not None else None for t in ts)
        if key == self._cache_key and self._cache is not None:
            return self._cache
        with torch.no_grad():
            s1, t1 = _bn_affine(self.norm1)
            s2, t2 = _bn_affine(self.norm2)
            ls1, ls2 = self.layer_scale_1, self.layer_scale_2
            a = self.attn
            C = ls1.numel()
            wp1 = a.proj_1.weight.reshape(C, C)
            p1w = (wp1 * s1[None, :]).contiguous()
            p1b = a.proj_1.bias + wp1 @ t1
            # x1 = x + ls1 * (proj_2(att) + BN1(x)) = ls1 * (W2 att) + ls1 * (b2 + t1) + (1 + ls1 * s1) * x
            p2b = ls1 * (a.proj_2.bias + t1)
            p2alpha = 1.0 + ls1 * s1
            # x2 = x1 + ls2 * mlp(BN2(x1)): the MLP kernel's input affine (s2, t2) and output scale ls2
            affine = torch.stack([s2, t2, ls2]).contiguous()
            cache = (p1w, p1b, p2b, p2alpha, ls1.detach(), affine)
        self._cache_key, self._cache = key, cache
        return cache

    def _direct_weights(self):
        """The kernels' arguments of the direct path (module docstring), or None where it does not apply (the
        attention is not a FusedMSCA resolving to "cpu", a weight is not float32): (pwconv and msca kernel modules,
        MSCA's packed weights, a callable giving them as the op packs them under bfloat16 autocast (made on first
        use), the mlp kernel module, the MLP's packed weights, proj_2's (C, C) weight), cached while no tensor or
        backend changes (version counters)."""
        a, m = self.attn, self.mlp
        g = a.spatial_gating_unit
        dw = _dw_conv(m)
        if type(g).__name__ != "FusedMSCA" or dw is None:
            return None
        gm, mm = g._modules, m._modules
        convs = [gm[n] for n in MSCA_CONV_NAMES]
        wb = lambda c: (c._parameters["weight"], c._parameters.get("bias"))  # noqa: E731  (as _sources: no getattr)
        mts = wb(mm["fc1"]) + wb(dw) + wb(mm["fc2"])
        ts = [t for c in convs for t in wb(c)] + list(mts) + [a._modules["proj_2"]._parameters["weight"]]
        key = (g.backend, self.backend) + tuple((id(t), t._version) if t is not None else None for t in ts)
        if key == self._direct_key:
            return self._direct
        direct = None
        C = self.layer_scale_1.numel()
        if (all(t is not None and t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
                and tuple(a.proj_2.weight.shape[:2]) == (C, C) and m.fc2.weight.shape[0] == C
                and resolve("msca", g.backend, torch.device("cpu"), torch.float32) == "cpu"):
            with torch.no_grad():
                probe = torch.empty(1, C, 1, 1)  # the ops' own checks of the weights, once
                mw = ts[:16]  # the MSCA weights and biases, official conv order (weight, bias per conv)
                msca_args = (mw[0], mw[1], mw[2:14:2], mw[3:14:2], mw[14], mw[15])
                check_msca_args(probe, *msca_args)
                check_mlp_args(probe, *mts)
                check_pwconv_args(probe, a.proj_2.weight, None, "none", None, None)
                mpack = pack_msca_weights(*msca_args, torch.float32)
                direct = (kernel_module("pwconv", "cpu"), kernel_module("msca", "cpu"), mpack,
                          _Lazy(lambda: _pack_msca_bf16(mw)), kernel_module("mlp", "cpu"), pack_mlp_weights(*mts),
                          a.proj_2.weight.reshape(C, C))
        self._direct_key, self._direct = key, direct
        return direct

    def _fast_ok(self, x: torch.Tensor) -> bool:
        if self.training or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        # float32; under bfloat16 autocast also bfloat16 (the patch embedding's output)
        want = (torch.float32, torch.bfloat16) if _bf16_autocast() else () if torch.is_autocast_enabled("cpu") \
            else (torch.float32,)
        if not (x.device.type == "cpu" and x.dtype in want and x.dim() == 4):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        if self.backend not in ("auto", "cpu") or not _exact_gelu(self.attn.activation):
            return False
        mact = getattr(self.mlp, "act", None)
        if not _exact_gelu(mact) or not _is_eval_bn(self.norm1) or not _is_eval_bn(self.norm2):
            return False
        if self.layer_scale_1.dtype != torch.float32:
            return False
        return _cpu_block_ops(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_ok(x):
            return self._eager(x)
        p1w, p1b, p2b, p2alpha, ls1, affine = self._folded()
        lowp = torch.is_autocast_enabled("cpu")  # bfloat16 autocast (_fast_ok): bfloat16 GEMM operands
        bf = torch.bfloat16
        if lowp:  # float32 weights and residual stream, eager autocast's dtypes
            x = x.float()
        direct = self._direct_weights() if _direct_ok(x) and x.shape[1] == ls1.numel() else None
        if direct is not None:  # the kernels and arguments the ops below get, without their dispatch
            pw, ms, mpack, mpack_bf16, ml, mlpack, w2 = direct
            u = pw.forward(x, p1w, p1b, "gelu", None, None, None, bf if lowp else None, lowp)
            att = ms.forward(u, *(mpack_bf16() if lowp else mpack))
            x1 = pw.forward(att, w2, p2b, "none", p2alpha, x, ls1, torch.float32 if lowp else None, lowp)
            return ml.forward(x1, *mlpack, residual=x1, affine=affine, lowp=lowp)
        a, m = self.attn, self.mlp
        dw = _dw_conv(m)
        mw = (m.fc1.weight, m.fc1.bias, dw.weight, dw.bias, m.fc2.weight, m.fc2.bias)
        if not lowp:
            u = pwconv(x, p1w, p1b, act="gelu", backend="cpu")
            att = a.spatial_gating_unit(u)
            x1 = pwconv(att, a.proj_2.weight, p2b, alpha=p2alpha, r=x, gamma=ls1, backend="cpu")
            return mlp(x1, *mw, residual=x1, affine=affine, backend="cpu")
        with torch.autocast("cpu", enabled=False):
            u = pwconv(x, p1w, p1b, act="gelu", out_dtype=bf, gemm_dtype=bf, backend="cpu")
        att = a.spatial_gating_unit(u)  # the MSCA op under autocast: bfloat16
        with torch.autocast("cpu", enabled=False):
            x1 = pwconv(att, a.proj_2.weight, p2b, alpha=p2alpha, r=x, gamma=ls1, out_dtype=torch.float32,
                        backend="cpu")
            return mlp(x1, *mw, residual=x1, affine=affine, gemm_dtype=bf, backend="cpu")


class FusedConv1x1(nn.Conv2d):
    """Drop-in for a 1x1 ``nn.Conv2d`` (stride 1, no padding, groups 1) running ``segnext_kernels.pwconv`` (the
    same parameters; the state_dict is unchanged). Under ``torch.autocast("cpu", torch.bfloat16)`` in inference it
    runs the kernel with bfloat16 GEMM operands (rounded in the kernel; fp32 epilogue) and a bfloat16 output, as
    eager's autocast conv. Where ``pwconv`` runs its reference (a gradient is needed, a dtype other than float32, a
    non-CPU tensor, another autocast dtype) the result is F.conv2d's.

    forward(x): (B, Cin, H, W) -> (B, Cout, H, W).
    """

    @classmethod
    def from_module(cls, conv: nn.Conv2d, backend: str = "auto") -> "FusedConv1x1":
        """Raises: TypeError when ``conv`` is not an eligible 1x1 nn.Conv2d."""
        if not _is_conv1x1(conv):
            raise TypeError(f"conv: expected a 1x1 nn.Conv2d with stride 1, no padding, groups 1, got {conv!r}")
        check_backend_name(backend)
        fused = adopt(cls, conv)
        fused.backend = backend
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in (x, self.weight, self.bias))
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _bf16_autocast() and not needs_grad:
            # bfloat16 autocast, inference: bfloat16 GEMM operands (rounded in the kernel), fp32 epilogue, bfloat16
            # output, as eager's autocast conv
            bf = torch.bfloat16
            with torch.autocast("cpu", enabled=False):
                return pwconv(x, self.weight, self.bias, out_dtype=bf, gemm_dtype=bf, backend=self.backend)
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return F.conv2d(x, self.weight, self.bias)
        if not needs_grad and _direct_ok(x) and x.shape[1] == self.in_channels:
            direct = self._direct_weights()
            if direct is not None:  # as FusedBlock's direct path: the kernel without the op's dispatch
                kernel, w, b = direct
                return kernel.forward(x, w, b, "none", None, None)
        return pwconv(x, self.weight, self.bias, backend=self.backend)

    def _direct_weights(self):
        """(the cpu pwconv kernel module, weight (Cout, Cin), bias) for the direct path, checked once by the op's
        argument checks and cached while the tensors and the backend stay the same; None when the op would not run
        the cpu kernel (another backend, a weight that is not float32)."""
        key = (self.backend,) + tuple((id(t), t._version) if t is not None else None for t in (self.weight, self.bias))
        if key != getattr(self, "_direct_key", None):
            direct = None
            w, b = self.weight, self.bias
            if (w.dtype == torch.float32 and w.device.type == "cpu" and (b is None or b.dtype == torch.float32)
                    and resolve("pwconv", self.backend, torch.device("cpu"), torch.float32) == "cpu"):
                check_pwconv_args(torch.empty(1, self.in_channels, 1, 1), w, b, "none", None, None)
                w2 = w.detach().reshape(w.shape[0], w.shape[1])
                direct = (kernel_module("pwconv", "cpu"), w2.contiguous(), None if b is None else b.detach())
            self._direct_key, self._direct = key, direct
        return self._direct


def adopt(cls, module: nn.Module) -> nn.Module:
    """A new ``cls`` (a subclass of ``module``'s class) holding ``module``'s own attributes, parameters, buffers and
    submodules, the same objects (so its ``state_dict`` is ``module``'s), in ``module``'s train / eval mode: how a
    fused module takes over the one it replaces (``FusedConv1x1``, ``fused_head.FusedLightHamHead``)."""
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    for k, v in module.__dict__.items():
        if k not in ("_parameters", "_buffers", "_modules", "training"):
            fused.__dict__[k] = v
    for name, p in module._parameters.items():
        fused.register_parameter(name, p)
    for name, b in module._buffers.items():
        fused.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    for name, child in module._modules.items():
        fused.add_module(name, child)
    fused.train(module.training)
    return fused


def _is_conv1x1(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), 0)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def _runs_on_cpu(model: nn.Module, backend: str) -> bool:
    """Whether the fused CPU ops (pwconv, mlp) run for ``backend`` on ``model``'s parameters."""
    if backend not in ("auto", "cpu"):
        return False
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    if p is None or p.device.type != "cpu":
        return False
    ok_pw, why_pw = supports("pwconv", "cpu", p.device, torch.float32)
    ok_mlp, why_mlp = supports("mlp", "cpu", p.device, torch.float32)
    if not (ok_pw and ok_mlp):
        if backend == "cpu":
            raise RuntimeError(f"backend='cpu': the fused CPU block kernels cannot run here ({why_pw or why_mlp})")
        return False
    return True


def fuse_blocks(model: nn.Module, backend: str = "auto") -> int:
    """Swap every ``segnext.Block`` inside ``model`` for a ``FusedBlock`` sharing its submodules, in place, when the
    fused CPU ops can run on ``model``'s device ("auto" / "cpu" on a CPU model; other backends and devices swap
    nothing). Returns the number swapped. Raises ValueError for an unknown backend, RuntimeError when
    backend="cpu" cannot run here."""
    check_backend_name(backend)
    if not _runs_on_cpu(model, backend):
        return 0
    return swap_modules(model, _is_block, lambda m: FusedBlock.from_module(m, backend=backend))


def fuse_head_convs(model: nn.Module, backend: str = "auto") -> int:
    """Swap the 1x1 convolutions of every ``LightHamHead`` inside ``model`` (squeeze, ham_in, ham_out, align,
    conv_seg) for ``FusedConv1x1`` sharing their parameters, in place, under the same conditions as
    ``fuse_blocks``. Returns the number swapped."""
    check_backend_name(backend)
    if not _runs_on_cpu(model, backend):
        return 0
    heads = [m for m in model.modules() if type(m).__name__ == "LightHamHead"]
    if type(model).__name__ == "LightHamHead":
        heads = [model]
    return sum(swap_modules(h, _is_conv1x1, lambda c: FusedConv1x1.from_module(c, backend=backend)) for h in heads)
