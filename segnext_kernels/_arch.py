"""Which CUDA architectures the extension is built for (pure Python: setup.py loads this file without torch).

The kernels use bf16 mma.sync, ldmatrix, cp.async and bf16x2 FMA: sm_80 (Ampere) or newer. An architecture list that
also names older GPUs (e.g. TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0", or a JIT build on a machine with a pre-Ampere GPU
beside the H100) would make the whole build fail, so those entries are dropped with a message instead.
"""
from __future__ import annotations

import re

#: Built when nothing else is asked for: A100 and H100 class GPUs.
DEFAULT_ARCH_LIST = "8.0;9.0"
MIN_ARCH = (8, 0)


def supported_arch_list(value: str | None) -> tuple[str, list[str]]:
    """(list to build, entries dropped) for a TORCH_CUDA_ARCH_LIST value ("8.0;9.0", "7.5 8.6+PTX", "9.0a", ...):
    entries below sm_80 are dropped; an empty or None value, or one left empty, gives DEFAULT_ARCH_LIST. Raises
    ValueError naming an entry that is not an architecture (torch's own names such as "Ampere" are not accepted)."""
    if not value or not value.strip():
        return DEFAULT_ARCH_LIST, []
    keep, dropped = [], []
    for entry in re.split(r"[;\s]+", value.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", entry)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: expected entries like 8.0, 9.0a or 8.6+PTX, got {entry!r}")
        (keep if (int(m.group(1)), int(m.group(2))) >= MIN_ARCH else dropped).append(entry)
    return (";".join(keep) if keep else DEFAULT_ARCH_LIST), dropped
