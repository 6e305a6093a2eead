"""MSCA's interface: argument checks, the custom ops (with their fakes and autograd) and the public ``msca``.

Custom ops (namespace ``segnext_kernels``; the package's one op layer: the compiled extensions export plain
functions that run inside these ops):

``torch.ops.segnext_kernels.msca_fwd(u, w0, b0, ws, bs, w3, b3, backend) -> Tensor``
    u (B, C, H, W) float16/bfloat16/float32/float64 (what the backend takes: ``backends.supports``), any strides;
    packed weights as ``msca.reference.pack_weights`` (w0 (C, 25), b0 (C,), ws (C, 78), bs (C, 6), w3 (C, C),
    b3 (C,), float32, or float64 for float64 u, contiguous); backend: a resolved fused backend ("cpu", "cuda",
    "triton"), whose module (``msca/<backend>.py``) provides ``forward`` / ``backward``. Returns out (B, C, H, W) in
    u's dtype with the memory format of ``torch.empty_like(u)``. Differentiable w.r.t. u and the six packed weights.
``torch.ops.segnext_kernels.msca_bwd(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad, backend)``
    needs_input_grad: 7 bools for (u, w0, b0, ws, bs, w3, b3). Returns 7 tensors (du, dw0, db0, dws, dbs, dw3, db3):
    du like ``empty_like(u)``, the rest contiguous in the packed weights' dtype; an entry whose flag is False is an
    empty (0,) tensor (custom ops cannot return None). Deterministic: fixed-order reductions, no atomics.

Both have fake (meta) implementations, so ``torch.compile`` (fullgraph), FakeTensor tracing and
``torch.library.opcheck`` treat them as opaque calls and never trace into the kernels.

Autograd: ``msca`` packs the nn.Conv2d weights with ordinary (differentiable) torch ops and calls ``msca_fwd``;
autograd of the packing (reshape / cat / stack / dtype cast) unpacks the packed gradients back to the nn.Conv2d
shapes and dtypes. Saved for backward: u and the packed weights only (the backward kernels recompute the
intermediates from u), and only when grad mode is on and an input requires grad. The backward computes only the
gradients ``ctx.needs_input_grad`` asks for.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._custom_op import fresh_outputs
from .._direct import eager_direct_ok
from ..backends import kernel_module, resolve
from .reference import msca_reference, pack_weights, strip_weight_shapes

__all__ = ["msca", "check_msca_args", "param_dtype"]

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor types the eager direct path takes as weights


# ------------------------------------------------------------------------------------------------ argument checks
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _check_like(name: str, t, shape: tuple, u: torch.Tensor) -> None:
    _tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != u.dtype:
        raise TypeError(f"{name}: expected dtype {u.dtype} (the dtype of u), got {t.dtype}")
    if t.device != u.device:
        raise RuntimeError(f"{name}: expected a tensor on {u.device} (the device of u), got one on {t.device}")


_WEIGHT_SHAPES: dict = {}


def _weight_specs(C: int) -> list:
    """(name, expected shape) of the 16 weights for C channels: conv0 weight, bias, the 6 strip weights, the 6 strip
    biases, conv3 weight, bias (kept per C)."""
    specs = _WEIGHT_SHAPES.get(C) if type(C) is int else None  # a symbolic C (a dynamic-shape trace): no cache
    if specs is None:
        strips = strip_weight_shapes(C)
        specs = ([("conv0_weight", (C, 1, 5, 5)), ("conv0_bias", (C,))]
                 + [(f"strip_weights[{i}]", sh) for i, sh in enumerate(strips)]
                 + [(f"strip_biases[{i}]", (C,)) for i in range(6)]
                 + [("conv3_weight", (C, C, 1, 1)), ("conv3_bias", (C,))])
        if type(C) is int:
            _WEIGHT_SHAPES[C] = specs
    return specs


def check_msca_args(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias) -> None:
    """Validate ``segnext_kernels.msca`` arguments.

    Raises:
        TypeError: a non-tensor, a non-floating or unsupported dtype, or a dtype different from u's.
        ValueError: wrong rank or shape (the message gives the expected shape), C, H or W < 1, wrong number of strip
            tensors.
        RuntimeError: a tensor on another device than u.
    """
    _tensor("u", u)
    if u.dim() != 4:
        raise ValueError(f"u: expected a 4-D tensor (B, C, H, W), got {u.dim()}-D with shape {tuple(u.shape)}")
    if u.dtype not in FLOAT_DTYPES:
        raise TypeError(f"u: expected dtype float16, bfloat16, float32 or float64, got {u.dtype}")
    C = u.shape[1]
    if C < 1:
        raise ValueError(f"u: expected at least one channel (C >= 1), got shape {tuple(u.shape)}")
    if u.shape[2] < 1 or u.shape[3] < 1:
        raise ValueError(f"u: expected H, W >= 1 (an empty image has nothing to convolve; B = 0 is fine), got shape "
                         f"{tuple(u.shape)}")
    dt, dev = u.dtype, u.device
    specs = _weight_specs(C)

    def check(i, t):  # one quick test per tensor; the messages come from _check_like
        if not (isinstance(t, torch.Tensor) and t.shape == specs[i][1] and t.dtype == dt and t.device == dev):
            _check_like(specs[i][0], t, specs[i][1], u)

    check(0, conv0_weight)
    check(1, conv0_bias)
    for name, seq in (("strip_weights", strip_weights), ("strip_biases", strip_biases)):
        if not isinstance(seq, (list, tuple)) or len(seq) != 6:
            got = f"{type(seq).__name__} of length {len(seq)}" if isinstance(seq, (list, tuple)) else type(seq).__name__
            raise ValueError(f"{name}: expected a list of 6 tensors (conv0_1, conv0_2, conv1_1, conv1_2, conv2_1, "
                             f"conv2_2), got {got}")
    for i in range(6):  # the original order: strip weight i, then strip bias i
        check(2 + i, strip_weights[i])
        check(8 + i, strip_biases[i])
    check(14, conv3_weight)
    check(15, conv3_bias)


# ------------------------------------------------------------------------------------------------------ custom ops
def param_dtype(u: Tensor) -> torch.dtype:
    """The dtype of the packed weights (and of the weight gradients) for input ``u``."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("segnext_kernels::msca_fwd", mutates_args=())
