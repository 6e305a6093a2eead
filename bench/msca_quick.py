"""Quick MSCA benchmark on one GPU: fused CUDA and Triton backends against eager PyTorch and torch.compile.

bf16, SegNeXt stage shapes at ADE20K 512x512 batch 16 and Cityscapes 2048x1024 stage 1; forward and forward+backward
(all gradients); median of ``triton.testing.do_bench`` (CUDA events, warm-up), u rotated over enough buffers to
exceed twice the L2 size. Writes a CSV (device, driver, torch, triton, CUDA, git commit, date on every row) and
prints a table with speedups against eager NCHW.

    python3 bench/msca_quick.py [--out bench/results] [--budget-s 240] [--no-compile] [--modes fwd,fwdbwd]
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {
    "ade_s1": (16, 64, 128, 128),
    "ade_s2": (16, 128, 64, 64),
    "ade_s3": (16, 320, 32, 32),
    "ade_s4": (16, 512, 16, 16),
    "city_s1": (1, 64, 256, 512),
}
#: cuda_cl: channels_last u through the cuda backend (tile loads from an NCHW copy); cuda_cl_direct: the same with
#: SEGNEXT_MSCA_CUDA_CL_DIRECT=1 (tile loads straight from the channels_last tensor)
BACKENDS = ("cuda", "cuda_cl", "cuda_cl_direct", "triton", "eager_nchw", "eager_cl", "compile")


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    import triton

    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "no-commit"
    if _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "-dirty"
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
    return {
        "device": torch.cuda.get_device_name(),
        "driver": driver[0] if driver else "unknown",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def make_inputs(shape, dtype, device):
    from segnext_kernels.msca_reference import strip_weight_shapes

    B, C, H, W = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    w0, b0 = r(C, 1, 5, 5, scale=0.2), r(C, scale=0.5)
    sw = [r(*s, scale=0.25) for s in strip_weight_shapes(C)]
    sb = [r(C, scale=0.5) for _ in range(6)]
    w3, b3 = r(C, C, 1, 1, scale=C ** -0.5), r(C, scale=0.5)
    # rotate u over enough buffers to defeat the L2 (about 2x its size)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
    nbytes = B * C * H * W * torch.finfo(dtype).bits // 8
    n_rot = max(1, min(8, math.ceil(2 * l2 / nbytes)))
    us = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(n_rot)]
    return us, [w0, b0, sw, sb, w3, b3]


def make_fn(backend, mode, us, weights):
    fn = _make_fn(backend, mode, us, weights)
    if backend != "cuda_cl_direct":
        return fn

    def direct():  # the binding reads the variable at every call, forward and backward
        os.environ["SEGNEXT_MSCA_CUDA_CL_DIRECT"] = "1"
        try:
            return fn()
        finally:
            os.environ.pop("SEGNEXT_MSCA_CUDA_CL_DIRECT", None)
    return direct


def _make_fn(backend, mode, us, weights):
    import segnext_kernels
    from segnext_kernels.msca_reference import msca_reference

    w0, b0, sw, sb, w3, b3 = weights
    if backend in ("eager_cl", "cuda_cl", "cuda_cl_direct"):
        us = [u.contiguous(memory_format=torch.channels_last) for u in us]
    if backend.startswith("cuda") or backend == "triton":
        name = "triton" if backend == "triton" else "cuda"

        def op(u, *ws):
            return segnext_kernels.msca(u, *ws, backend=name)
    elif backend in ("eager_nchw", "eager_cl"):
        op = msca_reference
    elif backend == "compile":
        op = torch.compile(msca_reference, dynamic=False)
    else:
        raise ValueError(backend)
    state = {"i": 0}
    if mode == "fwd":
        def fn():
            u = us[state["i"] % len(us)]
            state["i"] += 1
            with torch.no_grad():
                return op(u, w0, b0, sw, sb, w3, b3)
        return fn
    leaves = [w0, b0, *sw, *sb, w3, b3]
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    us = [u.detach().requires_grad_(True) for u in us]
    grad = torch.randn_like(us[0])

    def fn():
        u = us[state["i"] % len(us)]
        state["i"] += 1
        out = op(u, leaves[0], leaves[1], leaves[2:8], leaves[8:14], leaves[14], leaves[15])
        return torch.autograd.grad(out, [u, *leaves], grad)
    return fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new measurements after this")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("msca_quick: needs a CUDA device")
        return 1
    import triton.testing

    env = environment()
    print("environment:", env)
    device = torch.device("cuda")
    dtype = torch.bfloat16
    backends = [b for b in args.backends.split(",") if b and not (args.no_compile and b == "compile")]
    rows = []
    t_start = time.time()
    # torch.compile compiles for minutes: measure every other backend on every shape first, then compile
    passes = [[b for b in backends if b != "compile"], [b for b in backends if b == "compile"]]
    for pass_backends in passes:
        if not pass_backends:
            continue
        for shape_name in args.shapes.split(","):
            shape = SHAPES[shape_name]
            us, weights = make_inputs(shape, dtype, device)
            E = math.prod(shape)
            for mode in args.modes.split(","):
                for backend in pass_backends:
                    row = dict(env, shape_name=shape_name, shape="x".join(map(str, shape)), dtype="bf16", mode=mode,
                               backend=backend, median_ms="", p20_ms="", p80_ms="", speedup_vs_eager_nchw="",
                               gbytes_per_s="", status="ok")
                    rows.append(row)
                    if time.time() - t_start > args.budget_s:
                        row["status"] = "skipped (time budget)"
                        continue
                    try:
                        fn = make_fn(backend, mode, us, weights)
                        fn()  # build / compile / autotune outside the timing
                        torch.cuda.synchronize()
                        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
                        row.update(median_ms=f"{med:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}")
                        # minimum HBM traffic: read u, write out (fwd); + read u, g, write du (bwd), 2 bytes each
                        nbytes = 2 * E * (2 if mode == "fwd" else 5)
                        row["gbytes_per_s"] = f"{nbytes / (med * 1e-3) / 1e9:.1f}"
                    except Exception as e:  # report and go on: one broken baseline must not hide the others
                        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    print(f"{shape_name:8s} {mode:6s} {backend:14s} {row['median_ms']:>10s} ms  {row['status']}",
                          flush=True)
            del us, weights
            torch.cuda.empty_cache()
    for row in rows:
        base = next((r for r in rows if r["shape_name"] == row["shape_name"] and r["mode"] == row["mode"]
                     and r["backend"] == "eager_nchw" and r["median_ms"]), None)
        if base and row["median_ms"]:
            row["speedup_vs_eager_nchw"] = f"{float(base['median_ms']) / float(row['median_ms']):.2f}"

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")
    path = out_dir / f"msca_quick_{stamp}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{'shape':8s} {'mode':6s} " + " ".join(f"{b[:14]:>14s}" for b in backends)
          + "   (median ms, x speedup vs eager_nchw)")
    for shape_name in args.shapes.split(","):
        for mode in args.modes.split(","):
            cells = []
            for b in backends:
                r = next((r for r in rows if r["shape_name"] == shape_name and r["mode"] == mode and r["backend"] == b),
                         None)
                if r is None or not r["median_ms"]:
                    cells.append(f"{'-':>14s}")
                else:
                    sp = f"x{r['speedup_vs_eager_nchw']}" if r["speedup_vs_eager_nchw"] else ""
                    cells.append(f"{float(r['median_ms']):7.3f}{sp:>7s}")
            print(f"{shape_name:8s} {mode:6s} " + " ".join(cells))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
