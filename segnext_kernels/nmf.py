"""Fused NMF2D (SegNeXt's Hamburger "ham"): the public op ``nmf2d``, the drop-in module ``FusedNMF2D`` and the
model rewriters ``fuse_ham`` / ``fuse``.

Source of the math: the official ``NMF2D`` (``mmseg/models/decode_heads/ham_head.py`` of
Visual-Attention-Network/SegNeXt and mmsegmentation), Geng et al., "Is Attention Better Than Matrix
Decomposition?" (ICLR 2021); the project's eager oracle is ``segnext.ham_head.nmf2d_reference``
(spec ``reference_model.md`` section 2.4). Kernel design: ``segnext_kernels/nmf_triton.py``.

Backends: "cuda" (hand-written CUDA kernels, ``nmf_cuda``) and "triton" (``nmf_triton``), both driven by
``nmf_driver`` behind the custom ops of ``nmf_autograd``; "reference" (eager ``nmf2d_reference``); "auto" (decided by
``backend.resolve_backend``, the one place that decides: the reference on CPU tensors, on CUDA tensors Triton -- and
the CUDA kernels first once they have passed the GPU tests, ``backend.AUTO_PREFERS_CUDA``).
"""
from __future__ import annotations

import itertools
import math
import numbers
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from segnext.ham_head import NMF2D, nmf2d_reference

from .backend import BACKENDS, _warn_once, resolve_backend, triton_status
from .nmf_autograd import nmf2d_fused

__all__ = ["nmf2d", "FusedNMF2D", "fuse_ham", "fuse", "resolve_nmf_backend"]

