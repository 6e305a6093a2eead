"""The CPU side of ``python -m bench.model``: whole SegNeXt models, eager against ``segnext_kernels.fuse``,
torch.compile of each, and the ONNX Runtime / OpenVINO peers, side by side in one process; peak memory in fresh
subprocesses; a cost-against-input-size sweep; the goals of the CPU benchmark issue.

Cases (``model.CPU_CASES``): ADE20K 512x512 batch 1 and Cityscapes 1024x2048 batch 1, inference (eval mode, under
no_grad); one training step at 512x512 batch 1 (forward, cross-entropy against random labels, backward, no optimizer
step; train mode). Models T, S, B; fp32 and bf16 (``torch.autocast("cpu", dtype=torch.bfloat16)``, weights fp32);
2 threads by default (``--threads``).

Variants: ``eager``; ``fused`` (``segnext_kernels.fuse(model)``, the modules swapped in place, same weights);
``compile`` / ``compile_fused`` (``torch.compile(model, dynamic=False)``, default mode; compile time excluded: the
compiling call is the untimed setup call, dynamo's caches are reset at the start of every (model, case, precision);
a failing compile gives its row an ``error: ...`` status and the others go on); ``ort`` and ``openvino`` (the peers
of ``bench/cpu_peers.py``: ``InferenceSession(..., intra_op_num_threads=T)``, ``compile_model(..., "CPU",
{INFERENCE_NUM_THREADS: T, INFERENCE_PRECISION_HINT: f32 | bf16})``, T = the torch thread count; numpy input;
ONNX Runtime fp32 only, so its bf16 rows are n/a; forward only, so their training rows are n/a).

Export (once per model and input shape, into a temporary directory): ``torch.onnx.export(model, (x,), path,
dynamo=False, opset_version=17)`` of the eager fp32 model with the benchmark's weights. The Hamburger's NMF2D draws
fresh random initial bases at every call (also in eval); for the export those bases are drawn once
(``rand_init=False`` on the exported copy) and become a constant of the graph, so that each peer's output can be
checked against eager with the same bases: ``rel_err`` = max |peer - eager| / max |eager| of the first call
(``CHECK FAILED`` above ``CHECK_TOL``; bf16 OpenVINO rows against the fp32 eager output). The torch variants keep
their per-call ``torch.rand`` of (S*B, D, R) = 64 x 256 to 64 x 512 values, noise next to the model.

Timing (as ``bench/msca_cpu.py``, whose reasons hold here: ONNX Runtime's and OpenVINO's worker threads spin after a
call and slow whatever runs next): for one (model, case, precision) every variant is built and called once untimed
(export, session creation, compile, JIT; that time is ``setup_s``), then twice more; then round-robin rounds, in
each round per variant ``warm_calls`` untimed calls, then ``block`` timed calls (``time.perf_counter``). Calls that
take less than ``LONG_CALL_S``: 2 untimed + 5 timed, as bench/msca.py; longer calls (the 1024x2048 cases): 1 untimed
and a block of about ``BLOCK_S`` seconds (one call's spin-down is over long before the next timed one). At least
``MIN_ROUNDS`` rounds and ``--reps`` timed calls per variant (at most ``--max-reps``). median / p20 / p80 ms per
image (or training step) over the timed calls; img/s = batch / median. ``loadavg_start`` / ``loadavg_end``: the
1-minute load average before and after a group's timing (other processes on a shared machine: how noisy it was).

Peak memory (``peak_rss_MiB``): torch has no CPU peak-allocation counter, so the resident set of the process is
measured, in a fresh subprocess per (model, case, precision, variant): the process imports torch and the runtime,
makes the input, then reads its RSS (``base``); then it builds the model (weights; ``fuse`` / ``torch.compile`` / the
peer's session from the exported file), makes two calls (the first compiles), resets the kernel's peak-RSS mark
(``echo 5 > /proc/self/clear_refs``) and makes one more call. The libraries are loaded before the base: the peer's
runtime, and for the torch variants the segnext_kernels CPU extension (one tiny MSCA call, eager rows too). ``peak_rss_MiB`` = VmHWM over that call - base: the
weights, what the runtime keeps between calls (ONNX Runtime's arena, OpenVINO's buffers, inductor's in-process state
for the compile variants) and the call's working memory at its peak. ``held_rss_MiB`` = RSS just before that call -
base (so the call's transient part is ``peak - held``). glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``)
so that freed tensors go back to the system and the transient part is not hidden by a malloc cache. Where
clear_refs cannot be written the peak is ``ru_maxrss`` over the whole child (build and compile included: an upper
bound), said in ``rss_method``.

Sweep (``--sweep``): SegNeXt-T and -B, eager / fused / ONNX Runtime, fp32, batch 1, square inputs 256 to 2048
(``SWEEP_SIZES``), the same timing; a CSV and one PNG of ms against input size (log-log) under ``bench/results/``.

Goals (printed at the end, stored in the JSON's ``meta.goals``; ``python -m bench.model --goals FILE.json`` prints
them from result files): for SegNeXt-T and -B at 512x512 batch 1, fp32, 2 threads: fused / min(ONNX Runtime,
OpenVINO) <= 0.8; eager / fused >= 3; fused bf16 faster than fused fp32; fused peak memory <= eager's.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import common, cpu_peers
from .msca_cpu import _stats  # median / p20 / p80 / reps of a list of ms

DEVICE = torch.device("cpu")
TORCH_VARIANTS = ("eager", "fused", "compile", "compile_fused")
PEER_VARIANTS = cpu_peers.PEERS
#: per round and variant (short calls): untimed calls, then timed calls (as bench/msca_cpu.py)
WARM_CALLS = 2
BLOCK = 5
#: calls longer than this (s) get 1 untimed call and a timed block of about BLOCK_S seconds
LONG_CALL_S = 0.5
BLOCK_S = 1.5
MIN_ROUNDS = 2
#: rel_err above this marks a peer row "CHECK FAILED"
CHECK_TOL = {"fp32": 1e-2, "bf16": 6e-2, "fp16": 6e-2}
SWEEP_SIZES = (256, 512, 768, 1024, 1536, 2048)
SWEEP_MODELS = ("t", "b")
SWEEP_VARIANTS = ("eager", "fused", "ort")
#: glibc: allocations from this size (bytes) are mmap'd and given back on free (the RSS follows live tensors)
MMAP_THRESHOLD = 131072
#: the goals of the CPU benchmark issue
GOAL_MODELS = ("SegNeXt-T", "SegNeXt-B")
GOAL_CASE = "ade512-b1"
GOAL_THREADS = 2
GOAL_PEER_RATIO = 0.8
GOAL_EAGER_SPEEDUP = 3.0
BASELINES = ("eager", "compile", "ort", "openvino")
MEMORY_METHOD = ("peak_rss_MiB = VmHWM over one steady-state call (after the build, the first / compiling call and "
                 "a second call; the mark reset through /proc/self/clear_refs) minus the RSS of the fresh "
                 "subprocess before the model was built (torch and the runtime / the segnext_kernels CPU extension "
                 "loaded, input made); held_rss_MiB "
                 f"= RSS just before that call minus the same base; MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")


# --------------------------------------------------------------------------------------------- inputs, export
def model_input(case, seed: int = 0) -> torch.Tensor:
    """The input ``bench.model.make_fn`` makes for ``case`` (the first draw of its seeded generator)."""
    _, B, H, W = case
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g, device=DEVICE)


def _fixed_bases(model) -> int:
    """Switch every NMF2D of ``model`` to bases drawn once at the next forward (``rand_init=False``)."""
    import segnext

    n = 0
    for m in model.modules():
        if isinstance(m, segnext.NMF2D):
            m.rand_init, m.bases = False, None
            n += 1
    return n


class ModelExporter:
    """ONNX files of the eager fp32 models, one per (model, state id, input shape), in a temporary directory removed
    by ``close``; with each, the eager output on the benchmark input (same fixed NMF bases) for the peer check."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="bench-model-onnx-")
        self._done: dict[tuple, tuple[Path, np.ndarray, float]] = {}

    def get(self, letter: str, state: dict, case) -> tuple[Path, np.ndarray, float]:
        """(path, eager output, export seconds)."""
        from . import model as mb

        key = (letter, id(state), tuple(case[1:]))
        if key not in self._done:
            t0 = time.perf_counter()
            m = mb.build_model(letter, DEVICE)
            m.load_state_dict(state)
            _fixed_bases(m)
            x = model_input(case)
            with torch.no_grad():
                ref = m(x).numpy()  # draws the bases and stores them: the export's constant
            path = Path(self._dir.name) / f"segnext_{letter}_{'x'.join(map(str, case[1:]))}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings of the shape checks
                torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17)
            del m
            gc.collect()
            self._done[key] = (path, ref, time.perf_counter() - t0)
        return self._done[key]

    def close(self) -> None:
        self._dir.cleanup()


