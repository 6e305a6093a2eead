"""The "cpu" bilinear resize (csrc/cpu/resize_cpu.cpp, segnext_kernels/resize/) against F.interpolate: values in
float64 / float32 / bfloat16, both align_corners, up- and downsampling and odd sizes, batches, layouts, the
huge-page output path, threads, lower vector ISAs, autograd, torch integration, errors, and SegNeXt-T with
``fuse_resize``.

Tolerances (written out): the kernel uses PyTorch's source indices and weights exactly and blends vertically then
horizontally (ATen: horizontally then vertically), so float32 / float64 results agree with F.interpolate to within
ULPS ulps of the input's largest magnitude. bfloat16 is computed in fp32 (ATen rounds its weights to bfloat16):
within one bfloat16 ulp (2^-7) of the input's largest magnitude of the float64 result on the same inputs. Outputs
are poisoned with NaN at allocation (``set_poison``), so an unwritten element fails.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F

import segnext
from segnext_kernels import FusedLogitsResize, fuse_resize, resize_bilinear
from segnext_kernels.extension import CPU_EXTENSION
from segnext_kernels.resize import resize_bilinear_reference

from cpu_ext_helpers import ext, poison, run_with_isa  # noqa: F401  (fixtures: the extension, NaN-poisoned outputs)

ULPS = 2
SHAPES = [  # (x shape, output size)
    ((2, 3, 7, 5), (23, 31)),
    ((1, 2, 1, 1), (5, 3)),
    ((1, 3, 17, 19), (6, 4)),      # downsampling
    ((1, 2, 5, 6), (1, 1)),        # 1x1 output
    ((1, 3, 9, 9), (9, 9)),        # same size: a copy
    ((1, 2, 1, 7), (4, 1)),
    ((2, 3, 100, 200), (33, 21)),  # downsampling by > 2 (the AVX-512 gather path)
    ((1, 4, 40, 47), (320, 375)),  # non-integer scale, OW not a multiple of 16
    ((1, 4, 64, 64), (512, 512)),  # the SegNeXt x8 upsample with few classes (4 MiB: the huge-page path)
]
IDS = [f"{s}->{o}" for s, o in SHAPES]


def rand(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)


def ulp_bound(x, ulps=ULPS):
    return ulps * torch.finfo(x.dtype).eps * max(x.abs().max().item(), torch.finfo(x.dtype).tiny)


def check_close(got, x, size, align_corners):
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    assert got.shape == ref.shape and got.dtype == x.dtype and got.is_contiguous()
    assert not torch.isnan(got).any(), "NaN: an unwritten element"
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    assert err <= ulp_bound(x), f"error {err:.3e} > {ULPS} ulps of max|x| ({ulp_bound(x):.3e})"


def check_bf16(got, x, size, align_corners):
    ref = F.interpolate(x.double(), size=size, mode="bilinear", align_corners=align_corners)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape and not torch.isnan(got).any()
    assert (got.double() - ref).abs().max().item() <= 2 ** -7 * x.abs().max().item()


def test_extension_has_the_resize(ext):
    assert hasattr(ext, "resize_bilinear_forward")


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,size", SHAPES, ids=IDS)
def test_matches_interpolate(shape, size, dtype, align_corners):
    x = rand(shape, dtype)
    check_close(resize_bilinear(x, size, align_corners, backend="cpu"), x, size, align_corners)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape,size", SHAPES, ids=IDS)
def test_bfloat16(shape, size, align_corners):
    x = rand(shape, torch.bfloat16)
    check_bf16(resize_bilinear(x, size, align_corners, backend="cpu"), x, size, align_corners)


def test_x8_upsample_150_classes():
    """The SegNeXt head's shape at a 512x512 input with all 150 ADE20K classes, float32."""
    x = rand((1, 150, 64, 64))
    for ac in (False, True):
        check_close(resize_bilinear(x, (512, 512), ac, backend="cpu"), x, (512, 512), ac)


