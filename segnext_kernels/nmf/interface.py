"""NMF2D's interface: argument checks, the custom ops (with their fakes and autograd) and the public ``nmf2d``.

Source of the math: the official ``NMF2D`` (``mmseg/models/decode_heads/ham_head.py`` of
Visual-Attention-Network/SegNeXt and mmsegmentation), Geng et al., "Is Attention Better Than Matrix
Decomposition?" (ICLR 2021); the eager oracle is ``nmf/reference.py``. Both fused backends ("cuda",
``nmf/cuda.py``; "triton", ``nmf/triton.py``) run the same orchestration (``nmf/driver.py``) over their own kernels
(``KERNELS`` of each), with the same saved tensors, so one fake and one autograd registration serve both.

Gradient modes (``grad_mode``):
  "unrolled" -- back-prop through the softmax init and every multiplicative step (official SegNeXt / mmseg).
  "one_step" -- the init and the K steps are constants; only the final coef update and the reconstruction are
      differentiated (Hamburger paper, Enjoy-Hamburger, JSeg). ``nmf2d`` detaches the initial bases when K >= 1,
      as the reference's ``torch.no_grad()`` does, and the returned final bases then.

Custom ops (namespace ``segnext_kernels``):

``torch.ops.segnext_kernels.nmf2d_fwd(x, bases0, steps, eps, inv_t, save, return_state, backend)
        -> (y, bases_K, coef_F, saved: Tensor[])``
    x (B, D, N) float16/bfloat16/float32/float64, any strides, B, D, N >= 1; bases0 (B, D, R) contiguous in the
    compute dtype (float32; float64 for float64 x); steps K >= 0; eps > 0; save: "none", "one_step" or "unrolled"
    (what a backward of that grad mode needs; "none" when no backward can follow). Returns y (B, D, N) in x's
    dtype, contiguous; with return_state bases_K (B, D, R) and coef_F (B, N, R) in the compute dtype, else two
    empty (0,) tensors; saved: the small per-step tensors of ``driver.nmf_forward`` in ``SAVED_KEYS[save]``
    order (empty for "none"); backend: "triton", "cuda" or "cpu" (forward only: save must be "none").
    Differentiable w.r.t. x and bases0 (triton, cuda).
``torch.ops.segnext_kernels.nmf2d_bwd(grad_y?, grad_bases?, grad_coef?, x, saved, grad_mode, steps, eps, inv_t,
        need_x, need_bases, backend) -> (g_x, g_bases0)``
    g_x (B, D, N) in x's dtype (contiguous) when need_x; g_bases0 (B, D, R) in the compute dtype when need_bases
    and (grad_mode == "unrolled" or steps == 0); otherwise empty (0,) tensors (custom ops cannot return None).
``torch.ops.segnext_kernels.nmf_rand_bases(generator_key, batch, D, R, device)``: the random bases draw of
    ``FusedNMF2D`` from a generator, traceable by torch.compile.

All have fake implementations, so ``torch.compile`` and FakeTensor tracing never enter the kernels. Saved for
backward: x and the per-step small tensors (no x-sized intermediate), only when grad mode is on and x or bases0
requires grad. Deterministic: every partial sum is reduced in a fixed order.
"""
from __future__ import annotations

import itertools
import math
import numbers
import weakref
from typing import Optional

import torch
from torch import Tensor

from .._custom_op import fresh_outputs
from ..backends import kernel_module, resolve
from .driver import nmf_backward, nmf_forward
from .reference import nmf2d_reference

__all__ = ["nmf2d", "GRAD_MODES", "SAVED_KEYS", "register_generator"]