def msca_fwd(u: Tensor, w0: Tensor, b0: Tensor, ws: Tensor, bs: Tensor, w3: Tensor, b3: Tensor,
                 backend: str) -> Tensor:
    return kernel_module("msca", backend).forward(u, w0, b0, ws, bs, w3, b3)


@msca_fwd.register_fake
def _msca_fwd_fake(u, w0, b0, ws, bs, w3, b3, backend):
    return torch.empty_like(u)


# ------------------------------------------------------------------------------------------------------ backward
@torch.library.custom_op("segnext_kernels::msca_bwd", mutates_args=())
def msca_bwd(grad_out: Tensor, u: Tensor, w0: Tensor, b0: Tensor, ws: Tensor, bs: Tensor, w3: Tensor,
                  b3: Tensor, needs_input_grad: Sequence[bool], backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = tuple(bool(n) for n in needs_input_grad)
    if len(needs) != 7:
        raise ValueError(f"needs_input_grad: expected 7 bools, got {len(needs)}")
    grads = kernel_module("msca", backend).backward(grad_out, u, w0, b0, ws, bs, w3, b3, needs)
    like = (u, w0, b0, ws, bs, w3, b3)
    outs = [(g if g.is_contiguous() or i == 0 else g.contiguous()) if (n and g is not None) else t.new_empty((0,))
            for i, (g, n, t) in enumerate(zip(grads, needs, like))]
    return tuple(fresh_outputs(outs, (grad_out,) + like))


@msca_bwd.register_fake
def _msca_bwd_fake(grad_out, u, w0, b0, ws, bs, w3, b3, needs_input_grad, backend):
    needs = [bool(n) for n in needs_input_grad]
    du = torch.empty_like(u) if needs[0] else u.new_empty((0,))
    rest = [torch.empty_like(t, memory_format=torch.contiguous_format) if n else t.new_empty((0,))
            for t, n in zip((w0, b0, ws, bs, w3, b3), needs[1:])]
    return (du, *rest)


# ------------------------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    u, w0, b0, ws, bs, w3, b3, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(u, w0, b0, ws, bs, w3, b3)


def _backward(ctx, grad_out):
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:7])  # (u, w0, b0, ws, bs, w3, b3, backend)
    if not any(needs):
        return (None,) * 8
    grads = torch.ops.segnext_kernels.msca_bwd(grad_out, *ctx.saved_tensors, list(needs), ctx.backend)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,)


