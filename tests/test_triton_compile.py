"""Every Triton kernel the package launches (MSCA and NMF, NMF at R = 16) compiles for sm_90 and sm_80 (no GPU
needed), and the hot ones do not spill registers. See tests/triton_aot.py; its table (registers, stack per kernel) is printed with ``-s``.

The bar: every kernel compiles for sm_90 and sm_80 in bf16, fp32 and fp64; on sm_90 in bf16 (the production
target) no kernel has a stack frame; the one-pass MSCA forward has none on either architecture in bf16 or fp32.
Other stack frames are reported, not failed (README, "What has been verified").
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AOT = Path(__file__).with_name("triton_aot.py")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = []
    for arch, dtypes in (("90,80", "bf16,fp32"), ("90", "fp64")):
        p = subprocess.run([sys.executable, str(AOT), "--arch", arch, "--dtypes", dtypes, "--json"],
                           capture_output=True, text=True, env=env, timeout=900)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
        assert lines, f"triton_aot.py printed no JSON (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        res += json.loads(lines[-1])
    for r in res:
        print(f"{r['kernel']:24s} {r['dtype']:5s} {r['arch']:6s} regs {r['regs']} stack {r['stack']} "
              f"{r['error'] or ''}")
    return res


def test_every_kernel_compiles_for_sm90_and_sm80(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"_msca_fwd_kernel", "_msca_bwd_mix_kernel", "_msca_bwd_w3_kernel", "_msca_bwd_dw_kernel",
            "_nmf_bases_kernel", "_nmf_coef_kernel", "_nmf_bwd_kernel", "_nmf_gx_kernel"} <= kernels
    assert {(r["arch"], r["dtype"]) for r in rows} >= {("sm_90", "bf16"), ("sm_80", "bf16"), ("sm_90", "fp32"),
                                                       ("sm_80", "fp32"), ("sm_90", "fp64")}
    errors = [f"{r['kernel']} {r['dtype']} {r['arch']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)


def test_no_spills_in_hot_kernels(rows):
    hot = [r for r in rows if (r["arch"] == "sm_90" and r["dtype"] == "bf16")
           or (r["kernel"] == "_msca_fwd_kernel" and r["dtype"] in ("bf16", "fp32"))]
    assert hot
    spills = [f"{r['kernel']} {r['dtype']} {r['arch']}: stack {r['stack']} B" for r in hot if r["stack"] or r["local"]]
    assert not spills, "\n".join(spills)