def rel_err(out, ref: np.ndarray) -> float:
    o = np.asarray(out, dtype=np.float32)
    return float(np.abs(o - ref).max() / max(float(np.abs(ref).max()), 1e-30))


# --------------------------------------------------------------------------------------------- variants
def skip_reason(variant: str, mode: str, precision: str) -> Optional[str]:
    """Why a variant does not run a (mode, precision), or None."""
    if variant in PEER_VARIANTS:
        ok, why = cpu_peers.peer_status(variant, precision, "fwd" if mode == "infer" else "fwdbwd")
        if not ok:
            return "n/a (forward only: the peers run inference, no training step)" if mode == "train" and \
                why.startswith("n/a") else why
    return None


def build_variant(variant: str, letter: str, state: dict, case, precision: str, threads: int, fuse_backend: str,
                  exporter: Optional[ModelExporter]):
    """``(fn, info, ref)``: ``fn()`` runs one call; ``info`` holds row columns (fused modules and backends, code,
    peer settings); ``ref`` is the eager output to check the first call against (peers) or None."""
    from . import model as mb

    if variant in PEER_VARIANTS:
        path, ref, _ = exporter.get(letter, state, case)
        run, info = cpu_peers.build_peer(variant, path, threads, precision)
        x = np.ascontiguousarray(model_input(case).numpy())
        info["code"] = cpu_peers.LABELS[variant]
        return (lambda: run(x)), info, ref
    model = mb.build_model(letter, DEVICE)
    model.load_state_dict(state)
    info = {}
    if variant.endswith("fused"):
        fuse_fn, _ = mb.resolve_fuse()
        info["fused_modules"] = str(fuse_fn(model, backend=fuse_backend))
        res = mb.resolved_backends(model, DEVICE)
        info["fused_backends"] = mb.describe_backends(res)
        code = mb.fused_code(res)
        info["peer_settings"] = fused_settings()
    else:
        code = "eager ops"
    info["code"] = ("compiled " + code) if variant.startswith("compile") else code
    model.train(case[0] == "train")
    run_model = torch.compile(model, dynamic=False) if variant.startswith("compile") else model
    return mb.make_fn(run_model, case, precision, DEVICE), info, None


