"""Every Triton kernel the package launches (MSCA; NMF at R = 16 and R = 64) compiles for sm_90 and sm_80 (no GPU
needed), and none spills registers. See tests/helpers/triton_aot.py; its table (registers, stack per kernel) is printed with
``-s``.

The kernels are compiled as the Triton JIT compiles them on a GPU for the package's launches (``--specialize``: ints
equal to 1 become constants, ints and pointers divisible by 16 get that divisibility; the register allocation
depends on it): MSCA at a SegNeXt stage shape (C, H*W multiples of 16) and at an odd shape (arbitrary image sizes),
NMF with contiguous x at R = 16 (SegNeXt-T/S) and R = 64 (SegNeXt-B/L). The bar: every kernel compiles for sm_90 and
sm_80 in bf16 and fp32 with no stack frame (no spills), and in fp64 (gradcheck only; its stack is reported, not
judged). Registers and stack depend on the Triton/ptxas version (CI: the newest Triton); run the tool on the GPU
machine's stack too (bench/gpu_check.sh).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AOT = Path(__file__).resolve().parents[1] / "helpers" / "triton_aot.py"
#: (name, triton_aot.py arguments). The compiles are per distinct specialisation; --jobs uses every core.
RUNS = (
    ("msca", ["--arch", "90,80", "--dtypes", "bf16,fp32", "--kernels", "msca", "--specialize", "--msca-shape",
              "segnext"]),
    ("msca_odd", ["--arch", "90,80", "--dtypes", "bf16,fp32", "--kernels", "msca", "--specialize", "--msca-shape",
                  "odd"]),
    # the other stage geometries (several tiles each way, one tile per image, batch 1; see MSCA_SHAPES), sm_90 only
    *((f"msca_{sh}", ["--arch", "90", "--dtypes", "bf16,fp32", "--kernels", "msca", "--specialize", "--msca-shape", sh])
      for sh in ("multi", "stage4", "batch1")),
    ("nmf", ["--arch", "90,80", "--dtypes", "bf16,fp32", "--kernels", "nmf", "--ranks", "16,64", "--specialize"]),
    ("fp64", ["--arch", "90", "--dtypes", "fp64", "--ranks", "16"]),
)


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = []
    for name, args in RUNS:
        p = subprocess.run([sys.executable, str(AOT), *args, "--json"], capture_output=True, text=True, env=env,
                           timeout=900)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
        assert lines, (f"triton_aot.py {name} printed no JSON (exit {p.returncode}):\n{p.stdout[-3000:]}\n"
                       f"{p.stderr[-3000:]}")
        res += [dict(r, run=name) for r in json.loads(lines[-1])]
    for r in res:
        rk = f"R={r['rank']}" if r["rank"] else ""
        print(f"{r['kernel']:24s} {rk:5s} {r['dtype']:5s} {r['arch']:6s} {'spec' if r['specialized'] else 'gen '} "
              f"regs {r['regs']} stack {r['stack']} {r['error'] or ''}")
    return res


def test_every_kernel_compiles_for_sm90_and_sm80(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"_msca_fwd_kernel", "_msca_bwd_mix_kernel", "_msca_bwd_w3_kernel", "_msca_bwd_dw_kernel",
            "_nmf_bases_kernel", "_nmf_coef_kernel", "_nmf_bwd_kernel", "_nmf_gx_kernel"} <= kernels
    assert {(r["arch"], r["dtype"]) for r in rows} >= {("sm_90", "bf16"), ("sm_80", "bf16"), ("sm_90", "fp32"),
                                                       ("sm_80", "fp32"), ("sm_90", "fp64")}
    nmf = {(r["kernel"], r["rank"], r["arch"], r["dtype"]) for r in rows if r["run"] == "nmf"}
    # _nmf_bases_kernel works on the fp32 bases whatever x's dtype: compiled once per (R, arch), under the first dtype
    assert {(k, R, a, d) for k in ("_nmf_coef_kernel", "_nmf_bwd_kernel", "_nmf_gx_kernel")
            for R in (16, 64) for a in ("sm_90", "sm_80") for d in ("bf16", "fp32")} <= nmf
    assert {("_nmf_bases_kernel", R, a) for R in (16, 64) for a in ("sm_90", "sm_80")} <= {n[:3] for n in nmf}
    errors = [f"{r['kernel']} {r['dtype']} {r['arch']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)


def test_msca_kernels_spill_free(rows):
    msca = [r for r in rows if r["run"].startswith("msca")]
    assert {(r["kernel"], r["run"], r["arch"], r["dtype"]) for r in msca} >= {
        (k, run, a, d) for k in ("_msca_fwd_kernel", "_msca_bwd_mix_kernel", "_msca_bwd_dw_kernel")
        for run in ("msca", "msca_odd") for a in ("sm_90", "sm_80") for d in ("bf16", "fp32")} | {
        (k, f"msca_{sh}", "sm_90", d) for k in ("_msca_fwd_kernel", "_msca_bwd_mix_kernel", "_msca_bwd_dw_kernel")
        for sh in ("multi", "stage4", "batch1") for d in ("bf16", "fp32")}
    spills = [f"{r['kernel']} ({r['run']}) {r['dtype']} {r['arch']}: {r['regs']} registers, stack {r['stack']} B"
              for r in msca if r["stack"] or r["local"]]
    assert not spills, "\n".join(spills)


def test_nmf_kernels_spill_free_at_segnext_ranks(rows):
    # R = 64 is SegNeXt-B/L's rank: (BN, 64) fp32 tiles, where the first geometry spilled (255 registers, 160-200 B)
    nmf = [r for r in rows if r["run"] == "nmf"]
    assert {r["rank"] for r in nmf} == {16, 64}
    spills = [f"{r['kernel']} R={r['rank']} {r['dtype']} {r['arch']}: {r['regs']} registers, stack {r['stack']} B"
              for r in nmf if r["stack"] or r["local"]]
    assert not spills, "\n".join(spills)
