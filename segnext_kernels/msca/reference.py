"""Pure-PyTorch MSCA: the oracle, the CPU fallback and the benchmark baseline of every fused MSCA kernel.

MSCA is the multi-scale convolutional attention of SegNeXt (paper section 3.1, eq. 1-2; official
``mmseg/models/backbones/mscan.py``, ``AttentionModule``)::

    a   = dw5x5(u)                                  conv0    (C, 1, 5, 5)
    b_k = dw_kx1(dw_1xk(a))   for k = 7, 11, 21     conv{0,1,2}_1 (1xk) then conv{0,1,2}_2 (kx1)
    s   = a + b_7 + b_11 + b_21
    out = conv3(s) * u                              1x1 channel mix, gated by the input (no sigmoid)

Every convolution is depthwise except conv3, all have a bias and zero "same" padding.

This file also holds the packed weight layout shared by the Triton and CUDA kernels (``pack_weights``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from segnext.depthwise import depthwise_conv2d

#: The strip kernel sizes, in the official branch order.
STRIP_SIZES = (7, 11, 21)
#: Offsets of the six strip convs inside the packed (C, 78) strip-weight tensor, official order
#: conv0_1 (1x7), conv0_2 (7x1), conv1_1 (1x11), conv1_2 (11x1), conv2_1 (1x21), conv2_2 (21x1).
STRIP_OFFSETS = (0, 7, 14, 25, 36, 57)
STRIP_TAPS = 78


def strip_weight_shapes(channels: int) -> list[tuple[int, int, int, int]]:
    """The nn.Conv2d weight shapes of the six strip convs, official order, for ``channels`` channels."""
    shapes = []
    for k in STRIP_SIZES:
        shapes.append((channels, 1, 1, k))
        shapes.append((channels, 1, k, 1))
    return shapes


def msca_reference(
    u: torch.Tensor,
    conv0_weight: torch.Tensor,
    conv0_bias: torch.Tensor,
    strip_weights: Sequence[torch.Tensor],
    strip_biases: Sequence[torch.Tensor],
    conv3_weight: torch.Tensor,
    conv3_bias: torch.Tensor,
) -> torch.Tensor:
    """MSCA forward in eager PyTorch, op for op as the official ``AttentionModule.forward``.

    Args:
        u: input (B, C, H, W), any floating dtype and memory format.
        conv0_weight: (C, 1, 5, 5); conv0_bias: (C,).
        strip_weights: six tensors (C, 1, 1, 7), (C, 1, 7, 1), (C, 1, 1, 11), (C, 1, 11, 1), (C, 1, 1, 21),
            (C, 1, 21, 1) (conv0_1, conv0_2, conv1_1, conv1_2, conv2_1, conv2_2); strip_biases: six (C,).
        conv3_weight: (C, C, 1, 1); conv3_bias: (C,).

    Returns:
        (B, C, H, W) in u's dtype. Differentiable by autograd with respect to every argument.

    float16 on CPU: the depthwise convs run in float32 and round once to float16 (``segnext.depthwise``; oneDNN's
    float16 CPU depthwise path hangs on AVX512-FP16 CPUs), the 1x1 mix in float16 as eager.

    No input checks: callers go through ``segnext_kernels.msca``, which validates.
    """
    C = u.shape[1]
    a = depthwise_conv2d(u, conv0_weight, conv0_bias, padding=2, groups=C)
    s = a
    for i, k in enumerate(STRIP_SIZES):
        p = k // 2
        h = depthwise_conv2d(a, strip_weights[2 * i], strip_biases[2 * i], padding=(0, p), groups=C)
        v = depthwise_conv2d(h, strip_weights[2 * i + 1], strip_biases[2 * i + 1], padding=(p, 0), groups=C)
        s = s + v
    att = F.conv2d(s, conv3_weight, conv3_bias)
    return att * u


def pack_weights(conv0_weight, conv0_bias, strip_weights, strip_biases, conv3_weight, conv3_bias, dtype):
    """Pack MSCA weights into the flat layout the kernels read.

    Returns ``(w0 (C, 25), b0 (C,), ws (C, 78), bs (C, 6), w3 (C, C), b3 (C,))``, all contiguous in ``dtype``
    (float32 for fp32/fp16/bf16 inputs, float64 for float64). ``ws`` holds the six strip kernels per channel in
    official order at ``STRIP_OFFSETS``; ``w0`` is the 5x5 kernel row-major (tap ky * 5 + kx).
    """
    C = conv0_weight.shape[0]
    w0 = conv0_weight.reshape(C, 25).to(dtype).contiguous()
    ws = torch.cat([w.reshape(C, -1) for w in strip_weights], dim=1).to(dtype).contiguous()
    bs = torch.stack(list(strip_biases), dim=1).to(dtype).contiguous()
    w3 = conv3_weight.reshape(C, C).to(dtype).contiguous()
    return w0, conv0_bias.to(dtype).contiguous(), ws, bs, w3, conv3_bias.to(dtype).contiguous()
