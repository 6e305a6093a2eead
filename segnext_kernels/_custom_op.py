"""What every custom op of the package needs: outputs that never alias an input or each other."""
from __future__ import annotations

from torch import Tensor

__all__ = ["fresh_outputs"]


def fresh_outputs(outs, inputs):
    """Clone any output sharing storage with an input or an earlier output (custom ops must not return aliases;
    e.g. for C == 1 the Triton backward's weight-gradient slices of one partial-sum buffer are all views)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    res = []
    for t in outs:
        if t.numel():
            p = t.untyped_storage().data_ptr()
            if p in seen:
                t = t.clone()
                p = t.untyped_storage().data_ptr()
            seen.add(p)
        res.append(t)
    return res