def block_plan(call_s: float) -> tuple[int, int]:
    """(untimed calls, timed calls) per round for a variant whose call takes ``call_s`` seconds."""
    if call_s < LONG_CALL_S:
        return WARM_CALLS, BLOCK
    return 1, max(1, min(BLOCK, round(BLOCK_S / call_s)))


# --------------------------------------------------------------------------------------------- peak memory
def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def fused_settings() -> str:
    """The knobs of the fused rows that change speed or memory (``segnext_kernels.knobs``, read from the
    environment at import): the CPU extension's output-cache limit."""
    from segnext_kernels import knobs

    return (f"output cache {knobs.KNOBS.cpu_output_cache_mib} MiB (SEGNEXT_CPU_OUTPUT_CACHE_MIB; idle big outputs "
            f"kept resident between calls)")


def mem_child(spec: dict) -> dict:
    """Run in a fresh process (``python -m bench.model_cpu --mem-child JSON``): peak RSS of one call of one variant
    (module docstring). ``spec``: letter, mode, B, H, W, precision, variant, threads, fuse_backend, onnx (peers)."""
    from . import model as mb

    torch.set_num_threads(spec["threads"])
    case = (spec["mode"], spec["B"], spec["H"], spec["W"])
    variant, prec = spec["variant"], spec["precision"]
    if variant in PEER_VARIANTS:
        __import__(cpu_peers._MODULES[variant])  # the runtime's libraries are loaded before the base
        x = np.ascontiguousarray(model_input(case).numpy())
    else:  # the segnext_kernels CPU extension is loaded before the base too (one tiny MSCA call), for every torch
        import segnext_kernels  # variant alike: the fused row then counts no library code

        from . import msca as msca_bench

        us, _, w = msca_bench.make_inputs((1, 8, 8, 8), torch.float32, DEVICE, 1)
        try:
            with torch.no_grad():
                segnext_kernels.msca(us[0], *w, backend=spec["fuse_backend"])
        except Exception:  # noqa: BLE001 - a backend that cannot run fails the real call below, with its error
            pass
        del us, w
        x = None
    gc.collect()
    base = _status_kib("VmRSS")
    if variant in PEER_VARIANTS:
        run, _ = cpu_peers.build_peer(variant, Path(spec["onnx"]), spec["threads"], prec)

        def fn():
            return run(x)
    else:
        torch.manual_seed(0)
        model = mb.build_model(spec["letter"], DEVICE)
        if variant.endswith("fused"):
            mb.resolve_fuse()[0](model, backend=spec["fuse_backend"])
        model.train(spec["mode"] == "train")
        run_model = torch.compile(model, dynamic=False) if variant.startswith("compile") else model
        fn = mb.make_fn(run_model, case, prec, DEVICE)
    fn()
    fn()
    gc.collect()
    held = _status_kib("VmRSS")
    reset = _reset_peak()
    fn()
    if reset:
        peak, method = _status_kib("VmHWM"), "VmHWM over one call after /proc/self/clear_refs, minus the base RSS"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss over the whole child (build and compile included: an upper bound), minus the base RSS"
    return {"peak_rss_MiB": round((peak - base) / 1024, 1), "held_rss_MiB": round((held - base) / 1024, 1),
            "base_rss_MiB": round(base / 1024, 1), "rss_method": method}


