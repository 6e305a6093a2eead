"""Shared machinery of the benchmark suite: device information, floors, timing, input rotation, tables and the
CSV / JSON / PNG writers.

Units: times in ms, bandwidth in GB/s (1e9 B/s), arithmetic in TFLOP/s (1e12 FLOP/s, multiply-add = 2 FLOP),
memory in MiB.

Floors ("fraction of floor" columns):
  * HBM floor: ``bytes / bandwidth``. The bandwidth is the device's *measured* copy bandwidth (``dst.copy_(src)``
    on buffers far larger than the L2, counted as read + write), the reachable ceiling; when the measurement fails
    the datasheet figure of ``KNOWN_GPUS`` is used. The datasheet peak is recorded beside it.
  * FMA floor: ``fma_flops / fp32 FMA peak`` from the datasheet table ``KNOWN_GPUS`` (non-tensor-core fp32,
    multiply-add = 2 FLOP). Unknown GPUs and CPUs have no FMA floor (reported as n/a).
  ``hbm_frac`` = HBM floor / measured median, ``fma_frac`` = FMA floor / median: 1.0 means at the floor.

Timing (``time_fn``): on CUDA ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between calls),
median and 20th/80th percentiles; on CPU ``time.perf_counter`` around each call, the same statistics over a few
repeats (a CPU wall-clock figure, not a GPU one).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

#: Columns every result row carries (CSV and JSON), in this order.
META_KEYS = ("kind", "device", "device_kind", "device_slug", "cpu_model", "threads", "driver", "torch", "triton",
             "cuda", "onnxruntime", "openvino", "python", "commit", "date", "timer", "hbm_GBps", "hbm_source",
             "hbm_peak_GBps", "fma_peak_TFLOPs")

#: Datasheet figures: (words that must all occur in the lower-cased device name, label, HBM TB/s,
#: fp32 FMA TFLOP/s (non-tensor, multiply-add = 2)). Words match whole ("a10" does not match "a100"); the first
#: matching entry wins, so specific names come first.
KNOWN_GPUS = (
    (("h100", "pcie"), "H100 PCIe", 2.0, 51.2),
    (("h100", "nvl"), "H100 NVL", 3.9, 60.0),
    (("h100",), "H100 SXM", 3.35, 67.0),
    (("h200",), "H200 SXM", 4.8, 67.0),
    (("a100", "80gb"), "A100 80GB", 2.0, 19.5),
    (("a100",), "A100 40GB", 1.555, 19.5),
    (("l40s",), "L40S", 0.864, 91.6),
    (("rtx 4090",), "RTX 4090", 1.008, 82.6),
    (("rtx 3090",), "RTX 3090", 0.936, 35.6),
    (("a10",), "A10", 0.6, 31.2),
    (("l40",), "L40", 0.864, 90.5),
    (("l4",), "L4", 0.3, 30.3),
    (("v100",), "V100", 0.9, 15.7),
    (("t4",), "T4", 0.32, 8.1),
)

CPU_NOTE = ("CPU figures: wall-clock medians (time.perf_counter) on the host CPU; they say nothing "
            "about GPU speed")


# --------------------------------------------------------------------------------------------- argument parsing
def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """Comma-separated list -> list, every item checked against ``allowed`` (order of the user kept)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"{what}: expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(items))