GRAD_MODES = ("unrolled", "one_step")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------ argument checks
def _check_eps_inv_t(eps, inv_t) -> None:
    """eps and inv_t: real, finite; eps > 0 (shared by ``nmf2d`` and the ``FusedNMF2D`` constructor)."""
    for name, v in (("eps", eps), ("inv_t", inv_t)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number{' > 0' if name == 'eps' else ''}, got {v}")
    if eps <= 0:
        raise ValueError(f"eps: expected eps > 0 (it keeps the update denominators positive), got {eps}")


def _check_nmf_args(x, bases, steps, grad_mode, eps, inv_t, return_state) -> None:
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
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode: expected one of {GRAD_MODES}, got {grad_mode!r}")
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


# ------------------------------------------------------------------------------------------------------ custom ops
#: The keys of ``driver.nmf_forward``'s ``saved`` dict per save mode, in the order of the op's ``saved`` list.
SAVED_KEYS = {"none": (), "one_step": ("C", "G", "bases"), "unrolled": ("C", "E", "G", "H", "bases")}


def _rp(R: int) -> int:
    """The padded rank RP of both backends: R padded to max(16, next power of two)."""
    return max(16, 1 << (max(1, int(R)) - 1).bit_length())


def _kernels(backend: str):
    """The kernels object of a resolved backend name for ``nmf.driver`` (``KERNELS`` of ``nmf/<backend>.py``)."""
    return kernel_module("nmf2d", backend).KERNELS


# ------------------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("segnext_kernels::nmf2d_fwd", mutates_args=())
def nmf2d_fwd(x: Tensor, bases0: Tensor, steps: int, eps: float, inv_t: float, save: str,
                  return_state: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    if save not in SAVED_KEYS:
        raise ValueError(f"save: expected one of {tuple(SAVED_KEYS)}, got {save!r}")
    if backend == "cpu":  # forward-only kernels: nothing saved (nmf2d runs the reference when a gradient is needed)
        if save != "none":
            raise ValueError(f"save: the cpu NMF2D kernels are forward only, expected 'none', got {save!r}")
        y, bases_k, coef_f = kernel_module("nmf2d", "cpu").forward(x, bases0, steps, eps, inv_t, return_state)
        y, bases_k, coef_f = fresh_outputs([y, bases_k, coef_f], (x, bases0))
        return y, bases_k, coef_f, []
    y, bases_k, coef_f, saved = nmf_forward(_kernels(backend), x, bases0, steps, eps, inv_t,
                                            save=None if save == "none" else save)
    if return_state:  # bases_K / coef_F are slots of the saved histories: copy them out
        bases_k, coef_f = bases_k.clone(), coef_f.clone()
    else:
        bases_k, coef_f = bases0.new_empty((0,)), bases0.new_empty((0,))
    sv = [saved[k] for k in SAVED_KEYS[save]]
    sv = [t.clone() if t.storage_offset() else t for t in sv]  # one_step: the last slot of a history (small)
    y, bases_k, coef_f, *sv = fresh_outputs([y, bases_k, coef_f, *sv], (x, bases0))
    return y, bases_k, coef_f, sv


@nmf2d_fwd.register_fake
def _nmf2d_fwd_fake(x, bases0, steps, eps, inv_t, save, return_state, backend):
    B, D, N = x.shape
    R = bases0.shape[-1]
    K = int(steps)
    RP = _rp(R)
    acc = bases0.dtype
    new = lambda *s: x.new_empty(s, dtype=acc)  # noqa: E731
    y = x.new_empty((B, D, N))
    bk, cf = (new(B, D, R), new(B, N, R)) if return_state else (new(0), new(0))
    if save == "unrolled":
        sv = [new(K + 2, B, N, R), new(K, B, D, R), new(K + 1, B, RP, RP), new(K, B, RP, RP), new(K + 1, B, D, R)]
    elif save == "one_step":
        sv = [new(2, B, N, R), new(1, B, RP, RP), new(1, B, D, R)]
    else:
        sv = []
    return y, bk, cf, sv


# ------------------------------------------------------------------------------------------------------ backward
@torch.library.custom_op("segnext_kernels::nmf2d_bwd", mutates_args=())
def nmf2d_bwd(grad_y: Optional[Tensor], grad_bases: Optional[Tensor], grad_coef: Optional[Tensor], x: Tensor,
                   saved: list[Tensor], grad_mode: str, steps: int, eps: float, inv_t: float, need_x: bool,
                   need_bases: bool, backend: str) -> tuple[Tensor, Tensor]:
    if grad_mode not in ("unrolled", "one_step"):
        raise ValueError(f"grad_mode: expected 'unrolled' or 'one_step', got {grad_mode!r}")
    sd = dict(zip(SAVED_KEYS[grad_mode], saved))
    gx, gb = nmf_backward(_kernels(backend), grad_y, grad_bases, grad_coef, x, sd, grad_mode, steps, eps, inv_t,
                          need_x, need_bases)
    acc = saved[0].dtype
    gx = gx.contiguous() if (need_x and gx is not None) else x.new_empty((0,))
    gb = gb.contiguous() if gb is not None else x.new_empty((0,), dtype=acc)
    return tuple(fresh_outputs([gx, gb], (grad_y, grad_bases, grad_coef, x, *saved)))


@nmf2d_bwd.register_fake
def _nmf2d_bwd_fake(grad_y, grad_bases, grad_coef, x, saved, grad_mode, steps, eps, inv_t, need_x,
                         need_bases, backend):
    B, D, N = x.shape
    acc = saved[0].dtype
    R = saved[-1].shape[-1]  # "bases" history (.., B, D, R)
    gx = x.new_empty((B, D, N)) if need_x else x.new_empty((0,))
    want_b = need_bases and (grad_mode == "unrolled" or int(steps) == 0)
    gb = x.new_empty((B, D, R), dtype=acc) if want_b else x.new_empty((0,), dtype=acc)
    return gx, gb


# ------------------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    x, bases0, steps, eps, inv_t, save, return_state, backend = inputs
    y, bases_k, coef_f, saved = output
    ctx.set_materialize_grads(False)
    ctx.steps, ctx.eps, ctx.inv_t, ctx.save_mode, ctx.return_state = steps, eps, inv_t, save, return_state
    ctx.backend = backend
    ctx.save_for_backward(x, *saved)


def _backward(ctx, grad_y, grad_bases, grad_coef, *grad_saved):
    need_x, need_b = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    none = (None,) * 6
    if not ctx.return_state:
        grad_bases = grad_coef = None
    if not (need_x or need_b) or (grad_y is None and grad_bases is None and grad_coef is None):
        return (None, None) + none
    if ctx.save_mode == "none":
        raise RuntimeError("segnext_kernels::nmf2d_fwd: backward through a forward run with save='none'")
    x, *saved = ctx.saved_tensors
    mode = ctx.save_mode
    gx, gb = torch.ops.segnext_kernels.nmf2d_bwd(grad_y, grad_bases, grad_coef, x, saved, mode, ctx.steps,
                                                      ctx.eps, ctx.inv_t, need_x, need_b, ctx.backend)
    want_b = need_b and (mode == "unrolled" or ctx.steps == 0)
    return (gx if need_x else None, gb if want_b else None) + none


nmf2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def _nmf2d_fused(x: Tensor, bases0: Tensor, steps: int, eps: float, inv_t: float, grad_mode: str,
                return_state: bool, backend: str = "triton"):
    """Run ``segnext_kernels::nmf2d_fwd`` for ``segnext_kernels.nmf2d`` (arguments validated, x non-empty,
    bases0 contiguous in the compute dtype and already detached for "one_step" with steps >= 1; backend resolved:
    "triton" or "cuda").

    Returns y, or (y, bases_K, coef_F) with return_state (bases_K detached in "one_step" mode with steps >= 1)."""
    need = torch.is_grad_enabled() and (x.requires_grad or bases0.requires_grad)
    y, bases_k, coef_f, _ = torch.ops.segnext_kernels.nmf2d_fwd(
        x, bases0, int(steps), float(eps), float(inv_t), grad_mode if need else "none", bool(return_state),
        backend)
    if not return_state:
        return y
    if grad_mode == "one_step" and steps > 0:
        bases_k = bases_k.detach()
    return y, bases_k, coef_f


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


def register_generator(gen: torch.Generator) -> int:
    """Register ``gen`` for ``nmf_rand_bases`` and return its key (held weakly: a dead generator drops out)."""
    key = next(_GENERATOR_KEYS)
    _GENERATORS[key] = gen
    return key


# ------------------------------------------------------------------------------------------------ public function
def nmf2d(x: torch.Tensor, bases: torch.Tensor, steps: int, *, grad_mode: str = "unrolled", eps: float = 1e-6,
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
        grad_mode: "unrolled" (back-prop through every step; official SegNeXt / mmseg) or "one_step" (only the final
            coef update and the reconstruction are differentiated; Hamburger paper, Enjoy-Hamburger, JSeg: the
            initial bases then get no gradient unless steps == 0). Forward values are identical.
        eps: the ``+ eps`` of both denominators, finite and > 0 (it keeps all-zero rows/columns of x finite), and
            at least the smallest normal number of the compute dtype (float32: 1.18e-38), which a smaller eps
            would round or flush to 0.
        inv_t: softmax inverse temperature of the init (official NMF2D forces 1); finite in the compute dtype.
        return_state: also return the final bases (B, D, R) and coef (B, N, R), in the compute dtype.
        backend: "auto" (Triton on CUDA tensors, "cpu" on CPU tensors; see ``segnext_kernels.backends``), "cuda"
            (CUDA extension; float16/bfloat16/float32), "triton", "cpu" (C++ CPU kernels, ``nmf/cpu.py``;
            float32/bfloat16/float16, forward only: with a gradient needed the reference runs), "reference". With
            TRITON_INTERPRET=1 "triton" runs on CPU tensors. "cuda", "triton" and "cpu" run the custom op
            ``torch.ops.segnext_kernels.nmf2d_fwd`` (below): opaque to ``torch.compile`` (fake
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
    _check_nmf_args(x, bases, steps, grad_mode, eps, inv_t, return_state)
    name = "reference" if torch.compiler.is_exporting() else resolve("nmf2d", backend, x.device, x.dtype)
    steps, eps, inv_t = int(steps), float(eps), float(inv_t)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or bases.requires_grad)
    if name == "reference" or x.numel() == 0 or (name == "cpu" and need_grad):
        # the cpu kernels are forward only: with a gradient needed the reference runs (eager autograd)
        # empty inputs (B, D or N = 0) have nothing to fuse: the eager reference handles them (and their grads)
        return nmf2d_reference(x, bases, steps, eps=eps, inv_t=inv_t, grad_mode=grad_mode,
                               return_state=return_state)
    cdtype = torch.promote_types(x.dtype, torch.float32)
    bases0 = bases.to(cdtype).contiguous()
    if grad_mode == "one_step" and steps > 0:
        bases0 = bases0.detach()  # the steps run under no_grad in this mode: B_K is a constant
    return _nmf2d_fused(x, bases0, steps, eps, inv_t, grad_mode, return_state, name)
