"""Test setup.

- Without a CUDA device the Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET must be set before the
  first ``@triton.jit`` kernel is defined, hence here, before any project import. CI sets it too (``.ci/run``).
- ``tests/helpers`` (shared checks and builders: msca_helpers, nmf_helpers, autocast_checks, emu_build, the CUDA
  emulation sources) is put on ``sys.path`` so that test files in every folder import them by name.

Layout: ``tests/msca/`` and ``tests/nmf/`` hold one file per op, backend and concern (``test_<op>_<backend>.py``,
``_gpu`` for those that need a CUDA device, ``_emu`` for the CUDA kernels in the CPU emulation); ``tests/model/``
the reference SegNeXt, checkpoints and demo; ``tests/compile/`` compile checks; ``tests/integration/`` torch
integration (custom ops, compile, autocast) and production checks; ``tests/bench/`` the benchmark CLIs.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