msca_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ public function
def msca(
    u: torch.Tensor,
    conv0_weight: torch.Tensor,
    conv0_bias: torch.Tensor,
    strip_weights: Sequence[torch.Tensor],
    strip_biases: Sequence[torch.Tensor],
    conv3_weight: torch.Tensor,
    conv3_bias: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused MSCA (multi-scale convolutional attention, SegNeXt paper section 3.1, eq. 1-2; the official
    ``AttentionModule`` in ``mmseg/models/backbones/mscan.py``)::

        a = dw5x5(u); s = a + sum_{k in 7, 11, 21} dw_kx1(dw_1xk(a)); out = conv3(s) * u

    Args:
        u: (B, C, H, W) float16, bfloat16, float32 or float64; NCHW, channels_last or any other strides.
            B >= 0, C >= 1, H, W >= 1 (images smaller than the 21-tap strip are fine).
        conv0_weight: (C, 1, 5, 5); conv0_bias: (C,).
        strip_weights: 6 tensors, the official order conv0_1 (C, 1, 1, 7), conv0_2 (C, 1, 7, 1), conv1_1 (C, 1, 1, 11),
            conv1_2 (C, 1, 11, 1), conv2_1 (C, 1, 1, 21), conv2_2 (C, 1, 21, 1); strip_biases: 6 tensors (C,).
        conv3_weight: (C, C, 1, 1); conv3_bias: (C,). All weights in u's dtype and on u's device.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (``segnext_kernels.backends`` decides and says why
            one cannot run). The fused backends run the custom op ``torch.ops.segnext_kernels.msca_fwd`` (below):
            opaque to ``torch.compile`` (fake implementations registered), autograd via
            ``torch.library.register_autograd``. "reference" runs eager PyTorch ops (``msca.reference``).

    Under ``torch.export`` / ``torch.onnx.export(..., dynamo=True)`` the op is recorded as the reference's ops
    (portable; runtimes such as ONNX Runtime run them).

    Under ``torch.autocast`` (fp32/fp16/bf16 inputs) u and the weights are cast to the autocast dtype first, as eager
    PyTorch casts them for each convolution of the module; the result is in that dtype.

    Returns:
        (B, C, H, W) in u's dtype, differentiable with respect to u and every weight. Fused kernels accumulate in
        fp32 (fp64 for fp64 inputs); half-precision results therefore differ from eager PyTorch, which rounds every
        intermediate to half, by up to a few half-precision ulps.

    Raises:
        TypeError: non-tensor argument, unsupported dtype, or a weight dtype different from u's.
        ValueError: wrong rank or weight shape (the message names the expected shape), unknown backend.
        RuntimeError: a tensor on another device than u, or a requested backend that cannot run here.
        TypeError: also a requested backend that does not take u's dtype (e.g. "cuda" with float64).
    """
    if (isinstance(u, torch.Tensor) and u.dtype in _AUTOCAST_DTYPES and torch.amp.is_autocast_available(u.device.type)
            and torch.is_autocast_enabled(u.device.type)):
        # autocast: the convs run in the autocast dtype, as eager's conv2d does; eager's final gating `att * u`
        # then type-promotes with the uncast u, so the result has dtype promote(autocast dtype, u.dtype)
        dt = torch.get_autocast_dtype(u.device.type)
        cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) else t  # noqa: E731
        seq = lambda ts: [cast(t) for t in ts] if isinstance(ts, (list, tuple)) else ts  # noqa: E731
        with torch.autocast(u.device.type, enabled=False):
            out = msca(cast(u), cast(conv0_weight), cast(conv0_bias), seq(strip_weights), seq(strip_biases),
                       cast(conv3_weight), cast(conv3_bias), backend=backend)
        return out.to(torch.promote_types(dt, u.dtype))
    check_msca_args(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias)
    # torch.export / torch.onnx.export(dynamo=True) record the reference's aten ops, which every exporter and
    # runtime knows (the fused kernels are this process's, not the exported program's)
    name = "reference" if torch.compiler.is_exporting() else resolve("msca", backend, u.device, u.dtype)
    if name == "reference":
        return msca_reference(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias)
    if eager_direct_ok(u) and all(type(t) in _PLAIN for t in (conv0_weight, conv0_bias, conv3_weight, conv3_bias,
                                                               *strip_weights, *strip_biases)):
        direct = getattr(kernel_module("msca", name), "direct", None)  # plain eager code: no custom op needed
        if direct is not None:
            return direct(u, conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias)
    packed = pack_weights(conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias,
                          param_dtype(u))
    return torch.ops.segnext_kernels.msca_fwd(u, *packed, name)
