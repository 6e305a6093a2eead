"""float16 on CPU never takes oneDNN's float16 depthwise path (it hangs on AVX512-FP16 CPUs: a 1x21 depthwise conv
did not return in 60 s with torch 2.13): the MSCA reference, the "reference" / "auto" backends and the eager SegNeXt
run their depthwise convs in float32 and round once (segnext/depthwise.py). Each test is bounded in time, so a hang
fails it instead of stalling the run; a function mode records every conv2d call and fails on a float16 depthwise one
(this machine may lack AVX512-FP16, so the guard, not the clock, is what proves the path is avoided)."""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import segnext
import segnext_kernels

from msca_helpers import make_msca, max_err, reference_fwd_bwd


class _NoFp16DepthwiseConv(TorchFunctionMode):
    """Fails on F.conv2d / torch.conv2d with a float16 CPU input and groups > 1; counts the conv2d calls it saw."""

    def __init__(self):
        super().__init__()
        self.convs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, torch.conv2d):
            self.convs += 1
            x = args[0]
            groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
            assert not (x.dtype == torch.float16 and x.device.type == "cpu" and groups > 1), \
                f"float16 depthwise conv2d on CPU (groups={groups}, weight {tuple(args[1].shape)})"
        return func(*args, **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", [(1, 8, 32, 32), (1, 5, 44, 60)])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fp16_msca_on_cpu_is_bounded_and_right(shape, backend):
    args = make_msca(*shape, dtype=torch.float16, device="cpu")
    guard = _NoFp16DepthwiseConv()
    with guard:
        out = segnext_kernels.msca(*args, backend=backend)
    if backend == "reference":
        assert guard.convs == 8  # the 5x5, six strips and the 1x1 all went through the guard
    ref, _ = reference_fwd_bwd(args, dtype=torch.float64)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert max_err(out, ref) <= 1e-2 * ref.abs().max().item()


@pytest.mark.timeout(300)
def test_fp16_segnext_t_forward_on_cpu_is_bounded():
    torch.manual_seed(0)
    model = segnext.segnext_t(num_classes=19).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        ref = model(x)
        half = model.half()
        guard = _NoFp16DepthwiseConv()
        with guard:
            torch.manual_seed(1)
            out = half(x.half())
    assert guard.convs > 13 * 8  # every MSCA and Mlp depthwise conv was seen
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert max_err(out, ref) <= 5e-2 * ref.abs().max().item()
