"""The CUDA NMF2D kernels (csrc/nmf/nmf_fwd.cu, csrc/nmf/nmf_bwd.cu) run on the CPU through the fiber emulator
(tests/helpers/emu/cuda_emu.h, entry points tests/helpers/emu/nmf_emu_main.cpp), like tests/msca/test_msca_cuda_emu.py does for MSCA.

Unit tests compare every launcher against float64 torch math of its documented semantics (csrc/nmf/nmf_params.h); the
end-to-end tests run segnext_kernels.nmf.driver over the emulated kernels (``EmuKernels``) against
``segnext_kernels.nmf.reference.nmf2d_reference`` in float64. Buffers the kernels write (outputs, partials, workspace)
start as NaN so an unwritten element fails. What this cannot check: timing, registers, the hardware (see
tests/compile/test_cuda_compile.py for the ptxas report).

Tolerances (one place): the tensor-core products run on bf16 pieces (csrc/nmf/nmf_common.cuh): precision level L = 2
(16-bit significand per operand, fp16/bf16 inputs and fp32 with allow_tf32) or L = 3 (fp32). ``REL[mode]`` bounds the max
error of an fp32 result relative to the reference's max magnitude; outputs in x's dtype (y, g_x) add that dtype's
rounding ``OUT_REL[dtype]``.

Skipped (saying why) when g++ or the CUDA headers are missing.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from segnext_kernels import knobs

from emu_build import CSRC, EMU, NMF_KERNEL_SOURCES, build_ctypes_library, cuda_include, skip_reason

SOURCES = [*(CSRC / s for s in NMF_KERNEL_SOURCES), EMU / "nmf_emu_main.cpp"]
HEADERS = [CSRC / "nmf" / "nmf_common.cuh", CSRC / "nmf" / "nmf_params.h", CSRC / "common" / "cuda_common.cuh",
           EMU / "cuda_emu.h"]
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
H100_SMEM = 232448
A100_SMEM = 166912

REL = {"fp32": 2e-6, "tf32": 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}
OUT_REL = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}
EPS = 1e-6


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def _p(t):
    return t.data_ptr() if t is not None else 0


def _mode(dtype, tf32=False):
    return ("tf32" if tf32 else "fp32") if dtype == torch.float32 else dtype


class NmfEmu:
    """ctypes front of the emulated launchers; tensors are CPU tensors, None for unused buffers."""

    def __init__(self, so: Path):
        self.lib = ctypes.CDLL(str(so))
        self.lib.emu_nmf_set_order.argtypes = [ctypes.c_int]
        self.lib.emu_nmf_set_smem_limit.argtypes = [ctypes.c_int]
        self.lib.emu_nmf_geom.argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_longlong),
                                          ctypes.c_char_p, ctypes.c_int]
        self.num_sms = 4

    def order(self, o: int):
        self.lib.emu_nmf_set_order(o)

    def smem_limit(self, b: int):
        self.lib.emu_nmf_set_smem_limit(b)

    @staticmethod
    def _call(fn, ptrs, ints, fl=None):
        err = ctypes.create_string_buffer(512)
        pa = (ctypes.c_void_p * len(ptrs))(*[_p(t) for t in ptrs])
        ia = (ctypes.c_longlong * len(ints))(*[int(v) for v in ints])
        if fl is None:
            rc = fn(pa, ia, err, 512)
        else:
            rc = fn(pa, ia, (ctypes.c_float * len(fl))(*fl), err, 512)
        if rc:
            raise RuntimeError(err.value.decode())

    def geom(self, B, D, N, R, dtype, backward):
        """nmf_make_geom, with the P / MTW overrides of ``knobs.KNOBS`` as nmf/cuda.py passes them."""
        out = (ctypes.c_int * 4)()
        work = ctypes.c_longlong(0)
        err = ctypes.create_string_buffer(512)
        k = knobs.KNOBS
        rc = self.lib.emu_nmf_geom(B, D, N, R, DT[dtype], int(backward), self.num_sms, k.nmf_cuda_p, k.nmf_cuda_mtw,
                                   out, ctypes.byref(work), err, 512)
        if rc:
            raise RuntimeError(err.value.decode())
        return SimpleNamespace(RP=out[0], BN=out[1], T=out[2], P=out[3], work_floats=work.value, dtype=dtype)

    def bases(self, g, bin, bout, G, pxc, pcc, E, H, work, eps, update, store_eh):
        B, D, R = bin.shape
        self._call(self.lib.emu_nmf_bases, [bin, bout, G, pxc, pcc, E, H, work],
                   [B, D, R, g.RP, g.P, int(update), int(store_eh)], [eps])

    def coef(self, g, x, bases, G, cin, cout, c0, pxc, pcc, y, eps, inv_t, *, init, store_c0, accum, recon,
             tf32=False):
        B, D, N = x.shape
        R = bases.shape[-1]
        ys = y.stride() if y is not None else (0, 0, 0)
        self._call(self.lib.emu_nmf_coef, [x, bases, G, cin, cout, c0, pxc, pcc, y],
                   [*x.stride(), *ys, B, D, N, R, g.RP, g.P, g.BN, DT[x.dtype], int(tf32), int(init), int(store_c0),
                    int(accum), int(recon)], [eps, inv_t])

    def bwd(self, g, x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg, eps, inv_t, *, final, init,
            store_gc, store_ga, tf32=False):
        B, D, N = x.shape
        R = bases.shape[-1]
        gs = gy.stride() if gy is not None else (0, 0, 0)
        self._call(self.lib.emu_nmf_bwd, [x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg],
                   [*x.stride(), *gs, B, D, N, R, g.RP, g.P, g.BN, DT[x.dtype], int(tf32), int(final),
                    int(gy is not None), int(gcin is not None), int(init), int(store_gc), int(store_ga)],
                   [eps, inv_t])

    def gx(self, l1, r1, m1, l2, r2, m2, gx, tf32=False):
        B, D, N = gx.shape
        R = l1.shape[-1]
        self._call(self.lib.emu_nmf_gx, [l1, r1, l2, r2, gx],
                   [m1, m2, *gx.stride(), B, D, N, R, DT[gx.dtype], int(tf32)])


def _build(out: Path):
    build_ctypes_library(out, NMF_KERNEL_SOURCES, EMU / "nmf_emu_main.cpp", timeout=900)


@pytest.fixture(scope="session")
def emu(request, tmp_path_factory):
    """The emulation library, cached (pytest cache dir; a session temp dir under ``-p no:cacheprovider``) by a hash
    of its sources: the g++ build takes ~1 min."""
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update(f.read_bytes())
    h.update(str(cuda_include()).encode())
    cache_plugin = getattr(request.config, "cache", None)
    cache = Path(cache_plugin.mkdir("nmf_emu")) if cache_plugin else tmp_path_factory.mktemp("nmf_emu")
    so = cache / f"nmf_emu_{h.hexdigest()[:16]}.so"
    if not so.exists():
        tmp = so.with_suffix(f".{os.getpid()}.tmp.so")  # one per process: pytest-xdist workers may build at once
        _build(tmp)
        tmp.replace(so)
    e = NmfEmu(so)
    e.order(0)
    e.smem_limit(H100_SMEM)
    return e


@pytest.fixture
def force_geom(monkeypatch):
    """Force CTAs per sample (P) and/or the tile width (MTW 1 or 2) for one test: ``knobs.KNOBS`` replaced, its
    overrides passed to nmf_make_geom by ``NmfEmu.geom``. Without a call the test runs the automatic geometry."""
    monkeypatch.setattr(knobs, "KNOBS", dataclasses.replace(knobs.KNOBS, nmf_cuda_p=0, nmf_cuda_mtw=0))

    def set_(P=None, mtw=None):
        change = {k: v for k, v in (("nmf_cuda_p", P), ("nmf_cuda_mtw", mtw)) if v is not None}
        monkeypatch.setattr(knobs, "KNOBS", dataclasses.replace(knobs.KNOBS, **change))
    return set_


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def nan(*shape, dtype=torch.float32):
    """Poisoned buffer: every byte 0xFF (NaN in every float type)."""
    t = torch.empty(*shape, dtype=dtype)
    t.view(torch.uint8).fill_(0xFF)
    return t


def make_x(B, D, N, dtype, layout="contig", seed=0):
    """Non-negative x in dtype with the given memory layout: contig, trans (d-stride 1), slice (n-stride 2),
    offset (misaligned base, unit n-stride)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, D, N, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "contig":
        return x
    if layout == "trans":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "slice":
        big = torch.zeros(B, D, 2 * N, dtype=dtype)
        big[:, :, ::2] = x
        return big[:, :, ::2]
    if layout == "offset":
        big = torch.zeros(B, D, N + 1, dtype=dtype)
        big[:, :, 1:] = x
        return big[:, :, 1:]
    raise ValueError(layout)


