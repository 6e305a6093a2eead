"""Compile every Triton kernel this package launches for real GPU targets, on a machine without a GPU.

The Triton interpreter (how CI runs the kernels) is looser than the compiler: it accepts code that does not compile
and says nothing about registers. This tool closes that gap. It imports the kernels as real JIT functions (run it
WITHOUT ``TRITON_INTERPRET=1``), drives the launchers ``msca_triton.msca_forward/msca_backward`` and
``nmf_triton.nmf_forward/nmf_backward`` on CPU tensors with the GPU tile geometry while recording the kernel launches
instead of running them, then compiles each distinct (kernel, signature, constexprs, num_warps) ahead of time with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` and reads registers / stack / spills from the cubin with
the cuobjdump that ships in the triton package.

Usage: ``python tests/triton_aot.py [--arch 90,80] [--dtypes bf16,fp32] [--json]``; exit 1 on a compile error or a
stack frame (register spills) in any kernel compiled for fp32/fp16/bf16. fp64 variants (used by gradcheck only)
must compile; their stack is reported, not judged. ``tests/test_triton_compile.py`` runs it in CI.
"""
from __future__ import annotations

import argparse
import json
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
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from segnext_kernels import msca_triton, nmf_triton  # noqa: E402
from segnext_kernels.msca_reference import pack_weights, strip_weight_shapes  # noqa: E402

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


def _spec(kernel, args, kwargs):
    vals = dict(zip(kernel.arg_names, args))
    vals.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    sig, const = {}, {}
    for i, p in enumerate(kernel.params):
        v = vals[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[(i,)] = v
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
    return sig, const, options


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


def launches_for(dtype) -> list:
    """Every kernel launch of the MSCA and NMF launchers for ``dtype`` (GPU geometry; nothing runs)."""
    u, pk = _msca_inputs(dtype)
    out = record_launches(lambda: msca_triton.msca_forward(u, *pk))
    out += record_launches(lambda: msca_triton.msca_backward(torch.randn_like(u), u, *pk, (True,) * 7))
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.rand(2, 48, 300).to(dtype)
    bases = torch.nn.functional.normalize(torch.rand(2, 48, 16), dim=1).to(cdt)
    for mode in ("unrolled", "one_step"):
        state = {}

        def fwd():
            state["res"] = nmf_triton.nmf_forward(x, bases, 2, 1e-6, 1.0, save=mode)

        out += record_launches(fwd)
        y, bk, cf, saved = state["res"]
        out += record_launches(lambda: nmf_triton.nmf_backward(torch.randn_like(y), None, None, x, saved, mode, 2,
                                                               1e-6, 1.0, True, True))
    return out


def compile_all(archs, dtypes, verbose=True, only=None) -> list:
    """Compile the launched kernels (names containing ``only``, if given) for each arch and dtype."""
    seen, rows = set(), []
    for dname in dtypes:
        for kernel, args, kwargs in launches_for(DTYPES[dname]):
            if only and only not in kernel.__name__:
                continue
            sig, const, options = _spec(kernel, args, kwargs)
            key = (kernel.__name__, tuple(sig.items()), tuple(sorted((k, str(v)) for k, v in const.items())),
                   tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            for arch in archs:
                t0 = time.time()
                row = dict(kernel=kernel.__name__, dtype=dname, arch=f"sm_{arch}",
                           num_warps=options.get("num_warps", 4))
                try:
                    src = ASTSource(fn=kernel, signature=sig, constexprs=const)
                    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    row.update(_resources(k.asm["cubin"]), shared=k.metadata.shared, error=None)
                except Exception as e:  # a compile error is the finding: report it whole
                    row.update(regs=None, stack=None, shared=None, error=f"{type(e).__name__}: {e}"[:2000])
                row["seconds"] = round(time.time() - t0, 1)
                rows.append(row)
                if verbose:
                    res = row["error"] or f"regs {row['regs']:3d}  stack {row['stack']:5d} B  smem {row['shared']} B"
                    print(f"{row['kernel']:24s} {dname:5s} {row['arch']:6s} warps {row['num_warps']:2d}  {res}"
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
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on the last line")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = compile_all([int(a) for a in args.arch.split(",")], args.dtypes.split(","), verbose=not args.json,
                       only=args.kernels)
    bad = failures(rows)
    if args.json:
        print(json.dumps(rows))
    for r in bad:
        why = r["error"] or f"stack frame {r['stack']} B, local {r['local']} B (register spills)"
        print(f"FAIL {r['kernel']} {r['dtype']} {r['arch']}: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
