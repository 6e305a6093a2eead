"""The CUDA MSCA kernels (csrc/msca/*.cu) run on the CPU through a fiber-based CUDA emulator
(tests/helpers/emu/cuda_emu.h).

The very kernel sources the GPU runs are compiled with g++ (-DSEGNEXT_EMU): every CUDA thread of a block becomes a
cooperative fiber, __syncthreads/shuffles/ldmatrix/mma.sync are emulated with the PTX fragment layouts. This checks
the index arithmetic, halos, zero padding, shared-memory layouts (with a canary after the dynamic size), the tensor-
core fragment bookkeeping and the barrier placement (results must not depend on the fiber scheduling order) without
a GPU. It cannot check timing, registers or the hardware itself: tests/msca/test_msca_cuda_gpu.py does that on a GPU.

Skipped (saying why) when g++ or the CUDA headers (cuda_fp16.h, cuda_bf16.h) are missing.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import pytest
import torch

from segnext_kernels.msca.reference import msca_reference, pack_weights

from emu_build import EMU, MSCA_KERNEL_SOURCES, build_ctypes_library, skip_reason
from msca_helpers import make_msca

H100_SMEM = 232448   # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 (227 KB)
A100_SMEM = 166912   # ... of an A100 (163 KB)
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DW = {"auto": 0, "tc": 1, "fma": 2}   # MscaDwVariant ("tc", as SEGNEXT_MSCA_CUDA_DW spells it: MSCA_DW_MMA)
GRAD_NAMES = ("du", "dw0", "db0", "dws", "dbs", "dw3", "db3")

#: Tolerances, relative to the float64 reference's max magnitude (docs/kernels.md, "Correctness protocol"): a kernel's max error
#: must be <= ERR_FACTOR * (error of eager PyTorch in the same dtype) + ATOL[mode]. "tf32" is fp32 with the 1x1 mix on TF32
#: tensor cores, for which CPU eager has no counterpart: its bound is ATOL["tf32"] alone.
ERR_FACTOR = 2.0
ATOL = {"fp32": 1e-5, "tf32": 5e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


class Emu:
    def __init__(self, so: Path):
        self.lib = ctypes.CDLL(str(so))
        self.lib.emu_set_order.argtypes = [ctypes.c_int]
        self.lib.emu_take_mma_direct_redos.restype = ctypes.c_longlong
        self.lib.emu_last_dbuf.restype = ctypes.c_int

    def last_dbuf(self) -> bool:
        """Whether the last launch gave the tensor-core variant two U/H buffers per warp."""
        return bool(self.lib.emu_last_dbuf())

    def take_direct_redos(self) -> int:
        """Channels the tensor-core variant redid with the direct taps since the last call."""
        return int(self.lib.emu_take_mma_direct_redos())

    @staticmethod
    def _ptr(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None else 0)

    @staticmethod
    def _strides(t):
        return (ctypes.c_longlong * 4)(*(t.stride() if t is not None else (0, 0, 0, 0)))

    def order(self, o: int):
        self.lib.emu_set_order(o)

    def forward(self, u, packed, tf32=False, cfg=-1, smem=H100_SMEM, u_dw=None, dw="auto"):
        """u_dw: the copy the depthwise tile loads read (the binding passes an NCHW copy of a channels_last u).
        dw: depthwise variant, "auto", "tc" (tensor cores) or "fma". Returns (out, cfg + 100 if it ran on tensor cores)."""
        out = torch.full_like(u, math.nan)
        err = ctypes.create_string_buffer(512)
        cfg_out = ctypes.c_int(-1)
        B, C, H, W = u.shape
        rc = self.lib.emu_msca_fwd(
            DT[u.dtype], int(tf32), cfg, DW[dw], smem, ctypes.c_longlong(B), ctypes.c_longlong(C), ctypes.c_longlong(H),
            ctypes.c_longlong(W), self._ptr(u), self._strides(u), self._ptr(u_dw), self._strides(u_dw),
            self._ptr(out), self._strides(out),
            *(self._ptr(t) for t in packed), ctypes.byref(cfg_out), err, 512)
        if rc:
            raise RuntimeError(err.value.decode())
        return out, cfg_out.value

    def backward(self, g, u, packed, tf32=False, cfg=-1, smem=H100_SMEM, need=(True, True, True), u_dw=None,
                 dw="auto"):
        """With u_dw (an NCHW copy of a channels_last u) du comes back NCHW, as the binding computes it."""
        B, C, H, W = u.shape
        nan = lambda *s: torch.full(s, math.nan, dtype=torch.float32)  # noqa: E731
        du = None
        if need[0]:
            du = torch.full(u.shape, math.nan, dtype=u.dtype) if u_dw is not None else torch.full_like(u, math.nan)
        wd = (nan(C, 25), nan(C), nan(C, 78), nan(C, 6)) if need[1] else (None,) * 4
        w3 = (nan(C, C), nan(C)) if need[2] else (None,) * 2
        err = ctypes.create_string_buffer(512)
        cfg_out = ctypes.c_int(-1)
        rc = self.lib.emu_msca_bwd(
            DT[u.dtype], int(tf32), cfg, DW[dw], smem, ctypes.c_longlong(B), ctypes.c_longlong(C), ctypes.c_longlong(H),
            ctypes.c_longlong(W), self._ptr(g), self._strides(g), self._ptr(u), self._strides(u),
            self._ptr(u_dw), self._strides(u_dw), *(self._ptr(t) for t in packed), self._ptr(du), self._strides(du), *(self._ptr(t) for t in wd + w3),
            int(need[0]), int(need[1]), int(need[2]), ctypes.byref(cfg_out), err, 512)
        if rc:
            raise RuntimeError(err.value.decode())
        return (du, *wd, *w3), cfg_out.value


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    out = tmp_path_factory.mktemp("msca_emu") / "msca_emu.so"
    build_ctypes_library(out, MSCA_KERNEL_SOURCES, EMU / "emu_main.cpp", timeout=600)
    e = Emu(out)
    e.order(0)
    return e


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _case(shape, dtype, seed, channels_last=False, noncontig=False):
    args = make_msca(*shape, dtype=torch.float64, device="cpu", seed=seed, noncontig=noncontig)
    u, w0, b0, sw, sb, w3, b3 = args
    packed = pack_weights(w0, b0, sw, sb, w3, b3, torch.float32)
    ud = u.to(dtype)
    if channels_last:
        ud = ud.contiguous(memory_format=torch.channels_last)
    elif noncontig:  # keep the gaps: a view into a larger tensor
        big = torch.zeros(shape[0], 2 * shape[1] + 1, shape[2] + 3, shape[3] + 2, dtype=dtype)
        big[:, 1::2, 2:shape[2] + 2, 1:shape[3] + 1] = u.to(dtype)
        ud = big[:, 1::2, 2:shape[2] + 2, 1:shape[3] + 1]
    return args, packed, ud


def _flat_grads(grads, C):
    du, w0, b0, sw, sb, w3, b3 = grads[0], grads[1], grads[2], grads[3:9], grads[9:15], grads[15], grads[16]
    return (du, w0.reshape(C, 25), b0, torch.cat([w.reshape(C, -1) for w in sw], 1), torch.stack(list(sb), 1),
            w3.reshape(C, C), b3)


def _ref(args, g, dtype):
    """(out, 7 packed grads) of msca_reference with every input cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in
              (args[0], args[1], args[2], *args[3], *args[4], args[5], args[6])]
    out = msca_reference(leaves[0], leaves[1], leaves[2], leaves[3:9], leaves[9:15], leaves[15], leaves[16])
    if g is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, leaves, g.to(dtype))
    return out.detach(), _flat_grads(grads, args[0].shape[1])


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(name, got, ref64, eager, mode):
    assert got is not None, name
    assert not torch.isnan(got).any(), f"{name}: NaN in the result (an unwritten element?)"
    scale = max(ref64.abs().max().item(), 1.0) if ref64.numel() else 1.0
    e = _err(got, ref64)
    bound = (ERR_FACTOR * _err(eager, ref64) if eager is not None else 0.0) + ATOL[mode] * scale
    assert e <= bound, f"{name}: error {e:.3e} > bound {bound:.3e}"