GRAD_MODES = ("unrolled", "one_step")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_nmf_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs NMF2D on ``device`` for inputs of ``dtype``: "cuda", "triton" or "reference"
    (``backend.resolve_backend`` decides; float64 inputs, which the CUDA kernels do not take, make "auto" use Triton).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``backend="cuda"`` or ``"triton"`` where it cannot run (the message says why and how to fix it).
        TypeError: ``backend="cuda"`` with float64 inputs.
    """
    name = resolve_backend(backend, device)
    if name == "cuda" and dtype == torch.float64:
        if backend == "cuda":
            raise TypeError("x: the cuda NMF2D backend supports float32, float16 and bfloat16, got torch.float64; "
                            "use backend='triton' or 'reference' for it")
        ok, why = triton_status(device)
        if ok:
            return "triton"
        _warn_once(f"segnext_kernels: NMF2D backend 'auto' falls back to the eager reference for float64 ({why})")
        return "reference"
    return name


def _check_eps_inv_t(eps, inv_t) -> None:
    """eps and inv_t: real, finite; eps > 0 (shared by ``nmf2d`` and the ``FusedNMF2D`` constructor)."""
    for name, v in (("eps", eps), ("inv_t", inv_t)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number{' > 0' if name == 'eps' else ''}, got {v}")
    if eps <= 0:
        raise ValueError(f"eps: expected eps > 0 (it keeps the update denominators positive), got {eps}")


def _check_nmf_args(x, bases, steps, grad, eps, inv_t, return_state) -> None:
    for name, t in (("x", x), ("bases", bases)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x: expected a 3-D tensor (B, D, N), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if bases.dim() != 3 or bases.shape[:2] != x.shape[:2] or bases.shape[2] < 1:
        got = f"shape {tuple(bases.shape)}" if bases.dim() == 3 else \
            f"a {bases.dim()}-D tensor of shape {tuple(bases.shape)}"
        raise ValueError(f"bases: expected a 3-D tensor of shape ({x.shape[0]}, {x.shape[1]}, R) with R >= 1 "
                         f"(B and D of x {tuple(x.shape)}), got {got}")
    cdtype = torch.promote_types(x.dtype, torch.float32)
    if bases.dtype not in (x.dtype, cdtype):
        allowed = x.dtype if x.dtype == cdtype else f"{x.dtype} or {cdtype}"
        raise TypeError(f"bases: expected dtype {allowed} (x's dtype or the compute dtype), got {bases.dtype}")
    if bases.device != x.device:
        raise RuntimeError(f"bases: expected a tensor on {x.device} (the device of x), got one on {bases.device}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps: expected steps >= 0, got {steps}")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad: expected one of {GRAD_MODES}, got {grad!r}")
    _check_eps_inv_t(eps, inv_t)
    # the updates run in cdtype: an eps that is not a normal number there rounds (or flushes) to 0 and an
    # all-zero row/column of x then gives 0/0 = NaN; an |inv_t| beyond its range makes the softmax init NaN
    fi = torch.finfo(cdtype)
    if eps < fi.tiny:
        raise ValueError(f"eps: expected eps >= {fi.tiny:.6g} (the smallest normal {cdtype}, the compute dtype; a "
                         f"smaller eps rounds to 0 there and all-zero rows/columns of x give NaN), got {eps}")
    if abs(inv_t) > fi.max:
        raise ValueError(f"inv_t: expected |inv_t| <= {fi.max:.6g} (finite in {cdtype}, the compute dtype), "
                         f"got {inv_t}")
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state: expected a bool, got {type(return_state).__name__}")


def nmf2d(x: torch.Tensor, bases: torch.Tensor, steps: int, *, grad: str = "unrolled", eps: float = 1e-6,
          inv_t: float = 1.0, return_state: bool = False, backend: str = "auto"):
    """Fused NMF2D: non-negative matrix factorisation of a batch of (D, N) matrices by multiplicative updates,
    exactly as the official ``NMF2D`` (and ``segnext.ham_head.nmf2d_reference``)::

        coef = softmax(inv_t * x^T bases) over R
        steps times: coef  <- coef  * (x^T bases) / (coef (bases^T bases) + eps)
                     bases <- bases * (x coef)    / (bases (coef^T coef) + eps)
        coef <- coef * (x^T bases) / (coef (bases^T bases) + eps)
        return bases @ coef^T

    Args:
        x: (B, D, N) non-negative, float16, bfloat16, float32 or float64, any strides. Not checked for
            non-negativity (that would cost a pass over x); negative entries can make a denominator vanish.
        bases: (B, D, R) initial bases, non-negative and already normalised by the caller (NMF2D: L2 over D),
            R >= 1; dtype x's or the compute dtype (float32; float64 for float64 x), on x's device.
        steps: number of iterations K >= 0 (official: 6 in training, 7 in eval).
        grad: "unrolled" (back-prop through every step; official SegNeXt / mmseg) or "one_step" (only the final
            coef update and the reconstruction are differentiated; Hamburger paper, Enjoy-Hamburger, JSeg: the
            initial bases then get no gradient unless steps == 0). Forward values are identical.
        eps: the ``+ eps`` of both denominators, finite and > 0 (it keeps all-zero rows/columns of x finite), and
            at least the smallest normal number of the compute dtype (float32: 1.18e-38), which a smaller eps
            would round or flush to 0.
        inv_t: softmax inverse temperature of the init (official NMF2D forces 1); finite in the compute dtype.
        return_state: also return the final bases (B, D, R) and coef (B, N, R), in the compute dtype.
        backend: "auto" (Triton on CUDA tensors, eager reference on CPU tensors; see ``resolve_nmf_backend``),
            "cuda" (CUDA extension; float16/bfloat16/float32), "triton", "reference". With TRITON_INTERPRET=1
            "triton" runs on CPU tensors. "cuda" and "triton" run the custom op
            ``torch.ops.segnext_kernels.nmf2d_forward`` (``nmf_autograd``): opaque to ``torch.compile`` (fake
            implementations registered), autograd via ``torch.library.register_autograd``; "reference" runs eager
            PyTorch ops.

    Returns:
        the reconstruction (B, D, N) in x's dtype (contiguous), or ``(recon, bases, coef)`` with return_state.
        The updates always run in float32 (float64 for float64 inputs), whatever x's dtype; the Triton backend is
        bitwise deterministic.

    Raises:
        TypeError: a non-tensor x/bases, non-floating or unsupported dtype, a bases dtype other than x's or the
            compute dtype, non-int steps, non-real eps/inv_t, non-bool return_state.
        ValueError: wrong rank, B or D of bases not matching x, R < 1 (the message gives the expected shape),
            steps < 0, eps <= 0, non-finite or below the compute dtype's smallest normal number, inv_t not finite in
            the compute dtype, unknown grad mode or backend.
        RuntimeError: bases on another device than x; backend "cuda" or "triton" where it cannot run (no GPU, no
            Triton, the extension not built and not buildable: the message says which and how to fix it).
    """
    _check_nmf_args(x, bases, steps, grad, eps, inv_t, return_state)
    name = resolve_nmf_backend(backend, x.device, x.dtype)
    steps, eps, inv_t = int(steps), float(eps), float(inv_t)
    if name == "reference" or x.numel() == 0:
        # empty inputs (B, D or N = 0) have nothing to fuse: the eager reference handles them (and their grads)
        return nmf2d_reference(x, bases, steps, eps=eps, inv_t=inv_t, grad=grad, return_state=return_state)
    cdtype = torch.promote_types(x.dtype, torch.float32)
    bases0 = bases.to(cdtype).contiguous()
    if grad == "one_step" and steps > 0:
        bases0 = bases0.detach()  # the steps run under no_grad in this mode: B_K is a constant
    return nmf2d_fused(x, bases0, steps, eps, inv_t, grad, return_state, name)


# ------------------------------------------------------------------------------------------------------ modules
#: The generators of FusedNMF2D modules, by key. torch.compile cannot trace ``torch.rand(..., generator=g)`` (dynamo
#: has no variable type for a torch.Generator: "Failed to convert args/kwargs to proxy", a graph break), so a
#: FusedNMF2D with a generator draws its bases in the custom op below, which looks the generator up by an int key:
#: a compiled graph holds only the key (a constant) and the opaque op, and the draw stays bit-identical to eager.
_GENERATORS: "weakref.WeakValueDictionary[int, torch.Generator]" = weakref.WeakValueDictionary()
_GENERATOR_KEYS = itertools.count()


@torch.library.custom_op("segnext_kernels::nmf_rand_bases", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _nmf_rand_bases(generator_key: int, batch: int, D: int, R: int, device: torch.device) -> torch.Tensor:
    """``torch.rand((batch, D, R), generator=g, dtype=float32, device=g.device).to(device)`` for the generator g
    registered under ``generator_key``: exactly the draw of ``NMF2D._build_bases`` before its normalisation."""
    gen = _GENERATORS.get(generator_key)
    if gen is None:
        raise RuntimeError(f"segnext_kernels::nmf_rand_bases: no live generator has key {generator_key}")
    return torch.rand((batch, D, R), generator=gen, dtype=torch.float32, device=gen.device).to(device)


@_nmf_rand_bases.register_fake
def _nmf_rand_bases_fake(generator_key, batch, D, R, device):
    return torch.empty((batch, D, R), dtype=torch.float32, device=device)


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
        _check_module_backend(backend)
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
            self._generator_key = next(_GENERATOR_KEYS)
            _GENERATORS[self._generator_key] = gen

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
        return nmf2d(x, bases, steps, grad=self.grad_mode, eps=self.eps, inv_t=self.inv_t, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


def _check_module_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _is_nmf(module: nn.Module) -> bool:
    return (type(module).__name__ == "NMF2D" and all(hasattr(module, a) for a in ("S", "R", "train_steps",
                                                                                    "eval_steps"))
            and getattr(module, "rand_init", True) and getattr(module, "spatial", True))


def fuse_ham(model: nn.Module, backend: str = "auto") -> int:
    """Swap every ``NMF2D`` inside ``model`` (``segnext.NMF2D``, or an official / mmseg one with random init) for a
    ``FusedNMF2D`` with the same options, in place. NMF2D has no parameters or buffers: ``state_dict`` is unchanged.

    Returns:
        the number of modules swapped (0 when there are none, e.g. already fused, or ``model`` is itself an NMF2D:
        use ``FusedNMF2D.from_module``).

    Raises:
        ValueError: unknown backend (nothing is swapped then). Availability is checked at the first forward, on the
            input's device (as for ``fuse_msca``).
    """
    _check_module_backend(backend)
    from .modules import swap_modules

    return swap_modules(model, _is_nmf, lambda m: FusedNMF2D.from_module(m, backend=backend))


def fuse(model: nn.Module, backend: str = "auto") -> dict:
    """Apply every fusion of this package to ``model`` in place: ``fuse_msca`` (MSCA attention) and ``fuse_ham``
    (NMF2D), both with ``backend``. ``state_dict`` is unchanged.

    Returns:
        ``{"msca": n_msca_swapped, "ham": n_nmf_swapped}``.

    Raises:
        ValueError: unknown backend.
    """
    from .modules import fuse_msca

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return {"msca": fuse_msca(model, backend=backend), "ham": fuse_ham(model, backend=backend)}
