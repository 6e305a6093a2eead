"""Bad input to segnext_kernels.msca raises a clear error naming the argument, what was expected and what came."""
import pytest
import torch

import segnext_kernels

from msca_helpers import make_msca


def _args(**change):
    u, w0, b0, sw, sb, w3, b3 = make_msca(1, 4, 5, 6, device="cpu")
    args = dict(u=u, conv0_weight=w0, conv0_bias=b0, strip_weights=sw, strip_biases=sb, conv3_weight=w3,
                conv3_bias=b3)
    for k, v in change.items():
        args[k] = v(args) if callable(v) else v
    return args


def _strip(i, t):
    return lambda a: [t if j == i else w for j, w in enumerate(a["strip_weights"])]


CASES = [
    ("u 3-D", dict(u=lambda a: a["u"][0]), ValueError, r"u: expected a 4-D tensor \(B, C, H, W\), got 3-D"),
    ("u int", dict(u=lambda a: a["u"].long()), TypeError, r"u: expected dtype float16, bfloat16, float32 or float64"),
    ("u not tensor", dict(u=[1.0]), TypeError, r"u: expected a torch.Tensor, got list"),
    ("u C = 0", dict(u=lambda a: a["u"][:, :0]), ValueError, r"u: expected at least one channel \(C >= 1\)"),
    ("u H = 0", dict(u=lambda a: a["u"][:, :, :0]), ValueError, r"u: expected H, W >= 1 .* got shape \(1, 4, 0, 6\)"),
    ("u W = 0", dict(u=lambda a: a["u"][..., :0]), ValueError, r"u: expected H, W >= 1 .* got shape \(1, 4, 5, 0\)"),
    ("conv0 shape", dict(conv0_weight=torch.randn(4, 1, 3, 3)), ValueError,
     r"conv0_weight: expected shape \(4, 1, 5, 5\), got \(4, 1, 3, 3\)"),
    ("C mismatch", dict(conv3_weight=torch.randn(5, 5, 1, 1)), ValueError,
     r"conv3_weight: expected shape \(4, 4, 1, 1\), got \(5, 5, 1, 1\)"),
    ("bias shape", dict(conv3_bias=torch.randn(4, 1)), ValueError, r"conv3_bias: expected shape \(4,\), got \(4, 1\)"),
    ("strip transposed", dict(strip_weights=_strip(1, torch.randn(4, 1, 1, 7))), ValueError,
     r"strip_weights\[1\]: expected shape \(4, 1, 7, 1\), got \(4, 1, 1, 7\)"),
    ("five strips", dict(strip_weights=lambda a: a["strip_weights"][:5]), ValueError,
     r"strip_weights: expected a list of 6 tensors .* got list of length 5"),
    ("dtype mismatch", dict(conv0_bias=lambda a: a["conv0_bias"].double()), TypeError,
     r"conv0_bias: expected dtype torch.float32 \(the dtype of u\), got torch.float64"),
    ("device mismatch", dict(conv3_bias=lambda a: a["conv3_bias"].to("meta")), RuntimeError,
     r"conv3_bias: expected a tensor on cpu \(the device of u\), got one on meta"),
    ("unknown backend", dict(), ValueError, r"backend: expected one of \('auto', 'cuda', 'triton', 'cpu', 'reference'\)"),
]


@pytest.mark.parametrize("name,change,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, change, exc, msg):
    kw = {"backend": "tensorrt"} if name == "unknown backend" else {}
    with pytest.raises(exc, match=msg):
        segnext_kernels.msca(**_args(**change), **kw)


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: .*CUDA tensors.*SEGNEXT_KERNELS_FORCE_BUILD"):
        segnext_kernels.msca(**_args(), backend="cuda")


def test_auto_on_cpu_runs_the_cpu_kernels():
    args = _args()
    out = segnext_kernels.msca(**args)
    assert torch.equal(out, segnext_kernels.msca(**args, backend="cpu"))
    ref = segnext_kernels.msca_reference(*args.values())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