def _mode(dtype, tf32):
    return ("tf32" if tf32 else "fp32") if dtype == torch.float32 else dtype


def run_and_check(emu, shape, dtype, *, tf32=False, channels_last=False, noncontig=False, cfg=-1, seed=0,
                  backward=True, strided_grad=False, smem=H100_SMEM, nchw_copy=False, dw="auto"):
    args, packed, ud = _case(shape, dtype, seed, channels_last, noncontig)
    u_dw = ud.contiguous() if nchw_copy else None
    gen = torch.Generator().manual_seed(seed + 101)
    g64 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ref_out, ref_g = _ref(args, g64 if backward else None, torch.float64)
    eager_out, eager_g = (None, None) if tf32 else _ref(args, g64 if backward else None, dtype)
    mode = _mode(dtype, tf32)
    out, used = emu.forward(ud, packed, tf32=tf32, cfg=cfg, smem=smem, u_dw=u_dw, dw=dw)
    assert out.dtype == dtype and out.shape == ud.shape
    _check(f"out {shape} {dtype} cfg{used}", out, ref_out, eager_out, mode)
    if backward:
        gd = g64.to(dtype)
        if strided_grad:  # every other element of a wider tensor
            wide = torch.zeros(*shape[:3], 2 * shape[3], dtype=dtype)
            wide[..., ::2] = gd
            gd = wide[..., ::2]
        grads, used_b = emu.backward(gd, ud, packed, tf32=tf32, cfg=cfg, smem=smem, u_dw=u_dw, dw=dw)
        for n, a, r, e in zip(GRAD_NAMES, grads, ref_g, eager_g if eager_g is not None else (None,) * 7):
            assert a.shape == r.shape, n
            _check(f"grad {n} {shape} {dtype} cfg{used_b}", a, r, e, mode)
    return out, used


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------
BORDER = [(1, 3, 1, 1), (2, 3, 2, 3), (1, 4, 5, 21), (1, 2, 23, 7)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BORDER + [(2, 5, 9, 13)], ids=str)
def test_borders(emu, shape, dtype):
    run_and_check(emu, shape, dtype, channels_last=shape[0] == 2)


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
def test_fp32_modes_channels_last_strided_grad(emu, tf32):
    run_and_check(emu, (1, 33, 10, 19), torch.float32, tf32=tf32, channels_last=True, strided_grad=True, seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_with_nchw_copy(emu, dtype):
    """The binding's default for channels_last u: tile loads from an NCHW copy, gate from u, du accumulated NCHW."""
    run_and_check(emu, (2, 12, 9, 14), dtype, channels_last=True, nchw_copy=True, seed=13, strided_grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_noncontiguous_u(emu, dtype):
    run_and_check(emu, (1, 6, 11, 9), dtype, noncontig=True, seed=2, strided_grad=True)


@pytest.mark.parametrize("cfg", range(6))
def test_every_tile_config(emu, cfg):
    run_and_check(emu, (1, 40, 18, 35), torch.bfloat16, cfg=cfg, seed=3)
    run_and_check(emu, (1, 8, 18, 35), torch.float32, cfg=cfg, seed=4)


@pytest.mark.parametrize("C", [1, 32, 64, 160])
def test_channel_counts(emu, C):
    dtype = torch.bfloat16 if C in (64, 160) else torch.float32
    run_and_check(emu, (1, C, 6, 9), dtype, seed=5 + C)


def test_a100_shared_memory_limit(emu):
    run_and_check(emu, (1, 96, 7, 9), torch.float32, smem=A100_SMEM, seed=6)


def test_scheduling_order_and_determinism(emu):
    """Bit-identical results for ascending, descending and random fiber orders (no missing barrier) and reruns."""
    args, packed, ud = _case((2, 40, 13, 19), torch.bfloat16, 7, channels_last=False)
    g = torch.randn(ud.shape, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    results = []
    try:
        for order in (0, 1, 2, 0):
            emu.order(order)
            out, _ = emu.forward(ud, packed)
            grads, _ = emu.backward(g, ud, packed)
            results.append((out, *grads))
    finally:
        emu.order(0)
    for r in results[1:]:
        for n, a, b in zip(("out",) + GRAD_NAMES, results[0], r):
            assert torch.equal(a, b), f"{n} depends on the thread scheduling order (missing __syncthreads?)"


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["du", "dwdw", "w3"])
def test_partial_needs(emu, need):
    """Only the requested gradient groups are computed (null pointers elsewhere), equal to the full run."""
    args, packed, ud = _case((1, 9, 8, 12), torch.float32, 9)
    g = torch.randn(ud.shape, generator=torch.Generator().manual_seed(10))
    full, _ = emu.backward(g, ud, packed)
    part, _ = emu.backward(g, ud, packed, need=need)
    groups = ((0,), (1, 2, 3, 4), (5, 6))
    for gi, idx in enumerate(groups):
        for i in idx:
            if need[gi]:
                assert torch.equal(part[i], full[i]), GRAD_NAMES[i]
            else:
                assert part[i] is None


def test_batch_zero_launches_nothing(emu):
    args, packed, ud = _case((1, 4, 5, 6), torch.float32, 11)
    u0 = ud[:0]
    out, _ = emu.forward(u0, packed)
    assert out.shape == u0.shape


def test_unsupported_size_is_reported(emu):
    args, packed, ud = _case((1, 4, 5, 6), torch.float32, 12)
    with pytest.raises(RuntimeError, match="tile config 9 out of range"):
        emu.forward(ud, packed, cfg=9)
    with pytest.raises(RuntimeError, match="shared memory"):
        emu.forward(ud, packed, cfg=0, smem=16 * 1024)


@pytest.mark.parametrize("dw", ["tc", "fma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_depthwise_variants(emu, dtype, dw):
    """Both depthwise variants of the half-precision kernels (tensor-core banded products / fp32 FMA), several tiles
    in each direction, with the gradients; "auto" picks the tensor cores for fp16/bf16. Finite inputs never take the
    direct-tap fallback (which would hide a fragment or tile-load bug behind a correct but slow path)."""
    emu.take_direct_redos()
    _, used = run_and_check(emu, (2, 9, 37, 41), dtype, dw=dw, seed=17, strided_grad=True)
    assert (used >= 100) == (dw == "tc"), used
    # W % 4 == 0, NCHW: the tensor-core variant's tile loads move 4 elements at a time
    _, used = run_and_check(emu, (2, 7, 21, 44), dtype, dw=dw, seed=21, cfg=0)
    assert (used >= 100) == (dw == "tc"), used
    _, used = run_and_check(emu, (1, 3, 5, 6), dtype, backward=False, seed=18)
    assert used >= 100, "auto should run fp16/bf16 on the tensor-core variant"
    assert emu.take_direct_redos() == 0


@pytest.mark.parametrize("shape, cfg, dtype", [((1, 5, 44, 60), 1, torch.bfloat16), ((1, 4, 45, 61), 1, torch.float16),
                                               ((1, 3, 44, 76), 0, torch.bfloat16), ((1, 3, 80, 60), 5, torch.bfloat16),
                                               ((1, 3, 36, 44), 2, torch.float16)], ids=str)
def test_tc_variant_interior_tiles(emu, shape, cfg, dtype):
    """Tiles whose u tile (12-pixel halo included) lies inside the image skip the border masks: such tiles exist in
    these shapes (W % 4 == 0: 4-wide loads; odd W: scalar loads) and agree with the reference like the edge tiles."""
    TH, TW = {0: (16, 32), 1: (16, 16), 2: (8, 16), 5: (28, 16)}[cfg]
    H, W = shape[2:]
    interior = [(y0, x0) for y0 in range(0, H, TH) for x0 in range(0, W, TW)
                if y0 >= 12 and y0 + TH + 12 <= H and x0 >= 12 and x0 + TW + 12 <= W]
    assert interior, "the shape must have interior tiles"
    emu.take_direct_redos()
    _, used = run_and_check(emu, shape, dtype, cfg=cfg, dw="tc", seed=23)
    assert used == 100 + cfg
    assert emu.take_direct_redos() == 0, "finite inputs took the direct-tap fallback"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tc_double_buffer(emu, dtype):
    """The tensor-core variant with two U/H buffers per warp (the next channel's u tile in flight by cp.async while
    this one computes; chosen when shared memory allows it at the same CTAs per SM) and with one (a smaller shared
    memory limit): 19 channels, so warps take 2 or 3 channels in turn, edge and interior tiles, forward and backward,
    both against the reference, and neither path taking the direct-tap fallback."""
    tiny = torch.randn(1, 19, 1, 1).to(dtype)
    _, packed, _ = _case((1, 19, 1, 1), dtype, 5)
    seen = {}
    for smem in range(H100_SMEM, 60000, -2048):
        try:
            _, used = emu.forward(tiny, packed, cfg=1, dw="tc", smem=smem)
        except RuntimeError:
            break
        seen.setdefault(emu.last_dbuf(), smem)
    assert set(seen) == {True, False}, f"no shared-memory limit gave both buffer modes: {seen}"
    for dbuf, smem in sorted(seen.items()):
        emu.take_direct_redos()
        out, used = emu.forward(tiny, packed, cfg=1, dw="tc", smem=smem)
        assert used == 101 and emu.last_dbuf() == dbuf
        run_and_check(emu, (1, 19, 44, 48), dtype, cfg=1, dw="tc", seed=31, smem=smem)
        assert emu.take_direct_redos() == 0, f"dbuf={dbuf}: finite inputs took the direct-tap fallback"


def test_depthwise_variant_choice_and_refusals(emu):
    args, packed, ud = _case((1, 4, 9, 10), torch.float32, 19)
    with pytest.raises(RuntimeError, match="tensor-core depthwise variant takes float16/bfloat16"):
        emu.forward(ud, packed, dw="tc")
    assert emu.forward(ud, packed)[1] < 100  # fp32: FMA
    hb = ud.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="tile config 3 cannot run the tensor-core"):
        emu.forward(hb, packed, cfg=3, dw="tc")
    assert emu.forward(hb, packed, cfg=3)[1] == 3  # auto with a tile the tensor-core variant cannot run: FMA
    assert emu.forward(hb, packed, cfg=0)[1] == 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tc_variant_nonfinite_like_eager(emu, dtype):
    """NaN / +Inf in u: the tensor-core variant's banded products would spread them through zero taps; the tiles
    that hold them are redone with the direct taps, so NaN and Inf land exactly where eager PyTorch puts them."""
    args, packed, ud = _case((1, 5, 44, 60), dtype, 20)
    ud = ud.clone()
    ud[0, 1, 3, 4] = math.nan      # an edge tile
    ud[0, 3, 24, 40] = math.inf    # an interior tile (16x16 tiles: y0 = 16, x0 = 32)
    emu.take_direct_redos()
    out, used = emu.forward(ud, packed, dw="tc", cfg=1)
    assert used == 101
    assert emu.take_direct_redos() >= 2, "the tiles holding the NaN / Inf must take the direct-tap path"
    leaves = [t.detach().to(dtype) for t in (args[1], args[2], *args[3], *args[4], args[5], args[6])]
    eager = msca_reference(ud, leaves[0], leaves[1], leaves[2:8], leaves[8:14], leaves[14], leaves[15])
    for what, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(f(out), f(eager)), f"{what} positions differ ({int(f(out).sum())} vs {int(f(eager).sum())})"
    assert torch.isnan(eager).any() and torch.isfinite(eager).any()


def test_tc_variant_fp16_strip_overflow_like_eager(emu):
    """fp16: a finite u whose 1x21 strip output overflows fp16 (h21 = Inf after rounding, as in eager). The
    tensor-core variant must notice the overflow in the rounded value and redo the tile with direct taps; otherwise
    the kx1 banded products turn 0 * Inf into NaN rows outside the receptive field."""
    args, packed, ud = _case((1, 3, 40, 48), torch.float16, 24)
    w0, b0, ws, bs, w3, b3 = (t.clone() for t in packed)
    w0[1] = 0.0
    w0[1, 12] = 1.0                 # channel 1: a = u + b0
    ws[1, 36:57] = 1.5              # 1x21 of channel 1: h21 = 1.5 * (sum of 21 a values)
    ws[1, 57:78] = 0.1              # 21x1 of channel 1: positive taps (v21 = +Inf where they meet the Inf row)
    ud = ud.clone()
    ud[0, 1, 20, 30] = 60000.0      # finite in fp16; a(20, 30) = 60000, h21 on row 20 = 90000 -> Inf in fp16
    emu.take_direct_redos()
    out, used = emu.forward(ud, (w0, b0, ws, bs, w3, b3), dw="tc", cfg=1)
    assert used == 101
    assert emu.take_direct_redos() >= 1, "the overflowing tile must take the direct-tap path"
    # eager in fp16 with the same (fp16-rounded) weights
    C = 3
    sw = [ws[:, o:o + n].to(torch.float16).reshape(C, 1, *sh) for o, n, sh in
          ((0, 7, (1, 7)), (7, 7, (7, 1)), (14, 11, (1, 11)), (25, 11, (11, 1)), (36, 21, (1, 21)), (57, 21, (21, 1)))]
    sb = [bs[:, i].to(torch.float16) for i in range(6)]
    eager = msca_reference(ud, w0.to(torch.float16).reshape(C, 1, 5, 5), b0.to(torch.float16), sw, sb,
                           w3.to(torch.float16).reshape(C, C, 1, 1), b3.to(torch.float16))
    assert torch.isinf(eager).any() and torch.isfinite(eager).any()
    for what, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(f(out), f(eager)), f"{what} positions differ ({int(f(out).sum())} vs {int(f(eager).sum())})"
