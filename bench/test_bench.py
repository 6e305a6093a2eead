"""pytest-benchmark cases: the same implementations and inputs as ``python -m bench.msca / nmf / model``, a small
default set.

    python -m pytest bench/ --benchmark-only -q

On a CUDA device: bf16 MSCA at the ADE20K stage-1 shapes of SegNeXt-T and -S/B/L (every backend and the eager
baselines, fwd and fwdbwd), NMF2D at the SegNeXt-B ADE20K shape, SegNeXt-T inference at 512x512. Each call is
followed by ``torch.cuda.synchronize()`` so the wall-clock times pytest-benchmark takes cover the GPU work (they
include the launch and sync overhead, unlike the do_bench figures of the CLIs). ``extra_info`` holds the byte and
FLOP counts and the resulting GB/s.

Without a GPU: tiny shapes, fp32, the reference / eager paths only, one CPU thread (CPU wall-clock figures, a
smoke test of the benchmark plumbing rather than a measurement). Unavailable backends are skipped with the reason.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from bench import common, model as model_bench, msca, nmf  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")

if GPU:
    MSCA_CASES = [(name, msca.SHAPES[name], "bf16", mode, impl)
                  for name in ("ade512-SBL-s1", "ade512-T-s1") for mode in msca.MODES
                  for impl in ("cuda", "triton", "eager_nchw", "eager_cl")]
    NMF_CASES = [("ade512-B", nmf.SHAPES["ade512-B"], "bf16", mode, impl) for mode in nmf.MODES
                 for impl in ("triton", "eager")]
    MODEL_CASES = [("t", "ade512-b1", model_bench.CASES["ade512-b1"], "bf16", v) for v in ("eager", "fused")]
else:
    MSCA_CASES = [("cpu-tiny", (1, 16, 16, 16), "fp32", mode, impl)
                  for mode, impl in (("fwd", "reference"), ("fwd", "eager_nchw"), ("fwd", "eager_cl"),
                                     ("fwdbwd", "eager_nchw"))]
    NMF_CASES = [("cpu-tiny", nmf.CPU_QUICK_SHAPES["cpu-tiny"], "fp32", mode, impl)
                 for mode, impl in (("fwd", "reference"), ("fwd", "cpu"), ("fwd", "eager"), ("fwdbwd", "eager"))]
    MODEL_CASES = [("t", "cpu64-b1", model_bench.CPU_CASES["cpu64-b1"], "fp32", "eager")]


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    with common.cpu_threads(1, DEV):
        yield


def _run(benchmark, fn, extra: dict) -> None:
    def call():
        fn()
        common.sync(DEV)

    call()  # JIT / autotune / cuDNN choice outside the measurement
    benchmark.extra_info.update(extra, device=torch.cuda.get_device_name() if GPU else "CPU (wall-clock)")
    if GPU:
        benchmark.pedantic(call, rounds=20, iterations=3, warmup_rounds=2)
    else:
        benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was measured
        return
    med = benchmark.stats.stats.median  # seconds per call
    if med and extra.get("bytes"):
        benchmark.extra_info["GBps"] = extra["bytes"] / med / 1e9
        benchmark.extra_info["TFLOPs"] = extra["flops"] / med / 1e12


def _ids(cases):
    return ["-".join(str(c) for c in case if not isinstance(c, tuple)) for case in cases]


@pytest.mark.parametrize("name,shape,dtype,mode,impl", MSCA_CASES, ids=_ids(MSCA_CASES))
def test_msca(benchmark, name, shape, dtype, mode, impl):
    ok, note = msca.impl_status(impl, DEV)
    if not ok:
        pytest.skip(note)
    n_rot = common.rotation_count(torch.Size(shape).numel() * common.DTYPE_BYTES[dtype], DEV)
    us, gs, weights = msca.make_inputs(shape, common.DTYPES[dtype], DEV, n_rot)
    fn, _, _ = msca.make_fn(impl, mode, us, gs, weights)
    _run(benchmark, fn, dict(kind="msca", shape=list(shape), dtype=dtype, mode=mode, impl=impl,
                             **msca.byte_flop_model(shape, dtype, mode)))


@pytest.mark.parametrize("name,shape,dtype,mode,impl", NMF_CASES, ids=_ids(NMF_CASES))
def test_nmf(benchmark, name, shape, dtype, mode, impl):
    ok, note = nmf.impl_status(impl, DEV)
    if not ok:
        pytest.skip(note)
    B, D, N, R = shape
    K = nmf.steps_for(mode, None)
    n_rot = common.rotation_count(B * D * N * common.DTYPE_BYTES[dtype], DEV)
    xs, gs, bases = nmf.make_inputs(shape, common.DTYPES[dtype], DEV, n_rot)
    fn, _ = nmf.make_fn(impl, mode, K, "unrolled", xs, gs, bases)
    _run(benchmark, fn, dict(kind="nmf", shape=list(shape), dtype=dtype, mode=mode, impl=impl, K=K,
                             **nmf.byte_flop_model(shape, dtype, mode, K)))


@pytest.mark.parametrize("letter,case_name,case,precision,variant", MODEL_CASES, ids=_ids(MODEL_CASES))
def test_model(benchmark, letter, case_name, case, precision, variant):
    m = model_bench.build_model(letter, DEV)
    if variant == "fused":
        fuse_fn, _ = model_bench.resolve_fuse()
        fuse_fn(m, backend="auto")
    m.train(case[0] == "train")
    fn = model_bench.make_fn(m, case, precision, DEV)
    _run(benchmark, fn, dict(kind="model", model=f"SegNeXt-{letter.upper()}", case=case_name, precision=precision,
                             variant=variant, batch=case[1]))
