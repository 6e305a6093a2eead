"""Compile every Triton kernel this package launches for real GPU targets, on a machine without a GPU.

The Triton interpreter (how CI runs the kernels) is looser than the compiler: it accepts code that does not compile
and says nothing about registers. This tool closes that gap. It imports the kernels as real JIT functions (run it
WITHOUT ``TRITON_INTERPRET=1``), drives the launchers ``msca_triton.forward/backward`` and
``nmf_triton.nmf_forward/nmf_backward`` (at each NMF rank in ``--ranks``: 16 for SegNeXt-T/S, 64 for SegNeXt-B/L)
on CPU tensors with the GPU tile geometry while recording the kernel launches instead of running them, then compiles
each distinct (kernel, signature, constexprs, attributes, num_warps) ahead of time with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` and reads registers / stack / spills from the cubin with
the cuobjdump that ships in the triton package.

``--specialize`` compiles what the JIT compiles on a GPU for the recorded arguments (an int equal to 1 becomes a
constexpr, ints and pointers divisible by 16 get ``tt.divisibility = 16``); without it every argument is generic.
The two register allocations differ, in both directions: the NMF kernels are judged specialised (their SegNeXt
launches: contiguous x, R = 16 / 64), the MSCA ones so far generic.

Usage: ``python tests/helpers/triton_aot.py [--arch 90,80] [--dtypes bf16,fp32] [--kernels nmf] [--ranks 16,64]
[--specialize] [--jobs N] [--json]``; exit 1 on a compile error or a stack frame (register spills) in any kernel
compiled for fp32/fp16/bf16. fp64 variants (used by gradcheck only) must compile; their stack is reported, not
judged. ``tests/compile/test_triton_compile.py`` runs it in CI.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot.py compiles real kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from segnext_kernels.msca import triton as msca_triton
from segnext_kernels.nmf import triton as nmf_triton  # noqa: E402
from segnext_kernels.msca.reference import pack_weights, strip_weight_shapes  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
       torch.int32: "i32", torch.int64: "i64"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def record_launches(call) -> list:
    """Run ``call()`` with every ``kernel[grid](...)`` recorded as (kernel, args, kwargs) instead of launched."""
    launches = []
    orig = JITFunction.__getitem__

    def getitem(self, grid):
        return lambda *args, **kwargs: launches.append((self, args, kwargs))

    JITFunction.__getitem__ = getitem
    try:
        call()
    finally:
        JITFunction.__getitem__ = orig
    return launches


def _spec(kernel, args, kwargs, specialize=False):
    """(signature, constexprs, attrs, options) of a recorded launch. ``specialize``: what the JIT compiles on a GPU
    for these arguments -- an int equal to 1 becomes a constexpr, ints and pointers divisible by 16 get
    ``tt.divisibility = 16`` (x contiguous along N, R = 16 / 64: vectorised loads, a different register
    allocation). Without it every argument is generic, which no launch with SegNeXt's shapes compiles."""
    vals = dict(zip(kernel.arg_names, args))
    vals.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = vals[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[(i,)] = v
        elif specialize and not isinstance(v, (bool, float)):
            # as the JIT: do_not_specialize / do_not_specialize_on_alignment of @triton.jit switch either part off
            ty, attr = native_specialize_impl(CUDABackend, v, False, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment)
            if ty == "constexpr":
                sig[p.name] = "constexpr"
                const[(i,)] = v
            else:
                sig[p.name] = ty
                if attr:
                    attrs[(i,)] = CUDABackend.parse_attr(attr)
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TY[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {p.name}={v!r}")
    return sig, const, attrs, options


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)))


def _msca_inputs(dtype, B=2, C=40, H=37, W=45):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    u = r(B, C, H, W)
    pk = pack_weights(r(C, 1, 5, 5), r(C), [r(*s) for s in strip_weight_shapes(C)], [r(C) for _ in range(6)],
                      r(C, C, 1, 1), r(C), torch.float64 if dtype == torch.float64 else torch.float32)
    return u, pk