def measure_memory(spec: dict, timeout_s: float = 3600) -> dict:
    """``mem_child(spec)`` in a fresh subprocess (glibc's mmap threshold pinned); on failure
    ``{"mem_status": "error: ..."}``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, "-m", "bench.model_cpu", "--mem-child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=common.ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"mem_status": f"error: the memory subprocess ran past {timeout_s:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("MEM "):
            return dict(json.loads(line[4:]), mem_status="ok")
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"mem_status": f"error: memory subprocess exit {p.returncode}: {tail[:160]}"}


# --------------------------------------------------------------------------------------------- one group
def run_group(letter: str, state: dict, cname: str, case, precision: str, variants, threads: int, env_meta: dict,
              budget: common.Budget, *, fuse_backend: str, exporter: ModelExporter, memory: bool, min_reps: int,
              max_reps: int, min_s: float, extra: Optional[dict] = None) -> list[dict]:
    """Every variant of one (model, case, precision), timed round-robin; then, one subprocess each, their peak
    memory. Returns the rows."""
    mode, B, H, W = case
    name = f"SegNeXt-{letter.upper()}"
    rows, group = [], []
    if any(v.startswith("compile") for v in variants):
        common.compile_reset()
    for variant in variants:
        row = dict(env_meta, model=name, case=cname, mode=mode, batch=B, H=H, W=W, precision=precision,
                   variant=variant, threads=threads, status="ok", median_ms=None, p20_ms=None, p80_ms=None,
                   reps=None, img_per_s=None, setup_s=None, rel_err=None, peak_rss_MiB=None, held_rss_MiB=None,
                   rss_method=None, mem_status=None, fused_modules=None, fused_backends=None, code=None,
                   peer_settings=None, warm_calls=None, block=None, **(extra or {}))
        rows.append(row)
        why = skip_reason(variant, mode, precision)
        if why:
            row["status"] = why
            continue
        if budget.spent():
            row["status"] = "skipped (time budget)"
            continue
        try:
            if variant in PEER_VARIANTS:  # the export (once per model and shape) is not part of setup_s
                row["export_s"] = round(exporter.get(letter, state, case)[2], 3)
            t0 = time.perf_counter()
            fn, info, ref = build_variant(variant, letter, state, case, precision, threads, fuse_backend, exporter)
            row.update(info)
            out = fn()  # export / session / compile / JIT / first call outside the timing
            row["setup_s"] = round(time.perf_counter() - t0, 3)
            if ref is not None:
                row["rel_err"] = rel_err(out, ref)
                if not row["rel_err"] <= CHECK_TOL[precision]:
                    row["status"] = f"CHECK FAILED (rel_err > {CHECK_TOL[precision]:g})"
            del out
            fn()
            t0 = time.perf_counter()
            fn()
            row["warm_calls"], row["block"] = block_plan(time.perf_counter() - t0)
            group.append((row, fn))
        except Exception as e:  # noqa: BLE001 - a failing compile / export / backend must not hide the others
            row["status"] = common.short_error(e)
    if group:
        load0 = _loadavg()
        times, rounds = common.round_robin([fn for _, fn in group], [(r["warm_calls"], r["block"]) for r, _ in group],
                                           min_reps=min_reps, max_reps=max_reps, min_s=min_s, min_rounds=MIN_ROUNDS)
        load1 = _loadavg()
        for (row, _), ts in zip(group, times):
            row.update(_stats(ts), rounds=rounds, loadavg_start=load0, loadavg_end=load1)
            row["img_per_s"] = B * 1e3 / row["median_ms"]
    del group
    gc.collect()
    if memory:
        for row in rows:
            if row["median_ms"] is None:
                continue
            spec = dict(letter=letter, mode=mode, B=B, H=H, W=W, precision=precision, variant=row["variant"],
                        threads=threads, fuse_backend=fuse_backend)
            if row["variant"] in PEER_VARIANTS:
                spec["onnx"] = str(exporter.get(letter, state, case)[0])
            row.update(measure_memory(spec))
    return rows


def _loadavg() -> Optional[float]:
    """The 1-minute load average (other processes on a shared machine: it says how noisy a timing was)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _print_row(row: dict) -> None:
    med = f"{row['median_ms']:.1f} ms" if row.get("median_ms") else "-"
    mem = f"{row['peak_rss_MiB']:.0f} MiB" if row.get("peak_rss_MiB") is not None else "-"
    err = f" rel_err {row['rel_err']:.1e}" if row.get("rel_err") is not None else ""
    ran = f" [{row['fused_backends']}]" if row.get("fused_backends") else ""
    print(f"  {row['model']:10s} {row['case']:17s} {row['precision']:4s} {row['variant']:13s} {med:>10s} "
          f"{mem:>9s}  {row['status']}{err}{ran}", flush=True)


def run_matrix(models, cases: dict, precisions, variants, threads: int, env_meta: dict, budget: common.Budget, *,
               fuse_backend: str, memory: bool, min_reps: int, max_reps: int, min_s: float,
               on_row=None, sweep: bool = False) -> list[dict]:
    """Every (model, case, precision) group (``run_group``); one weight set per model (seed 0) shared by all
    variants and the export."""
    from . import model as mb

    rows = []
    exporter = ModelExporter()
    try:
        for letter in models:
            torch.manual_seed(0)
            state = {k: v.clone() for k, v in mb.build_model(letter, DEVICE).state_dict().items()}
            for cname, case in cases.items():
                for prec in precisions:
                    extra = {"size": case[2]} if sweep else None
                    for row in run_group(letter, state, cname, case, prec, variants, threads, env_meta, budget,
                                         fuse_backend=fuse_backend, exporter=exporter, memory=memory,
                                         min_reps=min_reps, max_reps=max_reps, min_s=min_s, extra=extra):
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
                        _print_row(row)
            del state
            gc.collect()
    finally:
        exporter.close()
    return rows