def test_huge_page_outputs_are_2mib_aligned():
    x = rand((1, 10, 40, 47))  # 10 * 320 * 375 * 4 bytes > 4 MiB; rows not 64-byte aligned: streamed via a buffer
    y = resize_bilinear(x, (320, 375), backend="cpu")
    check_close(y, x, (320, 375), False)
    if sys.platform.startswith("linux"):
        assert y.data_ptr() % (2 << 20) == 0
    small = resize_bilinear(rand((1, 2, 4, 4)), (8, 8), backend="cpu")
    assert small.is_contiguous()
    for dtype in (torch.float64, torch.bfloat16):  # their big outputs take the same allocation
        xd = rand((1, 8, 32, 32), dtype)
        yd = resize_bilinear(xd, (256, 320), True, backend="cpu")
        assert not torch.isnan(yd).any()
        torch.testing.assert_close(yd.double(), F.interpolate(xd.double(), size=(256, 320), mode="bilinear",
                                                              align_corners=True),
                                   rtol=0, atol=2 ** -7 * xd.abs().max().item())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the output-mapping cache is Linux only")
def test_output_cache_reuses_and_obeys_its_limit(ext):
    """A dead big output's mapping is cached and taken by the next call of that size (same address, correct values
    again); with the limit at 0 (SEGNEXT_CPU_OUTPUT_CACHE_MIB=0) nothing is kept; lowering the limit unmaps what it
    no longer allows; a negative limit is an error."""
    from segnext_kernels import knobs

    x, size = rand((1, 16, 40, 47)), (320, 375)  # 7.3 MiB of output: an 8 MiB mapping
    try:
        ext.set_output_cache_limit(0)  # start empty (earlier tests' outputs may be cached)
        ext.set_output_cache_limit(512 << 20)
        y = resize_bilinear(x, size, backend="cpu")
        ptr = y.data_ptr()
        assert ext.output_cache_bytes() == 0
        del y
        assert ext.output_cache_bytes() == 8 << 20
        y = resize_bilinear(x * 2, size, backend="cpu")
        assert y.data_ptr() == ptr and ext.output_cache_bytes() == 0
        check_close(y, x * 2, size, False)  # the reused pages hold the new call's values (poisoned first)
        del y
        ext.set_output_cache_limit(0)
        assert ext.output_cache_bytes() == 0
        y = resize_bilinear(x, size, backend="cpu")
        check_close(y, x, size, False)
        del y
        assert ext.output_cache_bytes() == 0, "limit 0: a dead output is unmapped, not cached"
        with pytest.raises(RuntimeError, match="bytes must be >= 0"):
            ext.set_output_cache_limit(-1)
    finally:
        ext.set_output_cache_limit(knobs.KNOBS.cpu_output_cache_mib << 20)


def test_batch_zero_and_int_size():
    x = rand((0, 3, 5, 6))
    y = resize_bilinear(x, (10, 12), backend="cpu")
    assert y.shape == (0, 3, 10, 12)
    x = rand((2, 3, 5, 6))
    check_close(resize_bilinear(x, 7, backend="cpu"), x, (7, 7), False)
    check_close(resize_bilinear(x, torch.Size([4, 9]), None, backend="cpu"), x, (4, 9), False)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "channels_last", "expanded"])
def test_layouts(layout):
    base = rand((2, 9, 13, 14))
    if layout == "sliced":
        x = base[:, 1::2, 2:, 1:12]
    elif layout == "transposed":
        x = base.transpose(2, 3)
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = base[:, :1].expand(2, 5, 13, 14)
    assert not x.is_contiguous()
    for ac in (False, True):
        got = resize_bilinear(x, (29, 35), ac, backend="cpu")
        assert got.is_contiguous()
        assert torch.equal(got, resize_bilinear(x.contiguous(), (29, 35), ac, backend="cpu"))
        check_close(got, x.contiguous(), (29, 35), ac)