#: NMF ranks driven by default: R = 16 (SegNeXt-T/S) and R = 64 (SegNeXt-B/L, official configs). The (B, D, N) shape
#: per rank: N = 300 (not a multiple of 16) at R = 16; N = 320 at R = 64, so that x, N and the (N, R) buffers get the
#: 16-divisibility they have in SegNeXt-B/L (N = H/8 * W/8 = 4096 at 512 x 512). Only divisibility and ==1 reach the
#: compiled code, not the sizes themselves.
NMF_RANKS = (16, 64)
NMF_SHAPES = {16: (2, 48, 300), 64: (2, 48, 320)}


#: MSCA input shapes (B, C, H, W): "segnext" is a SegNeXt stage (C and H*W multiples of 16, as at every stage of
#: 512 x 512 and 2048 x 1024 inputs: the JIT then specialises strides and sizes as divisible by 16); "odd" has no
#: such divisibility (whole-image inference at arbitrary sizes). What else reaches the compiled code: the tile sizes
#: (min of the GPU tile and H, W) and ints equal to 1 (one tile per row or column, batch 1): "multi" has several
#: tiles each way (stages 1-3 at 512 x 512), "stage4" one 16 x 16 tile per image (stage 4 at 512 x 512, C = 512),
#: "batch1" B = 1 with several tiles (Cityscapes 2048 x 1024).
MSCA_SHAPES = {"segnext": (2, 64, 32, 32), "odd": (2, 40, 37, 45), "multi": (2, 64, 64, 64), "stage4": (2, 512, 16, 16),
               "batch1": (1, 64, 64, 128)}


def msca_launches(dtype, shape="odd") -> list:
    """Every kernel launch of the MSCA launchers for ``dtype`` at ``MSCA_SHAPES[shape]`` (GPU geometry; nothing
    runs)."""
    u, pk = _msca_inputs(dtype, *MSCA_SHAPES[shape])
    out = record_launches(lambda: msca_triton.forward(u, *pk))
    out += record_launches(lambda: msca_triton.backward(torch.randn_like(u), u, *pk, (True,) * 7))
    return out