# --------------------------------------------------------------------------------------------- derived, goals
def derive(rows: list[dict]) -> None:
    """Speedup columns (``vs_eager``, ``vs_compile``, ``vs_ort``, ``vs_openvino``: that variant's median / this one,
    with the spread), ``best_peer`` / ``ms_vs_best_peer`` (this median / the faster peer's median: lower is better)
    and ``mem_vs_eager`` (peak RSS / eager's)."""
    from . import model as mb

    keys = mb.GROUP_KEYS + ("threads",)
    common.add_derived(rows, keys, BASELINES, impl_key="variant")
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), {})[r["variant"]] = r
    for r in rows:
        g = groups[tuple(r.get(k) for k in keys)]
        peers = [g[p] for p in PEER_VARIANTS if p in g and g[p].get("median_ms") and _ok(g[p])]
        best = min(peers, key=lambda p: p["median_ms"]) if peers else None
        r["best_peer"] = best["variant"] if best else None
        r["ms_vs_best_peer"] = r["median_ms"] / best["median_ms"] if best and r.get("median_ms") else None
        e = g.get("eager")
        r["mem_vs_eager"] = (r["peak_rss_MiB"] / e["peak_rss_MiB"] if e and e.get("peak_rss_MiB") and
                             r.get("peak_rss_MiB") is not None else None)


def _ok(r: dict) -> bool:
    return bool(r.get("median_ms")) and str(r.get("status", "")).startswith("ok")


def _num(v):
    """A CSV / JSON cell as a float (None for '' / None)."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals for SegNeXt-T and -B at 512x512 batch 1, fp32, 2 threads: one dict per (goal, model) with
    ``goal``, ``model``, ``value``, ``target``, ``verdict`` ("met", "missed", "not measured") and ``text``."""
    out = []

    def pick(model, variant, precision="fp32"):
        for r in rows:
            if (r.get("model"), r.get("case"), r.get("precision"), r.get("variant")) == (model, GOAL_CASE, precision,
                                                                                        variant) \
                    and str(r.get("threads")) == str(GOAL_THREADS) and _ok(r):
                return r
        return None

    def add(goal, model, value, target, met, text):
        out.append({"goal": goal, "model": model, "value": value, "target": target,
                    "verdict": "not measured" if met is None else ("met" if met else "missed"), "text": text})

    def spread(num, den, target):
        """' (p20-p80 range lo-hi)' of the ratio num / den of two rows' medians; says when the range holds the
        target (the verdict, from the medians, is then within the noise of this run)."""
        lo, hi = (_num(num.get("p20_ms")), _num(den.get("p80_ms"))), (_num(num.get("p80_ms")), _num(den.get("p20_ms")))
        if not all(lo) or not all(hi):
            return ""
        a, b = lo[0] / lo[1], hi[0] / hi[1]
        return f" (p20-p80 range {a:.2f}-{b:.2f}" + (", which holds the goal's bound: within noise)" if a <= target <= b
                                                     else ")")

    for model in GOAL_MODELS:
        fused, eager = pick(model, "fused"), pick(model, "eager")
        peers = [r for r in (pick(model, "ort"), pick(model, "openvino")) if r]
        if fused and peers:
            best = min(peers, key=lambda r: _num(r["median_ms"]))
            v = _num(fused["median_ms"]) / _num(best["median_ms"])
            add("fused <= 0.8x the faster peer", model, v, GOAL_PEER_RATIO, v <= GOAL_PEER_RATIO,
                f"fused {_num(fused['median_ms']):.1f} ms / {best['variant']} {_num(best['median_ms']):.1f} ms = "
                f"{v:.2f}x{spread(fused, best, GOAL_PEER_RATIO)} (goal <= {GOAL_PEER_RATIO})")
        else:
            add("fused <= 0.8x the faster peer", model, None, GOAL_PEER_RATIO, None,
                "not measured (needs fused and ort or openvino rows, fp32, 512x512, 2 threads)")
        if fused and eager:
            v = _num(eager["median_ms"]) / _num(fused["median_ms"])
            add("fused >= 3x faster than eager", model, v, GOAL_EAGER_SPEEDUP, v >= GOAL_EAGER_SPEEDUP,
                f"eager {_num(eager['median_ms']):.1f} ms / fused {_num(fused['median_ms']):.1f} ms = {v:.2f}x"
                f"{spread(eager, fused, GOAL_EAGER_SPEEDUP)} (goal >= {GOAL_EAGER_SPEEDUP:g})")
        else:
            add("fused >= 3x faster than eager", model, None, GOAL_EAGER_SPEEDUP, None,
                "not measured (needs eager and fused rows, fp32, 512x512, 2 threads)")
        fm, em = (_num(fused.get("peak_rss_MiB")) if fused else None), (_num(eager.get("peak_rss_MiB")) if eager
                                                                         else None)
        if fm is not None and em is not None:
            add("fused peak memory <= eager's", model, fm - em, 0.0, fm <= em,
                f"fused {fm:.0f} MiB vs eager {em:.0f} MiB peak RSS ({fm - em:+.0f} MiB)")
        else:
            add("fused peak memory <= eager's", model, None, 0.0, None,
                "not measured (needs peak_rss_MiB of eager and fused, fp32, 512x512, 2 threads)")
        fb = pick(model, "fused", "bf16")
        if fused and fb:
            v = _num(fused["median_ms"]) / _num(fb["median_ms"])
            add("fused bf16 faster than fused fp32", model, v, 1.0, v > 1.0,
                f"fused fp32 {_num(fused['median_ms']):.1f} ms / bf16 {_num(fb['median_ms']):.1f} ms = {v:.2f}x"
                f"{spread(fused, fb, 1.0)} (goal > 1)")
        else:
            add("fused bf16 faster than fused fp32", model, None, 1.0, None,
                "not measured (needs fused fp32 and bf16 rows, 512x512, 2 threads)")
    return out