def make_bases(B, D, R, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.rand(B, D, R, generator=gen, dtype=torch.float64), dim=1).float()


def pad_rr(m, RP):
    R = m.shape[-1]
    return F.pad(m, (0, RP - R, 0, RP - R)).contiguous()


def check(name, got, ref, rel, out_rel=0.0):
    """max |got - ref| <= (rel + out_rel) * max |ref| (+ a tiny absolute floor); no NaN/inf anywhere."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: NaN/inf in the result (an unwritten element?)"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    bound = (rel + out_rel) * scale + 1e-30
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})"


def ref_coef(x, bases, G, cin, init, inv_t, eps=EPS):
    """(C_in, C_out, E = X C_out, H = C_out^T C_out, Y = B C_out^T) in float64."""
    xd, bd = x.double(), bases.double()
    R = bd.shape[-1]
    A = xd.transpose(1, 2) @ bd
    c = torch.softmax(inv_t * A, -1) if init else cin.double()
    cn = c * A / (c @ G.double()[:, :R, :R] + eps)
    return c, cn, xd @ cn, cn.transpose(1, 2) @ cn, bd @ cn.transpose(1, 2)


def ref_bwd(x, gy, bases, ge, cnew, gcin, S, cprev, G, final, init, inv_t, eps=EPS):
    """(g_C_prev, g_A, pxg sum, pgy sum, pgg sum) in float64 (nmf_params.h semantics)."""
    xd, bd = x.double(), bases.double()
    R = bd.shape[-1]
    A = xd.transpose(1, 2) @ bd
    cn, cp, Gd = cnew.double(), cprev.double(), G.double()[:, :R, :R]
    U = torch.zeros_like(A)
    pgy = None
    if final:
        if gy is not None:
            U = U + gy.double().transpose(1, 2) @ bd
            pgy = gy.double() @ cn
    else:
        U = U + xd.transpose(1, 2) @ ge.double() + cn @ S.double()[:, :R, :R]
    if gcin is not None:
        U = U + gcin.double()
    Q = cp @ Gd + eps
    gA = U * cp / Q
    gQ = -U * cn / Q
    gC = U * A / Q + gQ @ Gd.transpose(1, 2)
    pgg = cp.transpose(1, 2) @ gQ
    if init:
        gA = gA + inv_t * cp * (gC - (gC * cp).sum(-1, keepdim=True))
    return gC, gA, xd @ gA, pgy, pgg


def _run_coef(emu, x, bases, G, cin, *, init, store_c0, accum, recon, inv_t=1.0, tf32=False, y=None, g=None):
    B, D, N = x.shape
    R = bases.shape[-1]
    g = g or emu.geom(B, D, N, R, x.dtype, False)
    cout, c0 = nan(B, N, R), (nan(B, N, R) if store_c0 else None)
    pxc, pcc = (nan(B, g.P, D, g.RP), nan(B, g.P, g.RP, g.RP)) if accum else (None, None)
    if recon and y is None:
        y = nan(B, D, N, dtype=x.dtype)
    emu.coef(g, x, bases, G, cin, cout, c0, pxc, pcc, y if recon else None, EPS, inv_t, init=init, store_c0=store_c0,
             accum=accum, recon=recon, tf32=tf32)
    return g, cout, c0, pxc, pcc, y


# ---------------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------------
def test_geometry(emu, force_geom):
    g = emu.geom(2, 64, 1000, 16, torch.bfloat16, False)
    assert (g.RP, g.BN) == (16, 256) and g.T == 4 and 1 <= g.P <= g.T and g.work_floats > 0
    g = emu.geom(16, 512, 4096, 64, torch.bfloat16, False)
    assert (g.RP, g.BN, g.T) == (64, 128, 32)
    g = emu.geom(1, 512, 4096, 64, torch.float32, True)
    assert (g.RP, g.BN) == (64, 64)
    for R, RP in [(1, 16), (5, 16), (17, 32), (33, 64), (100, 128), (128, 128)]:
        assert emu.geom(1, 8, 8, R, torch.float32, False).RP == RP
    for R in (0, 129):
        with pytest.raises(RuntimeError, match="rank R"):
            emu.geom(1, 8, 8, R, torch.float32, False)
    force_geom(P=3, mtw=1)
    g = emu.geom(1, 40, 1000, 5, torch.float16, False)
    assert (g.BN, g.P) == (128, 3)


# ---------------------------------------------------------------------------------------------------------------
# bases update / Gram
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("R", [1, 5, 16, 64])
def test_bases_update(emu, R):
    B, D, P = 2, 37, 3
    g = emu.geom(B, D, 50, R, torch.float32, False)
    g.P = P
    RP = g.RP
    bin = make_bases(B, D, R)
    gen = torch.Generator().manual_seed(R)
    pxc = torch.rand(B, P, D, RP, generator=gen)
    pxc[..., R:] = 0
    cc = torch.rand(B, P, 7, R, generator=gen, dtype=torch.float64)
    pcc = pad_rr(cc.transpose(2, 3) @ cc, RP).float()
    for store_eh in (True, False):
        bout, G, work = nan(B, D, R), nan(B, RP, RP), nan(g.work_floats)
        E, H = (nan(B, D, R), nan(B, RP, RP)) if store_eh else (None, None)
        emu.bases(g, bin, bout, G, pxc, pcc, E, H, work, EPS, True, store_eh)
        Er = pxc.double().sum(1)[..., :R]
        Hr = pcc.double().sum(1)
        br = bin.double() * Er / (bin.double() @ Hr[:, :R, :R] + EPS)
        check("bout", bout, br, 1e-6)
        check("G", G, pad_rr(br.transpose(1, 2) @ br, RP), 1e-6)
        if store_eh:
            check("E", E, Er, 1e-6)
            check("H", H, Hr, 1e-6)
    # Gram only, with and without a workspace
    for work in (nan(g.work_floats), None):
        G = nan(B, RP, RP)
        emu.bases(g, bin, None, G, None, None, None, None, work, EPS, False, False)
        check("gram", G, pad_rr(bin.double().transpose(1, 2) @ bin.double(), RP), 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# coef pass
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", [1, 5, 16])
def test_coef(emu, force_geom, dtype, R):
    """Init + accum (step 0), a later step (cin) and the final pass (recon), several tiles per CTA, D-chunks not
    filled, N not a multiple of the tile; x layouts by R."""
    force_geom(P=2, mtw=1)
    B, D, N = 2, 41, 300
    layout = {1: "trans", 5: "slice", 16: "contig"}[R]
    x = make_x(B, D, N, dtype, layout, seed=R)
    bases = make_bases(B, D, R, seed=R + 1)
    g = emu.geom(B, D, N, R, dtype, False)
    assert g.T == 3 and g.P == 2
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), g.RP).float()
    rel = REL[_mode(dtype)]
    inv_t = 0.7
    # step 0: init + store_c0 + accum
    _, cout, c0, pxc, pcc, _ = _run_coef(emu, x, bases, G, None, init=True, store_c0=True, accum=True, recon=False,
                                         inv_t=inv_t, g=g)
    c, cn, E, H, _ = ref_coef(x, bases, G, None, True, inv_t)
    check("c0", c0, c, rel)
    check("cout", cout, cn, rel)
    check("pxc", pxc.double().sum(1)[..., :R], E, rel)
    assert (pxc[..., R:] == 0).all() and (pcc[:, :, R:] == 0).all() and (pcc[..., R:] == 0).all()
    check("pcc", pcc.double().sum(1)[:, :R, :R], H, rel)
    # a later step: cin given, accum + recon into a strided y
    cin = cout
    y = nan(B, N, 2 * D, dtype=dtype).transpose(1, 2)[:, ::2]  # d-stride 2 (elements), n-stride 2 D
    _, cout, _, pxc, pcc, y = _run_coef(emu, x, bases, G, cin, init=False, store_c0=False, accum=True, recon=True,
                                        g=g, y=y)
    _, cn, E, H, Y = ref_coef(x, bases, G, cin, False, 1.0)
    check("cout (cin)", cout, cn, rel)
    check("pxc (cin)", pxc.double().sum(1)[..., :R], E, rel)
    check("pcc (cin)", pcc.double().sum(1)[:, :R, :R], H, rel)
    check("y", y, Y, rel, OUT_REL[dtype])


def test_coef_rank64_and_tf32(emu, force_geom):
    force_geom(P=1)
    B, D, N, R = 1, 20, 70, 64
    x = make_x(B, D, N, torch.bfloat16, "offset", seed=3)
    bases = make_bases(B, D, R, seed=4)
    g = emu.geom(B, D, N, R, torch.bfloat16, False)
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), g.RP).float()
    _, cout, _, pxc, pcc, y = _run_coef(emu, x, bases, G, None, init=True, store_c0=False, accum=True, recon=True,
                                        g=g)
    _, cn, E, H, Y = ref_coef(x, bases, G, None, True, 1.0)
    rel = REL[torch.bfloat16]
    check("cout R64", cout, cn, rel)
    check("pxc R64", pxc.double().sum(1)[..., :R], E, rel)
    check("pcc R64", pcc.double().sum(1)[:, :R, :R], H, rel)
    check("y R64", y, Y, rel, OUT_REL[torch.bfloat16])
    # fp32 with TF32 allowed (L = 2) on the same problem
    xf = x.float()
    g = emu.geom(B, D, N, R, torch.float32, False)
    _, cout, _, pxc, _, y = _run_coef(emu, xf, bases, G, None, init=True, store_c0=False, accum=True, recon=True,
                                      g=g, tf32=True)
    check("cout tf32", cout, cn, REL["tf32"])
    check("y tf32", y, Y, REL["tf32"])


def test_coef_zero_rows_and_columns(emu, force_geom):
    """All-zero rows / columns of x (and an all-zero sample) give finite results equal to the reference."""
    force_geom(P=2, mtw=1)
    B, D, N, R = 2, 35, 140, 5
    x = make_x(B, D, N, torch.float32, seed=5)
    x[0, 3] = 0
    x[0, :, 7] = 0
    x[0, :, 130:] = 0
    x[1] = 0
    bases = make_bases(B, D, R, seed=6)
    g = emu.geom(B, D, N, R, torch.float32, False)
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), g.RP).float()
    _, cout, _, pxc, pcc, y = _run_coef(emu, x, bases, G, None, init=True, store_c0=False, accum=True, recon=True,
                                        g=g)
    _, cn, E, H, Y = ref_coef(x, bases, G, None, True, 1.0)
    check("cout", cout, cn, REL["fp32"])
    check("pxc", pxc.double().sum(1)[..., :R], E, REL["fp32"])
    check("y", y, Y, REL["fp32"])
    assert (cout[1] == 0).all() and (y[1] == 0).all()


def test_coef_more_ctas_than_tiles_write_zero_partials(emu):
    """P > T (not produced by nmf_make_geom, but allowed): a CTA without tiles writes zero partials."""
    B, D, N, R = 1, 16, 20, 3
    x = make_x(B, D, N, torch.bfloat16, seed=7)
    bases = make_bases(B, D, R, seed=8)
    g = emu.geom(B, D, N, R, torch.bfloat16, False)
    g.P = 3
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), g.RP).float()
    _, cout, _, pxc, pcc, _ = _run_coef(emu, x, bases, G, None, init=True, store_c0=False, accum=True, recon=False,
                                        g=g)
    assert (pxc[:, 1:] == 0).all() and (pcc[:, 1:] == 0).all()
    _, cn, E, _, _ = ref_coef(x, bases, G, None, True, 1.0)
    check("pxc", pxc.double().sum(1)[..., :R], E, REL[torch.bfloat16])


# ---------------------------------------------------------------------------------------------------------------
# backward stage
# ---------------------------------------------------------------------------------------------------------------
def _bwd_case(B, D, N, R, dtype, layout, seed):
    x = make_x(B, D, N, dtype, layout, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    bases = make_bases(B, D, R, seed=seed + 1)
    cprev = torch.softmax(torch.randn(B, N, R, generator=gen), -1)
    cnew = torch.rand(B, N, R, generator=gen)
    gy = torch.randn(B, D, N, generator=gen).to(dtype)
    gcin = torch.randn(B, N, R, generator=gen)
    ge = torch.randn(B, D, R, generator=gen) * 0.1
    s = torch.randn(B, R, R, generator=gen, dtype=torch.float64)
    return x, bases, cprev, cnew, gy, gcin, ge, s


def _run_bwd(emu, g, x, gy, bases, ge, cnew, gcin, S, cprev, G, *, final, init, store_gc, store_ga, tf32=False):
    B, D, N = x.shape
    R = bases.shape[-1]
    gcout, ga = (nan(B, N, R) if store_gc else None), (nan(B, N, R) if store_ga else None)
    pxg, pgg = nan(B, g.P, D, g.RP), nan(B, g.P, g.RP, g.RP)
    pgy = nan(B, g.P, D, g.RP) if (final and gy is not None) else None
    emu.bwd(g, x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg, EPS, 0.8, final=final, init=init,
            store_gc=store_gc, store_ga=store_ga, tf32=tf32)
    return gcout, ga, pxg, pgy, pgg


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", [1, 5, 16])
def test_bwd_stage(emu, force_geom, dtype, R):
    """Final stage (g_Y, gcin) and a step stage (g_E, S, gcin), each with and without the softmax backward."""
    force_geom(P=2)
    B, D, N = 2, 37, 300
    layout = {1: "slice", 5: "contig", 16: "trans"}[R]
    x, bases, cprev, cnew, gy, gcin, ge, s = _bwd_case(B, D, N, R, dtype, layout, seed=10 + R)
    g = emu.geom(B, D, N, R, dtype, True)
    assert g.T >= 3 and g.P == 2
    RP = g.RP
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), RP).float()
    S = pad_rr(s + s.transpose(1, 2), RP).float()
    rel = REL[_mode(dtype)]
    gyv = gy.transpose(1, 2).contiguous().transpose(1, 2) if R == 5 else gy  # strided g_Y too
    for final, init in [(True, False), (False, True)]:
        args = dict(gy=gyv if final else None, ge=None if final else ge, S=None if final else S)
        gc, ga, pxg, pgy, pgg = _run_bwd(emu, g, x, args["gy"], bases, args["ge"], cnew, gcin, args["S"], cprev, G,
                                         final=final, init=init, store_gc=True, store_ga=True)
        rgc, rga, rpxg, rpgy, rpgg = ref_bwd(x, args["gy"], bases, args["ge"], cnew, gcin, args["S"], cprev, G,
                                             final, init, 0.8)
        tag = f"final={final} init={init}"
        check(f"gcout {tag}", gc, rgc, rel)
        check(f"ga {tag}", ga, rga, rel)
        check(f"pxg {tag}", pxg.double().sum(1)[..., :R], rpxg, rel)
        check(f"pgg {tag}", pgg.double().sum(1)[:, :R, :R], rpgg, rel)
        assert (pxg[..., R:] == 0).all() and (pgg[:, :, R:] == 0).all() and (pgg[..., R:] == 0).all()
        if final:
            check(f"pgy {tag}", pgy.double().sum(1)[..., :R], rpgy, rel)


def test_bwd_stage_no_gy_rank64(emu, force_geom):
    """Final stage without g_Y (gcin only) and without storing g_C; R = 64 (tiny sizes)."""
    force_geom(P=1)
    B, D, N, R = 1, 18, 40, 64
    x, bases, cprev, cnew, gy, gcin, ge, s = _bwd_case(B, D, N, R, torch.float16, "contig", seed=30)
    g = emu.geom(B, D, N, R, torch.float16, True)
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), g.RP).float()
    gc, ga, pxg, pgy, pgg = _run_bwd(emu, g, x, None, bases, None, cnew, gcin, None, cprev, G, final=True, init=False,
                                     store_gc=False, store_ga=True)
    assert gc is None and pgy is None
    rgc, rga, rpxg, _, rpgg = ref_bwd(x, None, bases, None, cnew, gcin, None, cprev, G, True, False, 0.8)
    rel = REL[torch.float16]
    check("ga", ga, rga, rel)
    check("pxg", pxg.double().sum(1)[..., :R], rpxg, rel)
    check("pgg", pgg.double().sum(1)[:, :R, :R], rpgg, rel)


# ---------------------------------------------------------------------------------------------------------------
# g_X
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R", [1, 5, 16])
def test_gx(emu, dtype, R):
    B, D, N = 2, 133, 150  # two tiles along D and N, both partial
    gen = torch.Generator().manual_seed(40 + R)
    M1, M2 = 2, 1
    l1, r1 = torch.randn(M1, B, D, R, generator=gen), torch.randn(M1, B, N, R, generator=gen)
    l2, r2 = torch.randn(M2, B, D, R, generator=gen), torch.randn(M2, B, N, R, generator=gen)
    ref = sum(l1[m].double() @ r1[m].double().transpose(1, 2) for m in range(M1))
    ref = ref + sum(l2[m].double() @ r2[m].double().transpose(1, 2) for m in range(M2))
    gx = nan(B, D, N, dtype=dtype) if R != 5 else nan(B, N, D, dtype=dtype).transpose(1, 2)
    emu.gx(l1, r1, M1, l2, r2, M2, gx)
    check("gx", gx, ref, REL[_mode(dtype)], OUT_REL[dtype])
    if R == 16 and dtype == torch.float32:  # only the first group, TF32 allowed
        gx = nan(B, D, N, dtype=dtype)
        emu.gx(l1, r1, M1, None, None, 0, gx, tf32=True)
        check("gx tf32", gx, ref - l2[0].double() @ r2[0].double().transpose(1, 2), REL["tf32"])


# ---------------------------------------------------------------------------------------------------------------
# scheduling order, shared-memory fallbacks, errors
# ---------------------------------------------------------------------------------------------------------------
def test_scheduling_order_gives_identical_bits(emu, force_geom):
    """Ascending, descending and random fiber orders (and a rerun) give the same bits: no missing barrier."""
    force_geom(P=2, mtw=1)
    B, D, N, R = 1, 40, 200, 5
    x, bases, cprev, cnew, gy, gcin, ge, s = _bwd_case(B, D, N, R, torch.float16, "contig", seed=50)
    gf = emu.geom(B, D, N, R, torch.float16, False)
    gb = emu.geom(B, D, N, R, torch.float16, True)
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), gf.RP).float()
    S = pad_rr(s + s.transpose(1, 2), gf.RP).float()
    results = []
    try:
        for order in (0, 1, 2, 0):
            emu.order(order)
            _, cout, _, pxc, pcc, y = _run_coef(emu, x, bases, G, cprev, init=False, store_c0=False, accum=True,
                                                recon=True, g=gf)
            b1 = _run_bwd(emu, gb, x, gy, bases, None, cnew, gcin, None, cprev, G, final=True, init=True,
                          store_gc=True, store_ga=True)
            b2 = _run_bwd(emu, gb, x, None, bases, ge, cnew, gcin, S, cprev, G, final=False, init=False,
                          store_gc=True, store_ga=True)
            results.append([cout, pxc, pcc, y, *b1, *b2])
    finally:
        emu.order(0)
    for r in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], r)):
            if a is not None:
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"output {i} depends on the order"


def test_shared_memory_fallbacks(emu, force_geom):
    """With less shared memory the per-CTA R x R partial lives in global memory (same bits), and nmf_make_geom
    falls back to the narrower tile (MTW = 1) when the wide one does not fit."""
    force_geom(P=1)
    B, D, N, R = 1, 24, 90, 16
    x, bases, cprev, cnew, gy, gcin, ge, s = _bwd_case(B, D, N, R, torch.float32, "contig", seed=60)
    g = emu.geom(B, D, N, R, torch.float32, False)
    gb = emu.geom(B, D, N, R, torch.float32, True)
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), g.RP).float()
    full = _run_coef(emu, x, bases, G, cprev, init=False, store_c0=False, accum=True, recon=False, g=g)
    fullb = _run_bwd(emu, gb, x, gy, bases, None, cnew, gcin, None, cprev, G, final=True, init=False, store_gc=True,
                     store_ga=True)
    try:
        # between the layout sizes without / with the R x R accumulator in shared memory (fp32, RP 16: coef
        # kernel at BN 256 118784 / 119808 bytes, backward kernel at BN 128 118272 / 119296 bytes)
        emu.smem_limit(119000)
        part = _run_coef(emu, x, bases, G, cprev, init=False, store_c0=False, accum=True, recon=False, g=g)
        emu.smem_limit(118500)
        partb = _run_bwd(emu, gb, x, gy, bases, None, cnew, gcin, None, cprev, G, final=True, init=False,
                         store_gc=True, store_ga=True)
        emu.smem_limit(A100_SMEM)
        assert emu.geom(B, D, N, R, torch.float32, False).BN == g.BN
        emu.smem_limit(100000)
        assert emu.geom(B, D, N, R, torch.float32, False).BN == g.BN // 2
        emu.smem_limit(20000)
        with pytest.raises(RuntimeError, match="shared memory"):
            emu.geom(B, D, N, R, torch.float32, False)
    finally:
        emu.smem_limit(H100_SMEM)
    for a, b in zip(full[1:5], part[1:5]):
        if a is not None:
            assert torch.equal(a, b)
    for a, b in zip(fullb, partb):
        assert torch.equal(a, b)


def test_errors_and_empty(emu):
    B, D, N, R = 1, 8, 10, 3
    x = make_x(B, D, N, torch.float32)
    bases = make_bases(B, D, R)
    g = emu.geom(B, D, N, R, torch.float32, False)
    G = pad_rr(bases.double().transpose(1, 2) @ bases.double(), g.RP).float()
    with pytest.raises(RuntimeError, match="bad R"):
        bad = SimpleNamespace(**{**vars(g), "RP": 32})
        _run_coef(emu, x, bases, G, None, init=True, store_c0=False, accum=False, recon=False, g=bad)
    with pytest.raises(RuntimeError, match="BN"):
        bad = SimpleNamespace(**{**vars(g), "BN": 48})
        _run_coef(emu, x, bases, G, None, init=True, store_c0=False, accum=False, recon=False, g=bad)
    with pytest.raises(RuntimeError, match="null"):
        emu.coef(g, x, bases, G, None, nan(B, N, R), None, None, None, None, EPS, 1.0, init=False, store_c0=False,
                 accum=False, recon=False)
    # B * N == 0 launches nothing (and touches nothing)
    x0 = x[:, :, :0]
    cout = nan(B, 0, R)
    emu.coef(g, x0, bases, G, None, cout, None, None, None, None, EPS, 1.0, init=True, store_c0=False, accum=False,
             recon=False)


# ---------------------------------------------------------------------------------------------------------------
# end to end: segnext_kernels.nmf_driver over the emulated kernels vs nmf2d_reference (float64)
# ---------------------------------------------------------------------------------------------------------------
class EmuKernels:
    """The kernels object of segnext_kernels.nmf_driver, over the emulated CUDA launchers (CPU tensors)."""

    def __init__(self, emu, tf32=False):
        self.emu = emu
        self.tf32 = tf32

    def config(self, B, D, N, R, device, dtype, backward):
        return self.emu.geom(B, D, N, R, dtype, backward)

    @staticmethod
    def empty(*shape, dtype, device):
        return nan(*shape, dtype=dtype)

    @staticmethod
    def acc_dtype(dtype):
        return torch.float32

    def gram(self, cfg, bases, G):
        self.emu.bases(cfg, bases, None, G, None, None, None, None, None, EPS, False, False)

    def bases_update(self, cfg, bin, bout, G, pxc, pcc, E, H, eps, store_eh, work):
        self.emu.bases(cfg, bin, bout, G, pxc, pcc, E, H, work, eps, True, store_eh)

    def coef(self, cfg, x, bases, G, cin, cout, c0, pxc, pcc, y, eps, inv_t, *, init, store_c0, accum, recon):
        self.emu.coef(cfg, x, bases, G, cin, cout, c0, pxc, pcc, y, eps, inv_t, init=init, store_c0=store_c0,
                      accum=accum, recon=recon, tf32=self.tf32)

    def bwd_stage(self, cfg, x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg, eps, inv_t, *,
                  final, init, store_gc, store_ga):
        self.emu.bwd(cfg, x, gy, bases, ge, cnew, gcin, S, cprev, G, gcout, ga, pxg, pgy, pgg, eps, inv_t,
                     final=final, init=init, store_gc=store_gc, store_ga=store_ga, tf32=self.tf32)

    def gx(self, cfg, l1, r1, m1, l2, r2, m2, gx):
        self.emu.gx(l1, r1, m1, l2, r2, m2, gx, tf32=self.tf32)


def _driver():
    try:
        from segnext_kernels.nmf import driver as nmf_driver
        from segnext_kernels.nmf.reference import nmf2d_reference
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"driver or reference not importable: {e}")
    return nmf_driver, nmf2d_reference


E2E_REL = {"fp32": 2e-5, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("mode", ["unrolled", "one_step"])
def test_end_to_end(emu, force_geom, K, mode):
    nmf_driver, nmf2d_reference = _driver()
    force_geom(P=2, mtw=1)
    B, D, N, R = 2, 36, 150, 5
    dtype = torch.bfloat16 if (K == 1 and mode == "unrolled") else torch.float32
    x = make_x(B, D, N, dtype, "contig", seed=70 + K)
    bases0 = make_bases(B, D, R, seed=71 + K)
    gen = torch.Generator().manual_seed(72 + K)
    gy = torch.randn(B, D, N, generator=gen, dtype=torch.float64).to(dtype).double()  # exact in x's dtype
    gcoef = torch.randn(B, N, R, generator=gen, dtype=torch.float64) * 0.1
    gbases = torch.randn(B, D, R, generator=gen, dtype=torch.float64) * 0.1
    inv_t = 1.0
    kern = EmuKernels(emu)
    y, bK, cF, saved = nmf_driver.nmf_forward(kern, x, bases0, K, EPS, inv_t, save=mode)
    gx, gb = nmf_driver.nmf_backward(kern, gy.to(dtype), gbases.float(), gcoef.float(), x, saved, mode, K, EPS, inv_t,
                                     True, True)

    xr = x.double().requires_grad_(True)
    br = bases0.double().requires_grad_(True)
    yr, bKr, cFr = nmf2d_reference(xr, br, K, eps=EPS, inv_t=inv_t, grad_mode=mode, return_state=True)
    # one_step with K >= 1: bases_K is a constant of the graph (its incoming gradient is dropped, as in the driver)
    outs = [(t, g) for t, g in ((yr, gy), (bKr, gbases), (cFr, gcoef)) if t.requires_grad]
    gxr, gbr = torch.autograd.grad([t for t, _ in outs], (xr, br), [g for _, g in outs], allow_unused=True)
    rel = E2E_REL[_mode(dtype)]
    check("y", y, yr.detach(), rel, OUT_REL[dtype])
    check("bases_K", bK, bKr.detach(), rel)
    check("coef_F", cF, cFr.detach(), rel)
    check("g_x", gx, gxr, rel, OUT_REL[dtype])
    if gbr is None:
        assert gb is None
    else:
        check("g_bases", gb, gbr, rel)