def nmf_launches(dtype, R=16, shape=None) -> list:
    """Every kernel launch of ``nmf_forward`` / ``nmf_backward`` at rank R (both grad modes, K = 2 steps so that
    the first, middle and last step / stage variants all launch)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    B, D, N = shape or NMF_SHAPES.get(R, (2, 48, 300))
    x = torch.rand(B, D, N).to(dtype)
    bases = torch.nn.functional.normalize(torch.rand(B, D, R), dim=1).to(cdt)
    out = []
    for mode in ("unrolled", "one_step"):
        state = {}

        def fwd():
            state["res"] = nmf_triton.nmf_forward(x, bases, 2, 1e-6, 1.0, save=mode)

        out += record_launches(fwd)
        y, bk, cf, saved = state["res"]
        out += record_launches(lambda: nmf_triton.nmf_backward(torch.randn_like(y), None, None, x, saved, mode, 2,
                                                               1e-6, 1.0, True, True))
    return out


def launches_for(dtype, ranks=NMF_RANKS, msca_shape="odd") -> list:
    """(rank, kernel, args, kwargs) for every MSCA launch (rank None) and every NMF launch at each rank."""
    out = [(None, *launch) for launch in msca_launches(dtype, msca_shape)]
    for R in ranks:
        out += [(R, *launch) for launch in nmf_launches(dtype, R)]
    return out


_COMPILE_QUEUE: list = []  # (kernel, signature, constexprs, attrs, options, arch): read by the forked compile workers


def _compile_one(i: int) -> dict:
    kernel, sig, const, attrs, options, arch = _COMPILE_QUEUE[i]
    t0 = time.time()
    try:
        src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        row = dict(_resources(k.asm["cubin"]), shared=k.metadata.shared, error=None)
    except Exception as e:  # a compile error is the finding: report it whole
        row = dict(regs=None, stack=None, local=None, shared=None, error=f"{type(e).__name__}: {e}"[:2000])
    row["seconds"] = round(time.time() - t0, 1)
    return row


def compile_all(archs, dtypes, verbose=True, only=None, ranks=NMF_RANKS, specialize=False, jobs=1,
                msca_shape="odd") -> list:
    """Compile the launched kernels (names containing ``only``, if given) for each arch and dtype, the NMF ones at
    each rank in ``ranks``; ``jobs`` > 1 compiles in that many forked processes. Rows in launch order."""
    seen, meta = set(), []
    _COMPILE_QUEUE.clear()
    for dname in dtypes:
        for rank, kernel, args, kwargs in launches_for(DTYPES[dname], ranks, msca_shape):
            if only and only not in kernel.__name__:
                continue
            sig, const, attrs, options = _spec(kernel, args, kwargs, specialize)
            key = (kernel.__name__, tuple(sig.items()), tuple(sorted((k, str(v)) for k, v in const.items())),
                   tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            for arch in archs:
                meta.append(dict(kernel=kernel.__name__, dtype=dname, arch=f"sm_{arch}", rank=rank,
                                 specialized=specialize, num_warps=options.get("num_warps", 4)))
                _COMPILE_QUEUE.append((kernel, sig, const, attrs, options, arch))
    if jobs > 1 and len(_COMPILE_QUEUE) > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as ex:
            results = ex.map(_compile_one, range(len(_COMPILE_QUEUE)))
            rows = [dict(m, **r) for m, r in zip(meta, results)]
    else:
        rows = [dict(m, **_compile_one(i)) for i, m in enumerate(meta)]
    if verbose:
        for row in rows:
            res = row["error"] or f"regs {row['regs']:3d}  stack {row['stack']:5d} B  smem {row['shared']} B"
            rk = f"R={row['rank']}" if row["rank"] else ""
            print(f"{row['kernel']:24s} {rk:5s} {row['dtype']:5s} {row['arch']:6s} warps {row['num_warps']:2d}  {res}"
                  f"  ({row['seconds']} s)", flush=True)
    return rows


def failures(rows) -> list:
    bad = [r for r in rows if r["error"]]
    bad += [r for r in rows if not r["error"] and r["dtype"] != "fp64" and (r["stack"] or r["local"])]
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90,80")
    ap.add_argument("--dtypes", default="bf16,fp32", help=f"subset of {','.join(DTYPES)}")
    ap.add_argument("--kernels", default=None, help="only kernels whose name contains this, e.g. msca or nmf")
    ap.add_argument("--ranks", default=",".join(map(str, NMF_RANKS)), help="NMF ranks R to drive, e.g. 16,64")
    ap.add_argument("--specialize", action="store_true",
                    help="specialise the arguments as the JIT does on a GPU (==1 -> constexpr, divisibility by 16)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    ap.add_argument("--msca-shape", default="odd", choices=sorted(MSCA_SHAPES),
                    help="MSCA input shape: " + ", ".join(f"{k} {v}" for k, v in MSCA_SHAPES.items()))
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on the last line")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = compile_all([int(a) for a in args.arch.split(",")], args.dtypes.split(","), verbose=not args.json,
                       only=args.kernels, ranks=[int(r) for r in args.ranks.split(",") if r],
                       specialize=args.specialize, jobs=args.jobs, msca_shape=args.msca_shape)
    bad = failures(rows)
    if args.json:
        print(json.dumps(rows))
    for r in bad:
        why = r["error"] or f"stack frame {r['stack']} B, local {r['local']} B (register spills)"
        rk = f" R={r['rank']}" if r["rank"] else ""
        print(f"FAIL {r['kernel']}{rk} {r['dtype']} {r['arch']}: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