def goals_text(gs: list[dict]) -> str:
    lines = [f"Goals (SegNeXt-T and -B, {GOAL_CASE}, fp32, {GOAL_THREADS} threads, batch 1; medians):"]
    for g in gs:
        lines.append(f"  {g['verdict'].upper():12s} {g['model']:10s} {g['goal']}: {g['text']}")
    met = sum(g["verdict"] == "met" for g in gs)
    missed = sum(g["verdict"] == "missed" for g in gs)
    lines.append(f"  {met} met, {missed} missed, {len(gs) - met - missed} not measured")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- tables, plots
def table(rows: list[dict]) -> str:
    present = [b for b in BASELINES if any(r["variant"] == b and r.get("median_ms") for r in rows)]
    cols = [("model", "model", "s"), ("case", "case", "s"), ("prec", "precision", "s"), ("variant", "variant", "s"),
            ("median ms", "median_ms", ".1f"), ("p20 ms", "p20_ms", ".1f"), ("p80 ms", "p80_ms", ".1f"),
            ("img/s", "img_per_s", "g3")]
    cols += [(f"vs {b}", f"vs_{b}", "s") for b in present]
    cols += [("/ best peer", "ms_vs_best_peer", "x"), ("peak RSS MiB", "peak_rss_MiB", ".0f"),
             ("held MiB", "held_rss_MiB", ".0f"), ("rel_err", "rel_err", ".1e"), ("setup s", "setup_s", ".1f"),
             ("status", "status", "s")]
    return common.format_table(common.sort_rows(rows, ("model", "case", "precision")), cols)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Median ms (log scale, p20-p80 bars) by model, one bar per variant, one panel per (case, precision)."""
    common.bar_plot(path, rows, facet_keys=("case", "precision"), x_key="model", bar_key="variant",
                    value_key="median_ms", title=title, ylabel="ms per image / step (log; p20-p80)", hline=None,
                    logy=True, err_keys=("p20_ms", "p80_ms"))


def sweep_plot(rows: list[dict], path: Path, title: str) -> None:
    """ms against input size (square, log-log), one line per (model, variant), p20-p80 error bars; beside it the
    fused model's speedup over eager and over ONNX Runtime by size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("median_ms") and _ok(r)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    sizes = sorted({int(r["size"]) for r in ok})
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    color = {v: f"C{i}" for i, v in enumerate(variants)}
    for mi, model in enumerate(dict.fromkeys(r["model"] for r in ok)):
        ls, marker = ("-", "--", ":", "-.")[mi % 4], "osd^"[mi % 4]
        for variant in variants:
            pts = sorted((int(r["size"]), r) for r in ok if r["model"] == model and r["variant"] == variant)
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ys = [r["median_ms"] for _, r in pts]
            err = [[max(0.0, r["median_ms"] - (r.get("p20_ms") or r["median_ms"])) for _, r in pts],
                   [max(0.0, (r.get("p80_ms") or r["median_ms"]) - r["median_ms"]) for _, r in pts]]
            ax.errorbar(xs, ys, yerr=err, marker=marker, ms=4, ls=ls, color=color[variant], capsize=2,
                        label=f"{model[-1]} {variant}")
        for base in ("eager", "ort"):
            pts = sorted((int(r["size"]), r) for r in ok if r["model"] == model and r["variant"] == "fused")
            ratio = []
            for s, r in pts:
                b = next((x for x in ok if x["model"] == model and x["variant"] == base and int(x["size"]) == s),
                         None)
                if b:
                    ratio.append((s, b["median_ms"] / r["median_ms"]))
            if ratio:
                ax2.plot([s for s, _ in ratio], [v for _, v in ratio], marker=marker, ms=4, ls=ls,
                         color=color.get(base, "k"), label=f"{model[-1]} fused vs {base}")
    for a in (ax, ax2):
        a.set_xscale("log")
        if sizes:
            a.set_xticks(sizes)
            a.set_xticklabels([str(s) for s in sizes], fontsize=8)
            a.minorticks_off()
        a.set_xlabel("input H = W (pixels, batch 1)", fontsize=8)
        a.grid(alpha=0.3, which="both")
    ax.set_yscale("log")
    ax.set_ylabel("median ms per image (log; p20-p80)", fontsize=8)
    ax.set_title("cost against input size", fontsize=9)
    ax2.axhline(1.0, color="k", lw=0.8, ls="--")
    ax2.set_ylabel("speedup (x): other's median / fused median", fontsize=8)
    ax2.set_title("fused against eager and ONNX Runtime", fontsize=9)
    for a in (ax, ax2):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
        else:
            a.text(0.5, 0.5, "nothing measured", ha="center", transform=a.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(rows: list[dict]) -> str:
    cols = [("model", "model", "s"), ("size", "size", "s"), ("variant", "variant", "s"),
            ("median ms", "median_ms", ".1f"), ("p20 ms", "p20_ms", ".1f"), ("p80 ms", "p80_ms", ".1f"),
            ("ms/Mpx", "ms_per_Mpx", ".1f"), ("vs eager", "vs_eager", "s"), ("vs ort", "vs_ort", "s"),
            ("rel_err", "rel_err", ".1e"), ("status", "status", "s")]
    return common.format_table(common.sort_rows(rows, ("model", "size")), cols)


# --------------------------------------------------------------------------------------------- CLI
def load_rows(paths) -> list[dict]:
    """Rows of result JSON files (CSV path accepted: its JSON twin is read), numbers as floats."""
    rows = []
    for p in paths:
        data = json.loads(Path(p).with_suffix(".json").read_text())
        for r in data["rows"]:
            rows.append({k: (_num(v) if k in ("median_ms", "p20_ms", "p80_ms", "peak_rss_MiB", "held_rss_MiB")
                             else v) for k, v in r.items()})
    return rows


def main_goals(paths) -> int:
    rows = load_rows(paths)
    derive(rows)
    print(goals_text(goals(rows)))
    return 0


def main_cpu(args, argv) -> int:
    from . import model as mb

    threads = args.threads or GOAL_THREADS
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _main_cpu(args, argv, threads, mb)
    finally:
        torch.set_num_threads(saved_threads)


def parse_sizes(text: str) -> list[int]:
    """'256,512' -> [256, 512]: positive multiples of 32 (the network's total stride)."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 32 or s % 32 for s in sizes):
        raise SystemExit(f"--sizes: expected comma-separated multiples of 32, got {text!r}")
    return list(dict.fromkeys(sizes))


def _selection(args, mb):
    """(models, cases, precisions, variants, subset) of a CPU run from the options."""
    sweep, quick = args.sweep, args.quick and not args.sweep
    preset = mb.CPU_QUICK if quick else mb.CPU_FULL
    if sweep:
        models = common.parse_list(args.models or ",".join(SWEEP_MODELS), mb.MODELS, "--models")
        sizes = parse_sizes(args.sizes) if args.sizes else list(SWEEP_SIZES)
        cases = {f"sq{s}": ("infer", 1, s, s) for s in sizes}
        precisions = ["fp32"]
        variants = common.parse_list(args.variants or ",".join(SWEEP_VARIANTS), mb.VARIANTS, "--variants")
        return models, cases, precisions, variants, "sweep"
    models = common.parse_list(args.models or ",".join(preset["models"]), mb.MODELS, "--models")
    if args.shape or args.train_shape:
        cases = mb.custom_cases(args)
        subset = "custom"
    elif args.cases:
        allowed = dict(mb.CASES, **mb.CPU_CASES)
        cases = {n: allowed[n] for n in common.parse_list(args.cases, list(allowed), "--cases")}
        subset = "selection"
    else:
        cases = {n: mb.CPU_CASES[n] for n in preset["cases"]}
        subset = "quick" if quick else "full"
    precisions = common.parse_list(args.precision or ",".join(preset["precisions"]), mb.PRECISIONS, "--precision")
    variants = common.parse_list(args.variants or ",".join(preset["variants"]), mb.VARIANTS, "--variants")
    if subset == "full" and (args.models or args.precision or args.variants):
        subset = "selection"
    return models, cases, precisions, variants, subset


def _main_cpu(args, argv, threads: int, mb) -> int:
    models, cases, precisions, variants, subset = _selection(args, mb)
    sweep = subset == "sweep"
    memory = not args.no_memory and not sweep
    notes = []
    fuse_fn, fuse_desc = mb.resolve_fuse()
    if any(v.endswith("fused") for v in variants):
        notes.append(f"fused = {fuse_desc}, backend={args.fuse_backend!r}; the backend each swapped module runs is "
                     "recorded (fused_backends); where all resolve to the reference, fused runs the eager ops "
                     "('same code', no ratio)")
    if any(v.startswith("compile") for v in variants):
        notes.append("compile = torch.compile(model, dynamic=False), default mode; compile time excluded (setup_s)")
    if any(v in PEER_VARIANTS for v in variants):
        notes.append(f"peers: eager fp32 model exported once per model and shape (opset 17, NMF bases fixed for the "
                     f"check); ort intra_op_num_threads={threads} (fp32 only), openvino INFERENCE_NUM_THREADS="
                     f"{threads} with INFERENCE_PRECISION_HINT f32 / bf16; forward only")
    notes.append("timing: variants round-robin, per round 2 untimed + 5 timed calls (1 untimed + ~1.5 s of calls "
                 "when a call takes over 0.5 s); median / p20 / p80 ms")
    notes.append("peak memory: " + ("peak_rss_MiB = VmHWM over one call - RSS before the model was built, in a fresh "
                                    "subprocess per row (bench/model_cpu.py docstring)" if memory else
                                    "not measured (--no-memory" + (", --sweep" if sweep else "") + ")"))
    load, cores = _loadavg(), os.cpu_count() or 1
    if load is not None and load > 0.75 * cores:
        notes.append(f"the machine is busy (1-minute load average {load:.1f} on {cores} cores, the last minute's "
                     "processes included): other processes share the cores, torch's OpenMP threads suffer most; "
                     "timings may be noisy (loadavg_* columns)")
    save = not args.no_save and bool(args.save)
    if not save:
        notes.append("result files are written only with --save")
    env = common.environment(DEVICE)
    meta_cols = common.run_meta("model_sweep" if sweep else "model", env,
                                {"hbm_GBps": None, "hbm_source": "none", "hbm_peak_GBps": None,
                                 "fma_peak_TFLOPs": None})
    common.print_header("SegNeXt whole-model benchmark on CPU" + (" (size sweep)" if sweep else
                                                                   f" ({subset})"), env, None, notes)
    shown = ", ".join(f"{n} {c[0]} {c[1]}x3x{c[2]}x{c[3]}" for n, c in cases.items())
    print(f"cpu: {env['cpu_model']}; threads {threads}; onnxruntime {env['onnxruntime']}, openvino "
          f"{env['openvino']}\nmodels {','.join(models)}; cases {shown}; precisions {','.join(precisions)}; "
          f"variants {','.join(variants)}", flush=True)
    meta = dict(env, kind="model_sweep" if sweep else "model", subset=subset, notes=notes, fuse=fuse_desc,
                fuse_backend=args.fuse_backend, argv=list(sys.argv[1:] if argv is None else argv),
                paper_claim=mb.PAPER_CLAIM, memory_method=MEMORY_METHOD if memory else None,
                timing="round-robin, per round and variant 2 untimed + 5 timed calls (calls over 0.5 s: 1 untimed "
                       "+ a block of ~1.5 s); time.perf_counter; median/p20/p80 over the timed calls",
                matrix={"models": models, "cases": cases, "precisions": precisions, "variants": variants,
                        "threads": threads})
    tag = f"_t{threads}_torch{torch.__version__.split('+')[0]}"
    tag += f"-ort{env['onnxruntime']}-ov{env['openvino']}" if any(v in PEER_VARIANTS for v in variants) else ""

    def derive_all(rs):
        derive(rs)
        for r in rs:
            if r.get("median_ms") and sweep:
                r["ms_per_Mpx"] = r["median_ms"] / (r["batch"] * r["H"] * r["W"] / 1e6)
    writer = common.ResultWriter("model-sweep" if sweep else "model", env, meta, Path(args.out), save, derive_all,
                                 stem_extra=tag.replace("+", ""))
    rows = run_matrix(models, cases, precisions, variants, threads, meta_cols, common.Budget(args.budget_s),
                      fuse_backend=args.fuse_backend, memory=memory, min_reps=args.reps, max_reps=args.max_reps,
                      min_s=args.min_s, on_row=writer.add, sweep=sweep)
    derive_all(rows)
    gs = goals(rows)
    writer.meta["goals"] = gs
    if sweep:
        title = common.plot_title("SegNeXt on CPU: ms against input size (fp32, batch 1)", env)
        paths = writer.finish(lambda p: sweep_plot(rows, p, title))
    else:
        title = common.plot_title(f"SegNeXt on CPU, {threads} threads: median ms per image / training step", env)
        paths = writer.finish(lambda p: plot(rows, p, title))
    print()
    print(f"SegNeXt on CPU ({env['cpu_model']}, {threads} threads; wall-clock medians; vs X = X's median / this "
          "median with its p20/p80 range, ~same = spreads overlap, same code = no ratio; / best peer = this median / "
          "the faster of ONNX Runtime and OpenVINO; peak RSS = VmHWM of one call - RSS before the model)")
    print(sweep_table(rows) if sweep else table(rows))
    if not sweep:
        print()
        print(mb.paper_line(rows, env["device"]))
        print()
        print(goals_text(gs))
    common.report_saved(paths)
    bad = [r for r in rows if str(r["status"]).startswith("CHECK FAILED")]
    if bad:
        print(f"!! {len(bad)} row(s) failed the output check (see status)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--mem-child":
        print("MEM " + json.dumps(mem_child(json.loads(sys.argv[2]))), flush=True)
        raise SystemExit(0)
    raise SystemExit("usage: python -m bench.model ...  (this module is its CPU side)")
