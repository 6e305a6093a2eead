"""Compile-check of the CUDA kernels on a machine without a GPU.

Every CUDA source of the extension (csrc/msca/*.cu, csrc/nmf/*.cu: ``emu_build.KERNEL_SOURCES``) is compiled with
``nvcc -c`` for sm_80 and sm_90 (-O3 -std=c++17 -Xptxas -v, one include dir csrc/, in parallel); the test fails on a
compile error, on a compiler warning, on any register spill (``spill stores/loads`` > 0) in any kernel, or on a
nonzero ``bytes stack frame`` in the hot kernels. Skipped (saying so) only when nvcc is not found.

Run as a script (``python tests/compile/test_cuda_compile.py``) to print the ptxas table (registers, spills, stack).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script: tests/helpers is on sys.path only under pytest (conftest)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from emu_build import CSRC, KERNEL_SOURCES  # noqa: E402

ARCHS = ("80", "90")
#: kernels whose stack frame must be 0 bytes (the hot loops); every kernel must be spill-free
HOT_KERNELS = ("msca_fwd_kernel", "msca_bwd_mix_kernel", "msca_bwd_depthwise_kernel",
               "nmf_coef_kernel", "nmf_bwd_kernel", "nmf_gx_kernel")
#: register ceiling per hot-kernel family, from its launch bounds: the MSCA tile kernels run 256 threads with
#: __launch_bounds__(256, 2) (at most 128 registers); the NMF pass / g_X kernels 256 threads with
#: __launch_bounds__(256, 1) (one CTA per SM by their shared memory anyway: at most 255 registers)
MAX_HOT_REGISTERS = {"msca_fwd_kernel": 128, "msca_bwd_mix_kernel": 128, "msca_bwd_depthwise_kernel": 128,
                     "nmf_coef_kernel": 255, "nmf_bwd_kernel": 255, "nmf_gx_kernel": 255}


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def cu_sources() -> list[Path]:
    """The extension's CUDA sources: the .cu files under csrc/ (csrc/cpu/ holds none)."""
    return sorted(CSRC.rglob("*.cu"))


def compile_one(nvcc: str, src: Path, arch: str, outdir: str) -> tuple[int, str]:
    cmd = [nvcc, "-c", "-O3", "-std=c++17", "-Xptxas", "-v", f"-I{CSRC}",
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", str(src), "-o", os.path.join(outdir, f"{src.stem}_{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> list[dict]:
    """One dict per entry function: name (mangled), arch, stack, spill_stores, spill_loads, registers."""
    out: list[dict] = []
    cur = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "stack": None, "spill_stores": None, "spill_loads": None,
                   "registers": None}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m and cur["stack"] is None:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _REGS.search(line)
        if m and cur["registers"] is None:
            cur["registers"] = int(m.group(1))
    return out


def short_name(mangled: str) -> str:
    """Readable kernel name: the identifier after the namespace plus its template arguments, via c++filt if any."""
    filt = shutil.which("c++filt")
    if filt:
        try:
            return subprocess.run([filt, mangled], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return mangled


_RESULTS = None


def compile_all() -> tuple[list[tuple[Path, str, int, str]], float]:
    """Compile every .cu for every arch once per session; returns [(src, arch, returncode, output)] and seconds."""
    global _RESULTS
    if _RESULTS is None:
        import time

        nvcc = find_nvcc()
        assert nvcc is not None
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            jobs = [(src, arch) for src in cu_sources() for arch in ARCHS]
            workers = max(1, min(len(jobs), os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futs = [pool.submit(compile_one, nvcc, src, arch, tmp) for src, arch in jobs]
                res = [(src, arch, *f.result()) for (src, arch), f in zip(jobs, futs)]
        _RESULTS = (res, time.time() - t0)
    return _RESULTS


needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (set NVCC or CUDA_HOME); cannot "
                                                           "compile-check the CUDA kernels here")


def test_every_cuda_source_is_built():
    """The .cu files under csrc/ are exactly the extension's kernel sources (emu_build.KERNEL_SOURCES, which the
    emulation builds compile): a new kernel file is compiled, emulated and spill-checked, or this fails."""
    found = {p.relative_to(CSRC).as_posix() for p in cu_sources()}
    assert found == set(KERNEL_SOURCES), (sorted(found), KERNEL_SOURCES)


@needs_nvcc
def test_compiles_without_spills():
    results, seconds = compile_all()
    problems = []
    seen_hot = set()
    for src, arch, rc, text in results:
        if rc != 0:
            problems.append(f"{src.name} sm_{arch}: nvcc failed (exit {rc}):\n{text[-4000:]}")
            continue
        entries = parse_ptxas(text)
        if not entries:
            problems.append(f"{src.name} sm_{arch}: no ptxas report parsed:\n{text[-2000:]}")
        for e in entries:
            if e["stack"] is None or e["registers"] is None:
                problems.append(f"{src.name} sm_{arch}: incomplete ptxas report for {e['name']}")
                continue
            hot = any(h in e["name"] for h in HOT_KERNELS)
            if hot:
                seen_hot.add((next(h for h in HOT_KERNELS if h in e["name"]), arch))
            if e["spill_stores"] or e["spill_loads"]:
                problems.append(f"{src.name} {e['arch']}: {short_name(e['name'])} spills "
                                f"({e['spill_stores']} B stores, {e['spill_loads']} B loads, {e['registers']} regs)")
            if hot and e["stack"]:
                problems.append(f"{src.name} {e['arch']}: hot kernel {short_name(e['name'])} has a "
                                f"{e['stack']}-byte stack frame")
            limit = MAX_HOT_REGISTERS[next(h for h in HOT_KERNELS if h in e["name"])] if hot else None
            if hot and e["registers"] > limit:
                problems.append(f"{src.name} {e['arch']}: hot kernel {short_name(e['name'])} uses {e['registers']} "
                                f"registers (> {limit})")
        # a compiler warning is a defect too (e.g. #821-D, a device function referenced but never defined, which a
        # later change can turn into a link error on the GPU machine)
        warnings = [ln for ln in text.splitlines() if re.search(r"\bwarning\b", ln)]
        if warnings:
            problems.append(f"{src.name} sm_{arch}: compiler warnings:\n" + "\n".join(warnings[:10]))
    for h in HOT_KERNELS:
        for arch in ARCHS:
            if (h, arch) not in seen_hot:
                problems.append(f"hot kernel {h} not found in the sm_{arch} ptxas report")
    assert not problems, "\n".join(problems)


def main() -> int:
    if find_nvcc() is None:
        print("nvcc not found")
        return 1
    results, seconds = compile_all()
    rc_all = 0
    print(f"{'file':<17} {'arch':<6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
    for src, arch, rc, text in results:
        if rc != 0:
            rc_all = 1
            print(f"{src.name} sm_{arch}: COMPILE ERROR\n{text[-4000:]}")
            continue
        for e in parse_ptxas(text):
            print(f"{src.relative_to(CSRC).as_posix():<17} {e['arch']:<6} {e['registers']:>4} {e['stack']:>5} {e['spill_stores']:>8} "
                  f"{e['spill_loads']:>8}  {short_name(e['name'])}")
    print(f"(compiled {len(results)} file/arch pairs in {seconds:.1f} s)")
    return rc_all


if __name__ == "__main__":
    raise SystemExit(main())
