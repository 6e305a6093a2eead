"""Plumbing shared by the tests of the C++ CPU kernels (extension ``segnext_kernels._C_cpu``).

- ``ext`` (module-scoped fixture): the loaded extension (JIT-built on first use); the test module is skipped, with
  the reason, only where it cannot be built here (no C++ compiler or ninja). A build that fails is an error.
- ``poison`` (autouse fixture): every output the kernels allocate starts as NaN (``set_poison``), so an element a
  kernel forgets to write fails the comparison instead of passing by luck.
- ``run_with_isa(test_file, body, isa)``: runs ``body`` (with the test module imported as ``t``) in a fresh
  interpreter at the repository root with ``SEGNEXT_CPU_ISA=isa`` (read once per process), and checks that it
  exits 0 and that the extension ran with that ISA.
- ``check_opcheck_and_compile(op, args, fn, x)``: ``torch.library.opcheck`` on ``op(*args)``, then
  ``torch.compile(fn, fullgraph=True)`` (aot_eager) must give eager's ``fn(x)`` bit for bit.

Import the fixtures into a test module by name: ``from cpu_ext_helpers import ext, poison  # noqa: F401``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segnext_kernels.extension import CPU_EXTENSION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ext():
    ok, why = CPU_EXTENSION.status()
    if not ok and CPU_EXTENSION._error is None:  # no compiler / ninja and no prebuilt module: nothing to test
        pytest.skip(f"the CPU extension cannot be built here: {why}")
    return CPU_EXTENSION.load()  # a build that failed (here or in an earlier module) raises, with its log


@pytest.fixture(autouse=True)
def poison(ext):
    ext.set_poison(True)
    yield
    ext.set_poison(False)


def run_with_isa(test_file: str, body: str, isa: str, timeout: int = 600) -> str:
    """Run ``body`` in a fresh interpreter with ``SEGNEXT_CPU_ISA=isa``, after ``import torch`` and the test module
    ``test_file`` (a path from the repository root) imported as ``t``; it then prints the ISA the extension ran with.
    Returns its stdout. Fails with the tail of its output when it exits non-zero or ran with another ISA."""
    path = Path(test_file)
    code = (f"import sys, torch; sys.path[:0] = ['tests/helpers', {str(path.parent)!r}]; import {path.stem} as t\n"
            f"{body}\nprint(t.CPU_EXTENSION.load().isa())\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, SEGNEXT_CPU_ISA=isa),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.split()[-1] == isa
    return p.stdout


def check_opcheck_and_compile(op, args, fn, x) -> None:
    """``opcheck(op, args)`` (schema, fake kernel, autograd registration), then ``torch.compile(fn, fullgraph=True,
    backend="aot_eager")(x)`` must equal eager ``fn(x)`` exactly (no graph break, the same kernel runs)."""
    torch.library.opcheck(op, args)
    with torch.no_grad():
        ref = fn(x)
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
