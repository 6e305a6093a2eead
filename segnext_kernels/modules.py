"""nn.Modules that drop into a SegNeXt model in place of the reference ones, keeping parameters and state_dict, and the
model rewriters that swap them in: ``FusedMSCA`` / ``fuse_msca``, ``FusedNMF2D`` / ``fuse_ham``, ``FusedMlp`` /
``fuse_mlp``, and ``fuse`` (all of them, with the fused blocks and head convolutions of ``fused_blocks.py``).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from segnext.ham_head import NMF2D
from segnext.mscan import DWConv
from segnext.segmentor import LogitsResize

from .backends import check_backend_name, resolve
from .mlp import mlp
from .msca import msca
from .nmf import nmf2d
from .resize import resize_bilinear
from .nmf.interface import _check_eps_inv_t, register_generator

__all__ = ["FusedLogitsResize", "FusedMSCA", "FusedMlp", "FusedNMF2D", "fuse", "fuse_ham", "fuse_mlp", "fuse_msca",
           "fuse_resize", "swap_modules"]


# ---------------------------------------------------------------------------------------------------------- MSCA
#: Submodule names of the official MSCA module (``AttentionModule``; mmseg's ``MSCAAttention`` uses the same).
MSCA_CONV_NAMES = ("conv0", "conv0_1", "conv0_2", "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3")
_MSCA_CLASS_NAMES = ("AttentionModule", "MSCAAttention")


class FusedMSCA(nn.Module):
    """Drop-in for ``segnext.AttentionModule`` (official ``mscan.py``) running ``segnext_kernels.msca``.

    Same submodules (conv0, conv0_1, conv0_2, conv1_1, conv1_2, conv2_1, conv2_2, conv3: nn.Conv2d with the official
    shapes) and therefore the same ``state_dict`` keys; checkpoints load unchanged either way.

    Args:
        dim: channels C.
        backend: "auto", "cpu", "cuda", "triton" or "reference"; read at every forward, so it can be changed
            later (``segnext_kernels.backends`` says where each runs).

    forward(x): x (B, C, H, W) -> (B, C, H, W), same dtype. Raises what ``segnext_kernels.msca`` raises.
    """

    def __init__(self, dim: int, backend: str = "auto"):
        super().__init__()
        check_backend_name(backend)
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv0_1 = nn.Conv2d(dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.conv0_2 = nn.Conv2d(dim, dim, (7, 1), padding=(3, 0), groups=dim)
        self.conv1_1 = nn.Conv2d(dim, dim, (1, 11), padding=(0, 5), groups=dim)
        self.conv1_2 = nn.Conv2d(dim, dim, (11, 1), padding=(5, 0), groups=dim)
        self.conv2_1 = nn.Conv2d(dim, dim, (1, 21), padding=(0, 10), groups=dim)
        self.conv2_2 = nn.Conv2d(dim, dim, (21, 1), padding=(10, 0), groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 1)
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedMSCA":
        """A FusedMSCA sharing ``module``'s convolutions (the same Parameter objects, so optimizers keep working).

        Raises:
            TypeError: ``module`` lacks one of the official conv submodules.
        """
        missing = [n for n in MSCA_CONV_NAMES if not isinstance(getattr(module, n, None), nn.Conv2d)]
        if missing:
            raise TypeError(f"module: expected an MSCA module with nn.Conv2d submodules {MSCA_CONV_NAMES}, "
                            f"{type(module).__name__} lacks {missing}")
        check_backend_name(backend)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for n in MSCA_CONV_NAMES:
            setattr(fused, n, getattr(module, n))
        fused.backend = backend
        fused.train(module.training)
        return fused

    def extra_repr(self) -> str:
        return f"dim={self.conv0.in_channels}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = [getattr(self, n) for n in MSCA_CONV_NAMES[1:7]]
        return msca(x, self.conv0.weight, self.conv0.bias, [c.weight for c in convs], [c.bias for c in convs],
                    self.conv3.weight, self.conv3.bias, backend=self.backend)


def _is_msca(module: nn.Module) -> bool:
    return type(module).__name__ in _MSCA_CLASS_NAMES and all(hasattr(module, n) for n in MSCA_CONV_NAMES)


# ---------------------------------------------------------------------------------------------------------- NMF2D
def _check_module_options(MD_S, MD_R, train_steps, eval_steps, inv_t, eps, generator) -> None:
    for name, v, low in (("MD_S", MD_S, 1), ("MD_R", MD_R, 1), ("train_steps", train_steps, 0),
                         ("eval_steps", eval_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if v < low:
            raise ValueError(f"{name}: expected {name} >= {low}, got {v}")
    _check_eps_inv_t(eps, inv_t)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


class FusedNMF2D(NMF2D):
    """Drop-in for ``segnext.NMF2D`` (official ``NMF2D``, ``SPATIAL=True, RAND_INIT=True``) running
    ``segnext_kernels.nmf2d``.

    Same constructor options (MD_S, MD_R, train_steps, eval_steps, inv_t, eps, grad_mode, generator) plus
    ``backend``; no parameters or buffers, so ``state_dict`` is unchanged. Bases are drawn exactly as the reference
    module draws them (``NMF2D._build_bases``: ``torch.rand`` on the CPU default generator, or on ``generator``,
    then L2-normalised over D), so under the same seed both modules see the same bases and agree.

    forward(x, bases=None): x (B, C, H, W) non-negative, any floating dtype -> (B, C, H, W) same dtype;
    ``bases`` (B*S, D, R) overrides the random draw.

    torch.compile(fullgraph=True) traces it with or without ``generator``: the draw from a generator runs in the
    custom op ``segnext_kernels::nmf_rand_bases`` (dynamo cannot trace ``torch.rand(..., generator=g)`` itself; the
    reference ``segnext.NMF2D(generator=g)`` breaks the graph there), with the same numbers as eager.
    ``generator`` may be reassigned later; a deep copy or unpickled copy draws from its own copy of the generator.

    Raises:
        TypeError: a non-int MD_S / MD_R / train_steps / eval_steps, a non-real inv_t / eps, a generator that is
            not a torch.Generator.
        ValueError: MD_S or MD_R < 1, negative steps, eps <= 0 or non-finite, non-finite inv_t, bad ``grad_mode``,
            unknown backend; at forward: x not a 4-D tensor (TypeError for a non-tensor), C not divisible by S,
            ``bases`` of the wrong shape, and whatever ``nmf2d`` raises (e.g. an eps too small for the compute dtype).
    """

    def __init__(self, MD_S: int = 1, MD_R: int = 64, train_steps: int = 6, eval_steps: int = 7,
                 inv_t: float = 1, eps: float = 1e-6, grad_mode: str = "unrolled",
                 generator: Optional[torch.Generator] = None, backend: str = "auto"):
        _check_module_options(MD_S, MD_R, train_steps, eval_steps, inv_t, eps, generator)
        super().__init__(MD_S=MD_S, MD_R=MD_R, train_steps=train_steps, eval_steps=eval_steps, inv_t=inv_t,
                         eps=eps, grad_mode=grad_mode, generator=generator)
        check_backend_name(backend)
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedNMF2D":
        """A FusedNMF2D with ``module``'s options (``segnext.NMF2D``, or an official / mmseg ``NMF2D`` with
        ``rand_init=True``; their eps is the hard-coded 1e-6 and their grad mode "unrolled").

        Raises:
            TypeError: ``module`` is not an NMF2D with random init (S, R, train_steps, eval_steps attributes).
        """
        if not _is_nmf(module):
            raise TypeError(f"module: expected an NMF2D module with rand_init=True (attributes S, R, train_steps, "
                            f"eval_steps), got {type(module).__name__}")
        fused = cls(MD_S=module.S, MD_R=module.R, train_steps=module.train_steps, eval_steps=module.eval_steps,
                    inv_t=getattr(module, "inv_t", 1), eps=getattr(module, "eps", 1e-6),
                    grad_mode=getattr(module, "grad_mode", "unrolled"),
                    generator=getattr(module, "generator", None), backend=backend)
        fused.train(module.training)
        return fused

    @property
    def generator(self) -> Optional[torch.Generator]:
        return self._generator

    @generator.setter
    def generator(self, gen: Optional[torch.Generator]) -> None:
        if gen is not None and not isinstance(gen, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(gen).__name__}")
        self._generator = gen
        self._generator_key = None
        if gen is not None:
            self._generator_key = register_generator(gen)

    def __setstate__(self, state):
        # deepcopy / unpickling restore __dict__ with a copy of the generator: register the copy under a key of its own
        super().__setstate__(state)
        self.generator = self.__dict__.get("_generator")

    def _build_bases(self, B: int, D: int, device) -> torch.Tensor:
        """``NMF2D._build_bases`` (same numbers); with a generator, the draw runs in a custom op (see the class
        docstring) so that torch.compile traces it."""
        if self._generator_key is None:
            return super()._build_bases(B, D, device)
        bases = torch.ops.segnext_kernels.nmf_rand_bases(self._generator_key, B * self.S, D, self.R, device)
        return F.normalize(bases, dim=1)

    def forward(self, x: torch.Tensor, bases: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D tensor (B, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
        return super().forward(x, bases)

    def _factorize(self, x: torch.Tensor, bases: torch.Tensor, steps: int) -> torch.Tensor:
        """``NMF2D.forward``'s factorisation, run by ``segnext_kernels.nmf2d`` on this module's backend."""
        bases = bases.to(torch.promote_types(x.dtype, torch.float32))
        return nmf2d(x, bases, steps, grad_mode=self.grad_mode, eps=self.eps, inv_t=self.inv_t, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


def _is_nmf(module: nn.Module) -> bool:
    return (type(module).__name__ == "NMF2D" and all(hasattr(module, a) for a in ("S", "R", "train_steps",
                                                                                    "eval_steps"))
            and getattr(module, "rand_init", True) and getattr(module, "spatial", True))


# ----------------------------------------------------------------------------------------------------------- Mlp
def _dw_conv(module: nn.Module):
    """The depthwise 3x3 conv of an MSCAN Mlp: ``dwconv.dwconv`` (official / segnext) or ``dwconv`` (mmseg)."""
    dw = getattr(module, "dwconv", None)
    inner = getattr(dw, "dwconv", None)
    return inner if isinstance(inner, nn.Conv2d) else dw


def _is_mlp(module: nn.Module) -> bool:
    if type(module).__name__ != "Mlp":
        return False
    fc1, fc2, dw = getattr(module, "fc1", None), getattr(module, "fc2", None), _dw_conv(module)
    if not all(isinstance(c, nn.Conv2d) for c in (fc1, fc2, dw)):
        return False
    return (fc1.kernel_size == (1, 1) and fc2.kernel_size == (1, 1) and dw.kernel_size == (3, 3)
            and dw.groups == dw.in_channels == fc1.out_channels and dw.padding == (1, 1) and dw.stride == (1, 1)
            and dw.dilation == (1, 1) and all(c.bias is not None for c in (fc1, fc2, dw))
            and getattr(dw, "padding_mode", "zeros") == "zeros")


def _drop_p(module: nn.Module) -> float:
    drop = getattr(module, "drop", None)
    return float(getattr(drop, "p", 0.0)) if drop is not None else 0.0


class FusedMlp(nn.Module):
    """Drop-in for ``segnext.Mlp`` (official MSCAN ``Mlp``) running ``segnext_kernels.mlp``.

    Same submodules (fc1, dwconv.dwconv, fc2: nn.Conv2d; act, drop) and therefore the same ``state_dict`` keys.

    Args:
        in_features: C; hidden_features: Hd; out_features: C_out (default C); drop: dropout probability. A nonzero
            dropout runs the eager reference with dropout while training (the fused kernels have none); in eval
            dropout is the identity and the kernels run.
        backend: "auto", "cpu" or "reference"; read at every forward.

    forward(x): (B, C, H, W) -> (B, C_out, H, W), same dtype. Raises what ``segnext_kernels.mlp`` raises.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, drop: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        check_backend_name(backend)
        out_features = out_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedMlp":
        """A FusedMlp sharing ``module``'s convolutions (the same Parameter objects, so optimizers keep working).

        Raises:
            TypeError: ``module`` is not an MSCAN Mlp (fc1 1x1, dwconv[.dwconv] depthwise 3x3 padding 1, fc2 1x1,
                all with bias).
        """
        if not _is_mlp(module):
            raise TypeError(f"module: expected an MSCAN Mlp (fc1 1x1, dwconv.dwconv depthwise 3x3 with padding 1, "
                            f"fc2 1x1, all with bias), got {type(module).__name__}")
        check_backend_name(backend)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.fc1 = module.fc1
        fused.dwconv = module.dwconv  # DWConv wrapper (official) or the conv itself (mmseg): keys unchanged
        fused.act = nn.GELU()
        fused.fc2 = module.fc2
        fused.drop = nn.Dropout(_drop_p(module))
        fused.backend = backend
        fused.train(module.training)
        return fused

    def extra_repr(self) -> str:
        return (f"in_features={self.fc1.in_channels}, hidden_features={self.fc1.out_channels}, "
                f"out_features={self.fc2.out_channels}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dw = _dw_conv(self)
        if self.training and self.drop.p > 0:  # dropout active: the eager ops with dropout (kernels have none)
            h = self.drop(self.act(dw(self.fc1(x))))
            return self.drop(self.fc2(h))
        return mlp(x, self.fc1.weight, self.fc1.bias, dw.weight, dw.bias, self.fc2.weight, self.fc2.bias,
                   backend=self.backend)


# ------------------------------------------------------------------------------------------------------ rewriters
def fuse_ham(model: nn.Module, backend: str = "auto") -> int:
    """Swap every ``NMF2D`` inside ``model`` (``segnext.NMF2D``, or an official / mmseg one with random init) for a
    ``FusedNMF2D`` with the same options, in place. NMF2D has no parameters or buffers: ``state_dict`` is unchanged.

    Returns:
        the number of modules swapped (0 when there are none, e.g. already fused, or ``model`` is itself an NMF2D:
        use ``FusedNMF2D.from_module``).

    Raises:
        ValueError: unknown backend (nothing is swapped then).
        RuntimeError / TypeError: ``backend`` cannot run on the device (and dtype) of ``model``'s parameters, with
            the error the first forward would give (checked before anything is swapped).
    """
    check_backend_name(backend)
    _check_runs_on_model("nmf2d", backend, model)
    return swap_modules(model, _is_nmf, lambda m: FusedNMF2D.from_module(m, backend=backend))


def fuse_msca(model: nn.Module, backend: str = "auto") -> int:
    """Swap every MSCA module (``segnext.AttentionModule``, or mmseg's ``MSCAAttention``) inside ``model`` for a
    ``FusedMSCA`` sharing its weights, in place. ``model.state_dict()`` keys and values are unchanged.

    Returns:
        the number of modules swapped (0 when ``model`` has none, or is itself an MSCA module: wrap it, or use
        ``FusedMSCA.from_module``).

    Raises:
        ValueError: unknown backend.
        RuntimeError / TypeError: ``backend`` cannot run on the device (and dtype) of the MSCA modules' parameters,
            with the error the first forward would give (checked before anything is swapped).
    """
    check_backend_name(backend)
    for m in model.modules():
        if _is_msca(m):
            _check_runs_on_model("msca", backend, m)
    return swap_modules(model, _is_msca, lambda m: FusedMSCA.from_module(m, backend=backend))


def fuse(model: nn.Module, backend: str = "auto") -> dict:
    """Apply every fusion of this package to ``model`` in place; ``state_dict`` is unchanged.

    ``fuse_msca`` (MSCA attention) and ``fuse_ham`` (NMF2D) with ``backend``; and where the fused CPU kernels run
    (backend "auto" or "cpu" on a CPU model): ``fuse_blocks`` (each MSCAN block as four fused kernels in eval mode:
    ``segnext_kernels.fused_blocks``), ``fuse_head_convs`` (the decode head's 1x1 convolutions) and
    ``fuse_resize`` (the final resize of the logits to the input size), ``fuse_stage_norms`` (MSCAN's stage
    LayerNorms on NCHW memory: ``segnext_kernels.fused_norms``), ``fuse_patch_embeds`` (the stem and patch
    embeddings with their eval BatchNorms folded in: ``segnext_kernels.fused_embeds``), ``fuse_head_norms`` (the
    decode head's GroupNorms: ``segnext_kernels.fused_norms``) and ``fuse_head_squeeze`` (the head's squeeze 1x1 on
    each map before the resize: ``segnext_kernels.fused_head``).

    Returns:
        ``{"msca": n, "ham": n, "block": n, "conv1x1": n, "resize": n, "norm": n, "embed": n, "group_norm": n,
        "head": n}``:
        how many modules of each kind were swapped.

    Raises:
        ValueError, RuntimeError, TypeError: as ``fuse_msca`` / ``fuse_ham`` (checked before anything is swapped).
    """
    from .fused_blocks import _runs_on_cpu, fuse_blocks, fuse_head_convs
    from .fused_embeds import fuse_patch_embeds
    from .fused_head import fuse_head_squeeze
    from .fused_norms import fuse_head_norms, fuse_stage_norms

    check_backend_name(backend)
    if any(_is_msca(m) for m in model.modules()):
        _check_runs_on_model("msca", backend, model)
    if any(_is_nmf(m) for m in model.modules()):
        _check_runs_on_model("nmf2d", backend, model)
    report = {"msca": fuse_msca(model, backend=backend), "ham": fuse_ham(model, backend=backend)}
    report["block"] = fuse_blocks(model, backend=backend)
    report["conv1x1"] = fuse_head_convs(model, backend=backend)
    report["resize"] = fuse_resize(model, backend=backend) if _runs_on_cpu(model, backend) else 0
    report["norm"] = fuse_stage_norms(model, backend=backend)
    report["embed"] = fuse_patch_embeds(model, backend=backend)
    report["group_norm"] = fuse_head_norms(model, backend=backend)
    report["head"] = fuse_head_squeeze(model, backend=backend)
    return report


def fuse_mlp(model: nn.Module, backend: str = "auto") -> int:
    """Swap every MSCAN ``Mlp`` (``segnext.Mlp``, official or mmseg) inside ``model`` for a ``FusedMlp`` sharing its
    weights, in place. ``model.state_dict()`` keys and values are unchanged.

    Returns:
        the number of modules swapped.

    Raises:
        ValueError: unknown backend.
        RuntimeError / TypeError: ``backend`` cannot run on the device (and dtype) of the Mlp modules' parameters,
            with the error the first forward would give (checked before anything is swapped).
    """
    check_backend_name(backend)
    for m in model.modules():
        if _is_mlp(m):
            p = m.fc1.weight
            resolve("mlp", backend, p.device, p.dtype)
    return swap_modules(model, _is_mlp, lambda m: FusedMlp.from_module(m, backend=backend))


def _check_runs_on_model(op: str, backend: str, model: nn.Module) -> None:
    """Resolve ``backend`` for ``op`` on the device and dtype of ``model``'s first floating parameter (CPU float32
    when it has none, as NMF2D): raises what the first forward would raise; "auto" says once what it runs."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    resolve(op, backend, device, dtype)


def swap_modules(model: nn.Module, match, make) -> int:
    """Replace, in place, every submodule ``m`` of ``model`` with ``match(m)`` true by ``make(m)``; returns the count.
    (``model`` itself is never replaced.) Shared by ``fuse_msca`` and ``fuse_ham``."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


# ------------------------------------------------------------------------------------------------- logits resize
class FusedLogitsResize(LogitsResize):
    """Drop-in for ``segnext.LogitsResize`` (the final bilinear resize of ``SegNeXt.forward``) running
    ``segnext_kernels.resize_bilinear``. No parameters or buffers, like the module it replaces (``state_dict``
    unchanged).

    Args:
        backend: "auto", "cpu" or "reference"; read at every forward.

    forward(logits, size, align_corners): (B, K, h, w) -> (B, K, *size), same dtype (NCHW contiguous on the "cpu"
    backend). Raises what ``segnext_kernels.resize_bilinear`` raises.
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        check_backend_name(backend)
        self.backend = backend

    def forward(self, logits: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
        return resize_bilinear(logits, size, align_corners, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _is_logits_resize(module: nn.Module) -> bool:
    return isinstance(module, LogitsResize) and not isinstance(module, FusedLogitsResize)


def fuse_resize(model: nn.Module, backend: str = "auto") -> int:
    """Swap every ``segnext.LogitsResize`` inside ``model`` (``SegNeXt.resize``, the final resize of the logits, and
    ``LightHamHead.resize``, the head's resize of its inputs) for a ``FusedLogitsResize``, in place. Neither has parameters or buffers: ``state_dict`` is unchanged.

    Returns:
        the number of modules swapped (0 when there are none, e.g. already fused).

    Raises:
        ValueError: unknown backend (nothing is swapped then).
        RuntimeError / TypeError: ``backend`` cannot run on the device (and dtype) of ``model``'s parameters, with
            the error the first forward would give (checked before anything is swapped).
    """
    check_backend_name(backend)
    if any(_is_logits_resize(m) for m in model.modules()):
        _check_runs_on_model("resize_bilinear", backend, model)
    return swap_modules(model, _is_logits_resize, lambda m: FusedLogitsResize(backend=backend))