def _run_threads(n, x, size, ac):
    torch.set_num_threads(n)
    try:
        return resize_bilinear(x, size, ac, backend="cpu")
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_one_and_two_threads_bitwise_equal(dtype):
    for shape, size in (((2, 5, 33, 37), (260, 300)), ((1, 6, 64, 64), (512, 512)), ((1, 1, 3, 3), (1000, 17))):
        x = rand(shape, dtype, seed=3)
        for ac in (False, True):
            assert torch.equal(_run_threads(1, x, size, ac), _run_threads(2, x, size, ac)), (shape, size, ac)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_lower_vector_isas(isa):
    """SEGNEXT_CPU_ISA is read once per process: each lower ISA in a fresh one (the best ISA runs above)."""
    body = ("t.CPU_EXTENSION.load().set_poison(True)\n"
            "for shape, size in t.SHAPES + [((1, 10, 40, 47), (320, 375))]:  # + a streamed, unaligned one\n"
            "    for ac in (False, True):\n"
            "        for dt in (torch.float32, torch.float64, torch.bfloat16):\n"
            "            x = t.rand(shape, dt)\n"
            "            check = t.check_bf16 if dt == torch.bfloat16 else t.check_close\n"
            "            check(t.resize_bilinear(x, size, ac, backend='cpu'), x, size, ac)")
    run_with_isa("tests/resize/test_resize_cpu.py", body, isa)


@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck_fp64(align_corners):
    x = rand((2, 2, 4, 5), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: resize_bilinear(t, (7, 3), align_corners, backend="cpu"), (x,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradient_is_the_reference_gradient():
    x = rand((1, 3, 6, 7)).requires_grad_(True)
    go = rand((1, 3, 17, 11), seed=5)
    got = torch.autograd.grad(resize_bilinear(x, (17, 11), True, backend="cpu"), x, go)[0]
    ref = torch.autograd.grad(F.interpolate(x, size=(17, 11), mode="bilinear", align_corners=True), x, go)[0]
    assert torch.equal(got, ref)


def test_gradgradcheck_fp64():
    x = rand((1, 2, 3, 4), torch.float64).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: resize_bilinear(t, (5, 7), False, backend="cpu"), (x,))


def test_opcheck():
    x = rand((1, 3, 5, 7)).requires_grad_(True)
    g = rand((1, 3, 9, 11), seed=1).requires_grad_(True)
    for ac in (False, True):
        torch.library.opcheck(torch.ops.segnext_kernels.resize_bilinear_fwd.default, (x, 9, 11, ac, "cpu"))
        torch.library.opcheck(torch.ops.segnext_kernels.resize_bilinear_bwd.default, (g, [1, 3, 5, 7], ac))


def test_compile_fullgraph():
    def f(x):
        return resize_bilinear(x * 2, (x.shape[2] * 8, x.shape[3] * 8), False, backend="cpu").relu()

    x = rand((1, 4, 9, 7)).requires_grad_(True)
    ref = f(x)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, ref)
    g = torch.randn_like(got)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_export_records_the_reference():
    class M(torch.nn.Module):
        def forward(self, x):
            return resize_bilinear(x, (12, 10), True, backend="cpu")

    x = rand((1, 2, 4, 5))
    ep = torch.export.export(M(), (x,))
    assert "upsample_bilinear2d" in str(ep.graph) and "segnext_kernels" not in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), resize_bilinear_reference(x, (12, 10), True), rtol=0, atol=0)


