"""Test setup: without a CUDA device the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before the first ``@triton.jit`` kernel is defined, hence here, before any project
import. CI sets it too (``.ci/run``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
