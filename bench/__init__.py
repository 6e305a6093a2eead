"""Benchmark suite of segnext-kernels (issue 5).

Commands (run from the repository root)::

    python -m bench.msca    [--quick | --full] [--shape B,C,H,W] [--dtype fp32,fp16,bf16] [--mode fwd,fwdbwd] ...
    python -m bench.nmf     [--quick] [--shape B,D,N,R] [--dtype ...] [--mode ...] ...
    python -m bench.model   [--quick] [--models t,s,b,l] [--precision fp32,fp16,bf16] ...
    python -m bench.model --cpu [--quick | --sweep | --goals FILE.json] [--threads 2] ...   # bench/model_cpu.py
    python -m bench.report  [--readme README.md] [--results bench/results] [--write | --check]  # no flag: print
    python -m pytest bench/ --benchmark-only -q            # the same cases through pytest-benchmark

Units everywhere: times in milliseconds (ms), bandwidth in GB/s (1e9 bytes per second), arithmetic in TFLOP/s
(1e12 floating-point operations per second, a multiply-add counted as 2), memory in MiB (2**20 bytes).

On a CUDA device times are medians (with 20th/80th percentiles) of ``triton.testing.do_bench`` and the inputs are
rotated over enough copies to exceed twice the L2 cache; results are saved under ``bench/results/`` by default.
Without a GPU every command runs on CPU, labelled as CPU wall-clock figures (``time.perf_counter`` medians), written
only with ``--save`` (``bench.msca --full`` saves): ``bench.msca`` times the cpu backend against eager, torch.compile,
ONNX Runtime and OpenVINO at the SegNeXt stage shapes (``bench/msca_cpu.py``); ``bench.model`` times the whole
models (512x512, 1024x2048, a training step) eager, fused, compiled and in ONNX Runtime / OpenVINO, with peak RSS
and a cost-against-size sweep (``bench/model_cpu.py``); nmf uses tiny shapes.
Speedups are printed with their spread (``3.1x (2.8-3.4)`` from the p20/p80 of both), ``~same`` when the spreads
overlap and ``same code`` (no ratio) when both sides run the same code. The byte and FLOP models behind
the GB/s, TFLOP/s and floor columns are documented in ``bench/msca.py`` and ``bench/nmf.py``; the floors
(measured copy bandwidth, datasheet fp32 FMA rate) in ``bench/common.py``.
"""