def test_backends_auto_and_reference():
    x = rand((1, 3, 5, 6))
    assert torch.equal(resize_bilinear(x, (9, 8), backend="reference"), F.interpolate(x, size=(9, 8), mode="bilinear"))
    xh = x.half()
    with pytest.warns(RuntimeWarning, match="falls back to the eager reference"):
        got = resize_bilinear(xh, (9, 8), backend="auto")
    assert torch.equal(got, F.interpolate(xh, size=(9, 8), mode="bilinear"))
    check_close(resize_bilinear(x, (9, 8)), x, (9, 8), False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.interpolate has no autocast policy on CPU: dtype kept
        assert resize_bilinear(x, (9, 8), backend="cpu").dtype == torch.float32


def test_bad_input(ext):
    x = rand((1, 3, 5, 6))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        resize_bilinear(None, (4, 4))
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        resize_bilinear(x[0], (4, 4), backend="cpu")
    with pytest.raises(TypeError, match="x: expected dtype"):
        resize_bilinear(x.to(torch.int32), (4, 4), backend="cpu")
    with pytest.raises(ValueError, match="x: expected C, H, W >= 1"):
        resize_bilinear(x[:, :0], (4, 4), backend="cpu")
    with pytest.raises(TypeError, match="size: expected an int or a pair"):
        resize_bilinear(x, (4, 4, 4), backend="cpu")
    with pytest.raises(TypeError, match="size: expected an int or a pair"):
        resize_bilinear(x, (4.0, 4), backend="cpu")
    with pytest.raises(ValueError, match="size: expected out_h, out_w >= 1"):
        resize_bilinear(x, (0, 4), backend="cpu")
    with pytest.raises(TypeError, match="align_corners: expected a bool"):
        resize_bilinear(x, (4, 4), "yes", backend="cpu")
    with pytest.raises(TypeError, match="cpu resize_bilinear kernels take"):
        resize_bilinear(x.half(), (4, 4), backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        resize_bilinear(x, (4, 4), backend="nope")
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ext.resize_bilinear_forward(x[0], 4, 4, False)
    with pytest.raises(RuntimeError, match="out_h must be >= 1"):
        ext.resize_bilinear_forward(x, 0, 4, False)
    with pytest.raises(RuntimeError, match="out_w must be >= 1"):
        ext.resize_bilinear_forward(x, 4, -1, False)
    with pytest.raises(RuntimeError, match="x must be float32, float64 or bfloat16"):
        ext.resize_bilinear_forward(x.half(), 4, 4, False)
    with pytest.raises(RuntimeError, match="C, H, W >= 1"):
        ext.resize_bilinear_forward(x[:, :, :0], 4, 4, False)


def test_module_and_fuse_resize():
    m = segnext.LogitsResize()
    assert list(m.state_dict()) == [] and list(m.parameters()) == []
    f = FusedLogitsResize(backend="cpu")
    assert list(f.state_dict()) == [] and "backend='cpu'" in repr(f)
    x = rand((1, 3, 5, 6))
    check_close(f(x, (11, 13), True), x, (11, 13), True)
    with pytest.raises(ValueError, match="backend"):
        FusedLogitsResize(backend="nope")
    net = torch.nn.Sequential(segnext.LogitsResize(), torch.nn.Sequential(segnext.LogitsResize()))
    assert fuse_resize(net, backend="cpu") == 2 and isinstance(net[1][0], FusedLogitsResize)
    assert fuse_resize(net, backend="cpu") == 0
    with pytest.raises(ValueError, match="backend"):
        fuse_resize(torch.nn.Sequential(segnext.LogitsResize()), backend="nope")
    with pytest.raises(RuntimeError):
        fuse_resize(torch.nn.Sequential(torch.nn.Linear(2, 2), segnext.LogitsResize()).to("meta"), backend="cpu")


@pytest.mark.parametrize("align_corners", [False, True])
def test_fused_segnext_t_matches_eager(align_corners):
    torch.manual_seed(0)
    eager = segnext.segnext_t(num_classes=19, align_corners=align_corners)
    both = copy.deepcopy(eager)
    assert fuse_resize(both, backend="cpu") == 2 and isinstance(both.resize, FusedLogitsResize)
    assert isinstance(both.decode_head.resize, FusedLogitsResize)  # the head's resize of its inputs too
    assert list(both.state_dict()) == list(eager.state_dict())
    fused = copy.deepcopy(eager)
    fused.resize = FusedLogitsResize(backend="cpu")  # the final resize alone: its error is a few ulps
    images = torch.randn(1, 3, 62, 50)
    eager.eval(), fused.eval(), both.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        ref = eager(images)
        torch.manual_seed(1)
        out = fused(images)
        torch.manual_seed(1)
        out_both = both(images)
        torch.manual_seed(1)
        logits = eager.decode_head(eager.backbone(images))
    assert out.shape == ref.shape == (1, 19, 62, 50)
    assert (out - ref).abs().max().item() <= ulp_bound(logits)
    # both resizes fused: the head's few-ulp differences pass through its convolutions and GroupNorms
    assert (out_both - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    fused = both
    target = torch.randint(0, 19, (1, 62, 50))
    eager.train(), fused.train()
    torch.manual_seed(2)
    F.cross_entropy(eager(images), target).backward()
    torch.manual_seed(2)
    F.cross_entropy(fused(images), target).backward()
    fp = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        scale = p.grad.abs().max().item() + 1e-12
        assert (fp[name].grad - p.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name
