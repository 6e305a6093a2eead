"""Static census of the loops in the SASS of the CUDA kernels: instructions per loop body, and how many of them are
tensor-core (HMMA), ldmatrix (LDSM), shared-memory, global and async-copy (LDGSTS) instructions.

A static count, not a timing: it shows where the issue slots of a kernel go (the README's "warp instructions per
output element" figures for the tensor-core depthwise variant come from it) and catches regressions such as an
integer division or a lost unroll in a hot loop. Speed is measured by ``python -m bench.msca`` on a GPU.

    python -m bench.sass_census                        # csrc/msca/msca_fwd.cu, sm_90, every kernel
    python -m bench.sass_census --src csrc/msca/msca_bwd.cu --kernel mix --arch 80

Needs nvcc and cuobjdump (the CUDA toolkit, or ``pip install nvidia-cuda-cuobjdump`` with its bin/ on PATH); runs
on a machine without a GPU. Loops are found as backward branches, so a loop's count includes any loop nested in it.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = (("HMMA", r"^HMMA"), ("LDSM", r"^LDSM"), ("LDS", r"^LDS(\.|\s)"), ("STS", r"^STS"), ("LDG", r"^LDG(\.|\s)"),
         ("STG", r"^STG"), ("LDGSTS", r"^LDGSTS"), ("F2FP", r"^F2FP"), ("NOP", r"^NOP"))
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRA = re.compile(r"BRA\s+(?:\S+,\s*)?(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


def sass_of(src: Path, arch: str) -> str:
    """cuobjdump -sass text of ``src`` compiled with nvcc -O3 for sm_<arch>. Raises SystemExit when nvcc or cuobjdump
    is not on PATH, CalledProcessError when the compile fails."""
    nvcc, cuobjdump = shutil.which("nvcc"), shutil.which("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise SystemExit("needs nvcc and cuobjdump on PATH (CUDA toolkit, or pip install nvidia-cuda-cuobjdump)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        subprocess.run([nvcc, "-cubin", "-O3", "-std=c++17", f"-I{ROOT / 'csrc'}", "-gencode",
                        f"arch=compute_{arch},code=sm_{arch}", str(src), "-o", str(cubin)], check=True)
        return subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout


def census(sass: str, kernel_filter: str = "") -> list[tuple[str, int, list[dict]]]:
    """[(kernel, instructions, loops)]; a loop: start, end (byte addresses), n (instructions) and one count per KINDS."""
    out = []
    for chunk in re.split(r"\n\s*Function : ", "\n" + sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if kernel_filter not in name:
            continue
        ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _INSTR.finditer(chunk)]
        index = {a: i for i, (a, _, _) in enumerate(ins)}
        loops = []
        for i, (a, op, rest) in enumerate(ins):
            m = _BRA.search(op + rest) if op.startswith("BRA") else None
            if not m or m.group(1) is None:
                continue
            target = int(m.group(1), 16)
            if target <= a and target in index:
                body = ins[index[target]:i + 1]
                row = {"start": target, "end": a, "n": len(body)}
                for k, pat in KINDS:
                    row[k] = sum(bool(re.match(pat, o)) for _, o, _ in body)
                loops.append(row)
        out.append((name, len(ins), loops))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="csrc/msca/msca_fwd.cu", help="a .cu file of csrc/ (default: %(default)s)")
    ap.add_argument("--arch", default="90", help="SM architecture (default: %(default)s)")
    ap.add_argument("--kernel", default="", help="only kernels whose mangled name contains this")
    ap.add_argument("--min-instr", type=int, default=8, help="hide loops shorter than this (default: %(default)s)")
    a = ap.parse_args(argv)
    for name, n, loops in census(sass_of(ROOT / a.src, a.arch), a.kernel):
        print(f"== {name}: {n} instructions")
        for r in loops:
            if r["n"] < a.min_instr:
                continue
            kinds = ", ".join(f"{k} {r[k]}" for k, _ in KINDS if r[k])
            print(f"  loop {r['start']:#07x}-{r['end']:#07x}: {r['n']:5d} instructions ({kinds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