def parse_shape(text: str, n: int, what: str) -> tuple[int, ...]:
    """'16,64,128,128' -> (16, 64, 128, 128); exactly ``n`` positive integers ('x' also separates)."""
    parts = [p for p in re.split(r"[,x]", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != n or any(s < 1 for s in shape):
        raise SystemExit(f"{what}: expected {n} positive integers separated by commas, got {text!r}")
    return shape


def pick_device(force_cpu: bool = False) -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() and not force_cpu else torch.device("cpu")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------- segnext_kernels
# The benchmarks ask the package's registry which backend actually runs (so that a fallback to the reference is
# reported as "same code", never as a speedup).
def sk_backends():
    """``segnext_kernels.backends`` (``resolve``, ``supports``, ``BACKENDS``)."""
    from segnext_kernels import backends

    return backends


def sk_resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that actually runs ``op`` ("msca", "nmf2d") for a ``backend=`` argument on ``device`` (and
    ``dtype``): ``segnext_kernels.backends.resolve``; raises as it does when the backend cannot run."""
    return sk_backends().resolve(op, backend, device, dtype)


def sk_status(op: str, backend: str, device: torch.device) -> tuple[bool, str]:
    """(runs, why not) of a concrete backend for ``op`` on ``device``: ``segnext_kernels.supports``."""
    return sk_backends().supports(op, backend, device)


def sk_resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    return sk_resolve("msca", backend, device, dtype)


def sk_resolve_nmf_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    return sk_resolve("nmf2d", backend, device, dtype)


def sk_msca_reference():
    """``segnext_kernels.msca_reference`` (the eager MSCA the baselines run)."""
    from segnext_kernels import msca_reference

    return msca_reference


# --------------------------------------------------------------------------------------------- environment
def _run(cmd: Sequence[str], timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """Short commit of the working tree, '-dirty' when tracked files differ. ``BENCH_COMMIT`` overrides (for
    copies of the tree without ``.git``, e.g. on a remote GPU machine)."""
    env = os.environ.get("BENCH_COMMIT", "").strip()
    if env:
        return env
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if not commit:
        return "unknown"
    if _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "-dirty"
    return commit


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_label() -> str:
    """``cpu_name()``, plus " (AVX2, no AVX-512)" or " (no AVX2)" on an x86 CPU without AVX-512 F: /proc/cpuinfo
    names some machines alike ("AMD EPYC", with and without AVX-512) whose figures must not mix in one result set
    (the device name and file slug of a CPU run). CPUs with AVX-512, or without a ``flags`` line, keep the plain name
    (that of the result files from before the tag)."""
    flags = cpu_flags()
    if not flags or "avx512f" in flags:
        return cpu_name()
    return cpu_name() + (" (AVX2, no AVX-512)" if "avx2" in flags else " (no AVX2)")


def package_version(name: str) -> str:
    """Installed version of a distribution (``importlib.metadata``, nothing imported), or 'not installed'."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo (empty when unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_mhz() -> Optional[float]:
    """The ``cpu MHz`` of /proc/cpuinfo (first core), or None (many VMs report none or a nominal figure)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def cpu_vector_lanes() -> tuple[int, str]:
    """(fp32 lanes of the widest FMA vector unit, how it was found): 16 for AVX-512, 8 for AVX2, 4 otherwise;
    from ``torch.backends.cpu.get_cpu_capability()``, else the /proc/cpuinfo flags."""
    try:
        cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - old torch
        cap = ""
    if "AVX512" in cap:
        return 16, f"torch cpu capability {cap}"
    if "AVX2" in cap:
        return 8, f"torch cpu capability {cap}"
    flags = cpu_flags()
    if "avx512f" in flags:
        return 16, "/proc/cpuinfo flag avx512f"
    if "avx2" in flags:
        return 8, "/proc/cpuinfo flag avx2"
    return 4, f"no AVX2/AVX-512 found (capability {cap or 'unknown'}): 4 lanes assumed"


#: FMA ports per core assumed by the CPU floor (Intel server cores with AVX-512: 2)
CPU_FMA_PORTS = 2


def measure_cpu_fma_peak(n: int = 2048, reps: int = 5) -> float:
    """Single-thread fp32 GFLOP/s of ``torch.mm`` on n x n matrices (best of ``reps``; multiply-add = 2 FLOP): the
    reachable peak-FMA rate of one core (a large fp32 GEMM runs at or just below the FMA peak)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(saved)


def cpu_fma_floor_info(clock_source: str = "measured") -> dict:
    """The CPU FMA-floor ceiling: ``fma_lanes`` (fp32, detected), ``fma_ports`` (2, assumed), ``clock_GHz`` and
    ``clock_source`` ("derived from torch.mm": single-thread mm GFLOP/s / (2 FLOP x ports x lanes); or
    "/proc/cpuinfo MHz"), ``core_peak_GFLOPs`` = 2 x ports x lanes x clock (FLOP/s of one core), ``mm_GFLOPs`` (the
    measurement), ``cpuinfo_MHz``. The floor of a run on T threads is MACs / (T x ports x lanes x clock)."""
    lanes, lanes_how = cpu_vector_lanes()
    mhz = cpu_mhz()
    mm = None
    try:
        mm = measure_cpu_fma_peak()
    except Exception as e:  # noqa: BLE001
        print(f"note: torch.mm peak measurement failed ({type(e).__name__}: {e})")
    if clock_source == "cpuinfo" and mhz:
        clock, how = mhz / 1e3, "/proc/cpuinfo MHz"
    elif mm:
        clock, how = mm / (2 * CPU_FMA_PORTS * lanes), "derived from torch.mm (1 thread GFLOP/s / (2 x ports x lanes))"
    elif mhz:
        clock, how = mhz / 1e3, "/proc/cpuinfo MHz (torch.mm measurement failed)"
    else:
        clock, how = None, "unknown"
    return {"fma_lanes": lanes, "fma_lanes_source": lanes_how, "fma_ports": CPU_FMA_PORTS,
            "clock_GHz": round(clock, 3) if clock else None, "clock_source": how,
            "core_peak_GFLOPs": round(2 * CPU_FMA_PORTS * lanes * clock, 1) if clock else None,
            "mm_GFLOPs": round(mm, 1) if mm else None, "cpuinfo_MHz": mhz}


def slugify(text: str, max_len: int = 40) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:max_len].strip("-") or "unknown"


def environment(device: torch.device) -> dict:
    """Device name, kind ("cuda" / "cpu"), file-name slug, driver, torch / triton / CUDA / Python versions, git
    commit and UTC date (ISO 8601) of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing or broken: say so in the files
        triton_version = "not importable"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        drv = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        driver = drv[0].strip() if drv else "unknown"
        slug = slugify(name)
    else:
        name = f"CPU: {cpu_label()}"
        driver = "n/a"
        slug = "cpu-" + slugify(cpu_label(), 40)
    return {
        "device": name,
        "device_kind": device.type,
        "device_slug": slug,
        "cpu_model": cpu_label(),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "onnxruntime": package_version("onnxruntime"),
        "openvino": package_version("openvino"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timer": "triton.testing.do_bench" if device.type == "cuda" else "time.perf_counter",
    }


def known_gpu(name: str) -> Optional[tuple[str, float, float]]:
    """(label, HBM GB/s, fp32 FMA TFLOP/s) from the datasheet table for a device name, or None."""
    low = name.lower()
    for keys, label, tbs, tflops in KNOWN_GPUS:
        if all(re.search(rf"(?<![a-z0-9]){re.escape(k)}(?![a-z0-9])", low) for k in keys):
            return label, tbs * 1000.0, tflops
    return None


def l2_bytes(device: torch.device) -> int:
    """L2 cache size in bytes (CUDA); 0 on CPU."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20))


def measure_copy_bandwidth(device: torch.device, nbytes: int = 0) -> float:
    """Device-memory copy bandwidth in GB/s: ``dst.copy_(src)`` counted as nbytes read + nbytes written.

    CUDA: buffers of max(256 MiB, 8x L2), ``do_bench`` median. CPU: 64 MiB buffers, median of 5 copies."""
    if device.type == "cuda":
        import triton.testing

        nbytes = nbytes or max(256 * 2 ** 20, 8 * l2_bytes(device))
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
        del src, dst
        torch.cuda.empty_cache()
        return 2 * nbytes / (ms * 1e-3) / 1e9
    nbytes = nbytes or 64 * 2 ** 20
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def device_floors(device: torch.device, env: dict, measure: bool = True) -> dict:
    """Ceilings for the floor columns: ``hbm_GBps`` (measured copy bandwidth; datasheet if the measurement is
    skipped or fails), ``hbm_source``, ``hbm_peak_GBps`` (datasheet or None), ``fma_peak_TFLOPs`` (datasheet fp32
    FMA rate or None), ``gpu_label`` (datasheet entry used, or None)."""
    known = known_gpu(env["device"]) if device.type == "cuda" else None
    floors = {"hbm_GBps": None, "hbm_source": "none", "hbm_peak_GBps": known[1] if known else None,
              "fma_peak_TFLOPs": known[2] if known else None, "gpu_label": known[0] if known else None}
    if measure:
        try:
            floors["hbm_GBps"] = round(measure_copy_bandwidth(device), 1)
            floors["hbm_source"] = "measured copy" if device.type == "cuda" else "measured CPU memcpy"
        except Exception as e:  # noqa: BLE001 - fall back to the datasheet
            print(f"note: copy-bandwidth measurement failed ({type(e).__name__}: {e}); using the datasheet")
    if floors["hbm_GBps"] is None and known:
        floors["hbm_GBps"], floors["hbm_source"] = known[1], f"datasheet ({known[0]})"
    return floors


def describe_floors(floors: dict) -> str:
    hbm = (f"{floors['hbm_GBps']:.0f} GB/s ({floors['hbm_source']})" if floors["hbm_GBps"] else "n/a")
    if floors["hbm_peak_GBps"]:
        hbm += f", datasheet {floors['hbm_peak_GBps']:.0f} GB/s ({floors['gpu_label']})"
    fma = (f"{floors['fma_peak_TFLOPs']:.1f} TFLOP/s fp32 FMA (datasheet, {floors['gpu_label']})"
           if floors["fma_peak_TFLOPs"] else "n/a (no datasheet figure for this device)")
    return f"floors: memory {hbm}; arithmetic {fma}"


def run_meta(kind: str, env: dict, floors: dict) -> dict:
    """The metadata columns (``META_KEYS``) of every row of one run."""
    meta = dict(env, kind=kind, **{k: floors.get(k) for k in ("hbm_GBps", "hbm_source", "hbm_peak_GBps",
                                                               "fma_peak_TFLOPs")})
    return {k: meta.get(k) for k in META_KEYS}


# --------------------------------------------------------------------------------------------- inputs, timing
def rotation_count(nbytes: int, device: torch.device, cap: int = 256) -> int:
    """How many copies of an input of ``nbytes`` to rotate over so that together they exceed twice the L2 (CUDA),
    bounded by 20% of free device memory and ``cap``; 1 on CPU (no rotation)."""
    if device.type != "cuda" or nbytes <= 0:
        return 1
    n = 2 * l2_bytes(device) // nbytes + 1
    try:
        free, _ = torch.cuda.mem_get_info(device)
        n = min(n, max(1, int(0.2 * free // nbytes)))
    except Exception:  # noqa: BLE001
        pass
    return max(1, min(n, cap))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_min_s: float = 0.15, cpu_min_reps: int = 3, cpu_max_reps: int = 30) -> dict:
    """Time ``fn()``. Returns ``{"median_ms", "p20_ms", "p80_ms", "reps"}`` (ms).

    CUDA: ``triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])`` (CUDA events;
    do_bench also zeroes a 256 MB buffer between calls, flushing the L2). ``reps`` is None (chosen by do_bench).
    CPU: calls timed with ``time.perf_counter`` until ``cpu_min_s`` has passed and at least ``cpu_min_reps`` were
    made (at most ``cpu_max_reps``). Callers make one untimed call first (compile, JIT, allocator warm-up)."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": None}
    times = []
    start = time.perf_counter()
    while len(times) < cpu_max_reps and (len(times) < cpu_min_reps or time.perf_counter() - start < cpu_min_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


#: glibc mallopt parameters (malloc.h) and the values ``pin_malloc`` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
PINNED_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
PINNED_TRIM_THRESHOLD = 512 << 20


def pin_malloc() -> str:
    """Fix glibc's heap thresholds for this process (``mallopt(M_MMAP_THRESHOLD, 32 MiB)``, ``mallopt(M_TRIM_THRESHOLD,
    512 MiB)``; setting them also stops glibc's dynamic threshold adjustment), so that what one implementation
    allocates and frees cannot make the next one's allocations page-fault: without it, a few ONNX Runtime runs left
    the "cpu" MSCA op faulting in ~51 pages per call afterwards (1.05 -> 1.45 ms at SegNeXt-T stage 1 on the Xeon
    machine, one-off), which a round-robin timing then charged to the op. Returns a note for the result file
    ("" where this is not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, PINNED_TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return ""
    return (f"glibc heap pinned: mallopt M_MMAP_THRESHOLD={PINNED_MMAP_THRESHOLD}, M_TRIM_THRESHOLD="
            f"{PINNED_TRIM_THRESHOLD}" if ok else "")


def round_robin(fns: Sequence[Callable[[], object]], plans: Sequence[tuple[int, int]], *, min_reps: int,
                max_reps: int, min_s: float, min_rounds: int = 0, warm_s: float = 0.0
                ) -> tuple[list[list[float]], int]:
    """CPU timing of several implementations side by side: rounds in which each ``fns[i]`` makes ``plans[i] =
    (warm, block)`` calls, ``warm`` untimed, and more untimed ones until ``warm_s`` seconds have passed (ONNX Runtime's
    and OpenVINO's worker threads spin-wait after a call and slow the next implementation's calls down: on the
    Xeon machine ORT's spin outlasted two calls of 1 ms, doubling the next implementation's medians), then
    ``block`` timed ones (``time.perf_counter``), until every fn has ``min_reps`` timed calls and ``min_s`` seconds
    have passed, or one has ``max_reps``; at least ``min_rounds`` rounds. Returns (ms of each timed call, per fn;
    rounds made)."""
    times: list[list[float]] = [[] for _ in fns]
    start, rounds = time.perf_counter(), 0
    while fns:
        least = min(len(t) for t in times)
        if rounds >= min_rounds and (least >= max_reps or (least >= min_reps and
                                                           time.perf_counter() - start >= min_s)):
            break
        for fn, (warm, block), ts in zip(fns, plans, times):
            w0 = time.perf_counter()
            for _ in range(warm):
                fn()
            while time.perf_counter() - w0 < warm_s:
                fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times, rounds


class Budget:
    """Wall-clock budget in seconds (None: unlimited): measurements after it is spent are skipped, not started."""

    def __init__(self, seconds: Optional[float]):
        self.seconds, self.t0 = seconds, time.monotonic()

    def spent(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.t0 > self.seconds


def compile_reset() -> None:
    """Clear torch.compile's caches so every compiled case gets a fresh compile (dynamo's per-function recompile
    limit would otherwise silently fall back to eager after a few shapes / dtypes)."""
    import torch._dynamo

    torch._dynamo.reset()


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {(msg[0] if msg else '')[:160]}"


# --------------------------------------------------------------------------------------------- derived columns
def _sig2(v: float) -> str:
    """Two significant digits (three from 100 up): 3.1, 0.45, 12, 140."""
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:#.2g}".rstrip(".")


def compare_timings(base: dict, this: dict, same_code: bool = False) -> dict:
    """How much faster ``this`` is than ``base`` (both dicts with ``median_ms``, ``p20_ms``, ``p80_ms``), with the
    spread: ``ratio`` = base median / this median, ``lo`` = base p20 / this p80, ``hi`` = base p80 / this p20 (the
    ratio's range over the two [p20, p80] spreads), ``verdict`` and ``text``:

      * ``same code``: the two run the same code (no ratio is given: a backend is never compared with itself);
      * ``~same``: the two [p20, p80] ranges overlap, i.e. no measurable difference (ratio not printed);
      * ``faster`` / ``slower``: ``text`` = e.g. ``3.1x (2.8-3.4)``.
    Without quantiles the ratio alone is given (``text`` = ``3.1x``)."""
    if same_code:
        return {"ratio": None, "lo": None, "hi": None, "verdict": "same code", "text": "same code"}
    bm, tm = base.get("median_ms"), this.get("median_ms")
    if not bm or not tm:
        return {"ratio": None, "lo": None, "hi": None, "verdict": None, "text": None}
    ratio = bm / tm
    b20, b80, t20, t80 = (base.get("p20_ms"), base.get("p80_ms"), this.get("p20_ms"), this.get("p80_ms"))
    if not all(isinstance(v, (int, float)) and v > 0 for v in (b20, b80, t20, t80)):
        return {"ratio": ratio, "lo": None, "hi": None, "verdict": "faster" if ratio > 1 else "slower",
                "text": f"{_sig2(ratio)}x"}
    lo, hi = b20 / t80, b80 / t20
    if max(b20, t20) <= min(b80, t80):
        return {"ratio": ratio, "lo": lo, "hi": hi, "verdict": "~same", "text": "~same"}
    return {"ratio": ratio, "lo": lo, "hi": hi, "verdict": "faster" if ratio > 1 else "slower",
            "text": f"{_sig2(ratio)}x ({_sig2(lo)}-{_sig2(hi)})"}


def add_derived(rows: list[dict], group_keys: Sequence[str], baselines: Sequence[str], impl_key: str = "impl",
                floors: Optional[dict] = None) -> None:
    """In place: for every baseline ``b`` measured in the same group, ``speedup_vs_<b>`` = baseline median / row
    median, ``speedup_vs_<b>_lo`` / ``_hi`` (its range over the p20-p80 spreads) and ``vs_<b>`` (the text of
    ``compare_timings``: a ratio with its spread, ``~same`` when the spreads overlap, ``same code`` when the row and
    the baseline carry the same non-empty ``code`` column, i.e. ran the same code; then no ratio). A row is never
    compared with itself. With ``floors``, ``GBps``, ``TFLOPs`` (from the row's ``bytes`` / ``flops``),
    ``hbm_frac`` and ``fma_frac`` (from ``bytes`` / ``fma_flops``)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("median_ms"):
            groups.setdefault(tuple(r.get(k) for k in group_keys), {})[r[impl_key]] = r
    for r in rows:
        med = r.get("median_ms")
        base = groups.get(tuple(r.get(k) for k in group_keys), {})
        for b in baselines:
            keys = (f"speedup_vs_{b}", f"speedup_vs_{b}_lo", f"speedup_vs_{b}_hi", f"vs_{b}")
            if not med or b not in base or r[impl_key] == b:
                r.update(dict.fromkeys(keys))
                continue
            same = bool(r.get("code")) and r.get("code") == base[b].get("code")
            c = compare_timings(base[b], r, same_code=same)
            r.update(zip(keys, (c["ratio"], c["lo"], c["hi"], c["text"])))
        if floors is None:
            continue
        sec = med * 1e-3 if med else None
        r["GBps"] = r["bytes"] / sec / 1e9 if sec and r.get("bytes") else None
        r["TFLOPs"] = r["flops"] / sec / 1e12 if sec and r.get("flops") else None
        hbm, fma = floors.get("hbm_GBps"), floors.get("fma_peak_TFLOPs")
        r["hbm_floor_ms"] = r["bytes"] / (hbm * 1e9) * 1e3 if hbm and r.get("bytes") else None
        if floors.get("cpu_fma"):  # CPU: MACs / (threads x ports x lanes x clock), per row (threads vary)
            cf = floors["cpu_fma"]
            rate = (r.get("threads") or 1) * cf["fma_ports"] * cf["fma_lanes"] * (cf["clock_GHz"] or 0) * 1e9
            r["fma_floor_ms"] = r["fma_macs"] / rate * 1e3 if rate and r.get("fma_macs") else None
            r["GFLOPs"] = r["flops"] / sec / 1e9 if sec and r.get("flops") else None
        else:
            r["fma_floor_ms"] = r["fma_flops"] / (fma * 1e12) * 1e3 if fma and r.get("fma_flops") else None
        r["hbm_frac"] = r["hbm_floor_ms"] / med if med and r["hbm_floor_ms"] else None
        r["fma_frac"] = r["fma_floor_ms"] / med if med and r["fma_floor_ms"] else None


# --------------------------------------------------------------------------------------------- tables
def fmt(value, spec: str = ".3f", none: str = "-") -> str:
    if value is None or value == "":
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return none
    if spec == "x":
        return f"{value:.2f}x"
    if spec == "%":
        return f"{100 * value:.0f}%"
    if spec == "s":
        return str(value)
    if spec == "g3":  # 3 significant digits, no exponent: 2851, 42.1, 0.512, 0.00123
        if value == 0:
            return "0"
        digits = max(0, 2 - math.floor(math.log10(abs(value))))
        return f"{value:.{digits}f}"
    return format(value, spec)


def sort_rows(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """Stable sort grouping rows by ``keys``, each key's values in order of first appearance (the run order)."""
    order = {k: {v: i for i, v in enumerate(dict.fromkeys(r[k] for r in rows))} for k in keys}
    return sorted(rows, key=lambda r: tuple(order[k][r[k]] for k in keys))


def format_table(rows: Iterable[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` = (header, row key, format spec for ``fmt``)."""
    rows = list(rows)
    cells = [[h for h, _, _ in columns]] + [[fmt(r.get(k), f) for _, k, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(s.ljust(w) if columns[i][2] == "s" else s.rjust(w)
                               for i, (s, w) in enumerate(zip(c, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_header(title: str, env: dict, floors: Optional[dict], notes: Sequence[str]) -> None:
    print(f"== {title}")
    print(f"device: {env['device']} | driver {env['driver']} | torch {env['torch']} | triton {env['triton']} | "
          f"CUDA {env['cuda']} | commit {env['commit']} | {env['date']}")
    if floors is not None:
        print(describe_floors(floors))
    if env["device_kind"] != "cuda":
        print("** " + CPU_NOTE + " **")
    for n in notes:
        print(f"note: {n}")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------- writers
def result_stem(kind: str, env: dict, extra: str = "") -> str:
    """``<kind>_<device slug>_<UTC date YYYYmmddTHHMMSSZ>``, e.g. ``msca_nvidia-h100-80gb-hbm3_20250101T120000Z``.
    CPU runs: ``<kind>_cpu-<cpu model>_<commit>_<date><extra>`` (``extra``, e.g. ``_t1-2_torch2.13.0-ort1.32.0``,
    names the threads and versions), e.g. ``msca_cpu-amd-epyc_921a4b8_20261206T120000Z_t2_torch2.13.0``."""
    stamp = env["date"].replace("-", "").replace(":", "")
    if env.get("device_kind") == "cpu":
        commit = slugify(str(env.get("commit", "unknown")), 20)
        return f"{kind}_{env['device_slug']}_{commit}_{stamp}{extra}"
    return f"{kind}_{env['device_slug']}_{stamp}"


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """CSV with the union of the rows' keys as columns (None -> empty); written atomically (temp file + rename),
    so a run killed mid-write leaves the previous complete file."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, path)


def write_json(path: Path, meta: dict, rows: Sequence[dict]) -> None:
    """``{"schema": 1, "meta": meta, "rows": rows}``, written atomically like ``write_csv``."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        json.dump({"schema": 1, "meta": meta, "rows": list(rows)}, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


class ResultWriter:
    """Collects the rows of one run and, when ``enabled``, writes ``<out_dir>/<stem>.csv`` and ``<stem>.json``
    (``{"schema", "meta", "rows"}``, ``meta["complete"]`` false until ``finish``) after every row, so a run cut off
    by a time limit keeps what it measured; ``finish`` adds ``<stem>.png``. ``derive(rows)`` (the speedup and floor
    columns) runs before each write. Every row already carries the ``META_KEYS`` columns."""

    def __init__(self, kind: str, env: dict, meta: dict, out_dir: Path, enabled: bool,
                 derive: Callable[[list], None], stem_extra: str = "", resume: Optional[Path] = None):
        self.meta, self.enabled, self.derive = dict(meta, complete=False), enabled, derive
        self.rows: list[dict] = []
        if resume is not None:  # go on writing the files of an earlier run, its rows first
            resume = Path(resume).with_suffix(".json")
            data = json.loads(resume.read_text())
            self.rows = list(data["rows"])
            self.meta = dict(data["meta"], complete=False, resumed=self.meta.get("date"))
            self.out_dir = resume.parent
            stem = resume.stem
        else:
            stem = result_stem(kind, env, stem_extra)
            self.out_dir = Path(out_dir)
            n = 1
            while enabled and any((self.out_dir / f"{stem}.{ext}").exists() for ext in ("csv", "json")):
                n += 1  # two runs started within the same second: never overwrite the earlier one
                stem = f"{result_stem(kind, env, stem_extra)}-{n}"
        self.csv, self.json, self.png = (self.out_dir / f"{stem}.{ext}" for ext in ("csv", "json", "png"))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            self._flush()

    def _flush(self) -> None:
        self.derive(self.rows)
        if not self.rows:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(self.csv, self.rows)
        write_json(self.json, self.meta, self.rows)

    def finish(self, plot: Optional[Callable[[Path], None]] = None) -> list[Path]:
        """Final derived columns; when enabled, the final CSV/JSON and the PNG. Returns the paths written."""
        self.meta["complete"] = True
        if not self.enabled:
            self.derive(self.rows)
            return []
        self._flush()
        if not self.rows:
            return []
        paths = [self.csv, self.json]
        if plot is not None:
            try:
                plot(self.png)
                paths.append(self.png)
            except ImportError as e:
                print(f"note: no PNG written (matplotlib is not importable: {e})")
        return paths


def bar_plot(path: Path, rows: Sequence[dict], *, facet_keys: Sequence[str], x_key: str, bar_key: str,
             value_key: str, title: str, ylabel: str, bars: Optional[Sequence[str]] = None,
             hline: Optional[float] = 1.0, logy: bool = False,
             err_keys: Optional[tuple[str, str]] = None) -> None:
    """Grouped bar chart (matplotlib, Agg): one panel per distinct ``facet_keys`` value, x positions ``x_key``,
    one bar per ``bar_key`` value, heights ``value_key``; a dashed line at ``hline`` (1: the baseline; None: none);
    ``logy``: log scale; ``err_keys`` = (low, high) row keys drawn as error bars (e.g. p20 / p80)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(value_key)]
    facets = list(dict.fromkeys(tuple(r[k] for k in facet_keys) for r in rows)) or [()]
    bars = [b for b in (bars or list(dict.fromkeys(r[bar_key] for r in rows))) if any(r[bar_key] == b for r in rows)]
    ncol = min(3, len(facets))
    nrow = math.ceil(len(facets) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(8.0, 5.5 * ncol), 3.8 * nrow + 0.6), squeeze=False)
    for ax, facet in zip(axes.flat, facets):
        sub = [r for r in rows if tuple(r[k] for k in facet_keys) == facet]
        xs = list(dict.fromkeys(r[x_key] for r in sub))
        width = 0.8 / max(1, len(bars))
        for j, b in enumerate(bars):
            hit = [next((r for r in sub if r[x_key] == x and r[bar_key] == b), None) for x in xs]
            vals = [r[value_key] if r else 0.0 for r in hit]
            yerr = None
            if err_keys:
                yerr = [[max(0.0, v - (r.get(err_keys[0]) or v)) if r else 0.0 for v, r in zip(vals, hit)],
                        [max(0.0, (r.get(err_keys[1]) or v) - v) if r else 0.0 for v, r in zip(vals, hit)]]
            ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(xs))], vals, width, label=b,
                   yerr=yerr, capsize=1.5 if yerr else 0, error_kw={"lw": 0.6})
        if hline is not None:
            ax.axhline(hline, color="k", lw=0.8, ls="--")
        if logy:
            ax.set_yscale("log")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=45, ha="right", fontsize=7)
        ax.set_title(" ".join(str(f) for f in facet), fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(facets):]:
        ax.axis("off")
    if bars:
        axes.flat[0].legend(fontsize=7)
    else:
        axes.flat[0].text(0.5, 0.5, "no comparison measured", ha="center", transform=axes.flat[0].transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_title(what: str, env: dict) -> str:
    """Two-line PNG title: what, then device | commit | date (and a CPU label for CPU runs)."""
    cpu = " | CPU wall-clock figures, not GPU" if env["device_kind"] != "cuda" else ""
    return f"{what}\n{env['device']} | commit {env['commit']} | {env['date']}{cpu}"


def report_saved(paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            shown = p.resolve().relative_to(ROOT)
        except ValueError:
            shown = p
        print(f"wrote {shown}")


class cpu_threads:
    """Context manager: ``torch.set_num_threads(n)`` for a CPU run (restored on exit); no-op for CUDA runs or
    n = None. CPU runs default to one thread: on a shared 2-core CI machine, multi-threaded timings of tiny ops
    swing by 10-100x with the load of other processes."""

    def __init__(self, n: Optional[int], device: torch.device):
        self.n = n if device.type == "cpu" else None

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)
        return False


def decide_save(args, device: torch.device) -> bool:
    """GPU runs save by default (``--no-save`` turns it off); CPU runs only with ``--save``."""
    if args.no_save:
        return False
    return bool(args.save) or device.type == "cuda"


def add_timing_args(ap, warmup: str, rep: str, check: bool = True) -> None:
    """``--warmup-ms`` / ``--rep-ms`` (do_bench times, ms; ``warmup`` / ``rep`` describe the defaults) and, with
    ``check``, ``--no-check`` (skip the rel_err sanity check)."""
    if check:
        ap.add_argument("--no-check", action="store_true", help="skip the rel_err sanity check")
    ap.add_argument("--warmup-ms", type=float, default=None, help=f"do_bench warm-up (ms; default {warmup})")
    ap.add_argument("--rep-ms", type=float, default=None, help=f"do_bench measuring time (ms; default {rep})")


def run_main(build_parser, body, argv=None) -> int:
    """Parse ``argv``, pick the device (``--cpu``), set CPU threads, then ``body(args, argv, device)``."""
    args = build_parser().parse_args(argv)
    device = pick_device(args.cpu)
    with cpu_threads(args.threads if isinstance(args.threads, int) else None, device):
        return body(args, argv, device)


def add_common_args(ap, threads_list: bool = False) -> None:
    """The options every CLI shares; ``threads_list``: ``--threads`` takes a comma-separated list (the CLI loops over
    it itself; ``run_main`` then leaves the thread count alone)."""
    ap.add_argument("--out", default=str(RESULTS_DIR), help="directory for the CSV/JSON/PNG (default bench/results)")
    ap.add_argument("--save", action="store_true", help="write result files also on CPU (GPU runs always save)")
    ap.add_argument("--no-save", action="store_true", help="do not write result files (also on GPU)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new measurements after this many seconds (the rest are listed as skipped)")
    if threads_list:
        ap.add_argument("--threads", default=None,
                        help="CPU runs: comma-separated torch thread counts to measure, e.g. 1,2")
    else:
        ap.add_argument("--threads", type=int, default=1,
                        help="CPU runs: torch threads (default 1, stable timings on a shared machine)")
    ap.add_argument("--no-measure-bw", action="store_true",
                    help="use the datasheet bandwidth instead of measuring the copy bandwidth")
