"""MSCA benchmark: the fused backends (cuda, triton, cpu, reference) against eager PyTorch (NCHW and channels_last),
torch.compile (default and max-autotune) and, on CPU, ONNX Runtime and OpenVINO, for every SegNeXt stage shape,
dtype and mode.

    python -m bench.msca [--quick | --full] [--shape B,C,H,W ... | --shapes NAME,...] [--dtype fp32,fp16,bf16]
                         [--mode fwd,fwdbwd] [--threads 1,2] [--backends cuda,cuda_fma,triton,cpu,reference]
                         [--baselines eager_nchw,eager_cl,compile,compile_max,ort,openvino,openvino_default]
                         [--resume FILE.json] [--out DIR] [--save | --no-save] [--budget-s S] [--cpu]

Shapes (``SHAPES``): ADE20K 512x512 batch 16, stages 128, 64, 32, 16 pixels square; Cityscapes 2048x1024 (W x H)
batch 1, stages 256x512, 128x256, 64x128, 32x64 (H x W); channels T (32, 64, 160, 256) and S/B/L
(64, 128, 320, 512; the three share the stage widths, hence one "SBL" shape); and for CPU runs the ADE20K stages
at batch 1 (``ade512b1-*``).

On CPU (no GPU, or ``--cpu``; ``bench/msca_cpu.py`` has the details): the default run (``.ci/run``; about 25 s on
2 cores) is SegNeXt-T stage 1 at 512x512 (1, 32, 128, 128), fwd, fp32, 2 threads, every implementation: the
``cpu`` backend (rows say ``skipped: <reason>`` while it is missing), ``reference``, eager NCHW / channels_last,
torch.compile (inductor) and the ONNX Runtime / OpenVINO peers (``bench/cpu_peers.py``), timed round-robin.
``--full``: every batch-1 shape of T and S/B/L at 512x512 and 1024x2048, fp32 and bf16, fwd and fwdbwd, 1 and 2
threads, saved (tens of minutes on 2 shared cores: the eight 512x512 shapes alone took 54 min at load 8-12, the
1024x2048 ones are 8x larger; bf16 fwdbwd is the slowest part); select a
subset with --shapes / --dtype / --mode / --threads / --backends / --baselines, continue a cut-off run with
``--resume FILE.json`` (``bench.report`` merges the files of one CPU and commit).

Backends: ``cuda`` (the default depthwise variant: tensor cores for fp16/bf16), ``cuda_fma`` (the cuda backend with
``segnext_kernels.knobs.KNOBS.msca_cuda_dw = "fma"`` during its rows: its depthwise part on fp32 FMA; fp16/bf16 rows
only), ``triton``, ``reference``.

Modes: ``fwd`` (forward under no_grad) and ``fwdbwd`` (forward + ``torch.autograd.grad`` of every input: u and the
16 weight/bias tensors, with a random grad_out).

Columns: median / p20 / p80 in ms; ``vs <baseline>`` = baseline median / this median (higher is faster) with its
range over the two p20-p80 spreads, e.g. ``3.1x (2.8-3.4)``; ``~same`` when the spreads overlap (no measurable
difference) and ``same code`` when both run the same code (no ratio: ``common.compare_timings``); GB/s and
TFLOP/s from the models below; ``%HBM`` and ``%FMA`` = floor time / median (``bench/common.py``); ``rel_err`` =
max |out - ref| / max |ref| of the forward output against an fp32 eager reference on the same input (a sanity
check that flags garbage, not the correctness test; limits ``CHECK_TOL``).

Byte model (minimum HBM traffic of a fully fused implementation that recomputes its intermediates; weights, a few
KB to 0.5 MB, are not counted), E = B*C*H*W elements of s bytes (dtype size):
  fwd:    read u + write out                                  = 2 * E * s bytes
  fwdbwd: fwd + (read u, read grad_out, write grad_u)         = 5 * E * s bytes

FLOP model (per output element, a multiply-add = 2 FLOP; the useful work of the math, recompute not counted):
  fwd:    depthwise taps 25 + 2*(7+11+21) = 103 MAC = 206; biases of the 7 depthwise convs 7; sum of the 4 branches
          3; 1x1 mix C MAC = 2C; its bias 1; gating multiply 1                        -> 2C + 218 FLOP
  bwd:    depthwise data gradient (transposed strips 78 + transposed 5x5 25 = 103 MAC) 206; depthwise weight
          gradients (103 MAC) 206; d_s = W3^T d_att (C MAC) 2C; dW3 = d_att s^T (C MAC) 2C; elementwise 14
          (d_att = g*u, du_gate = g*att, 3 branch-gradient adds, du add, 8 bias-gradient sums) -> 4C + 426 FLOP
  fwdbwd: 6C + 644 FLOP.
FMA floor: the depthwise taps on the fp32 FMA pipe only (103 MAC fwd, 309 MAC fwdbwd per element; the 1x1 belongs
on tensor cores and is neglected), i.e. ``fma_flops`` = 206 E (fwd) and 618 E (fwdbwd), over the datasheet fp32
FMA rate (H100 SXM 67 TFLOP/s). Packed half2 math would halve it for fp16/bf16; the floor stays fp32 (the kernels
accumulate in fp32).

torch.compile: ``torch.compile(msca_reference, dynamic=False)``, caches reset before each case (fresh compile,
compile time excluded: one call before timing). max-autotune enables CUDA graphs, whose input copy into the
graph's static buffers is part of its time.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from . import common

#: name -> (B, C, H, W); "SBL" = SegNeXt-S/B/L (same stage widths).
SHAPES: dict[str, tuple[int, int, int, int]] = {}
_WIDTHS = {"T": (32, 64, 160, 256), "SBL": (64, 128, 320, 512)}
for _v, _cs in _WIDTHS.items():
    for _i, _c in enumerate(_cs):
        SHAPES[f"ade512-{_v}-s{_i + 1}"] = (16, _c, 128 >> _i, 128 >> _i)
for _v, _cs in _WIDTHS.items():
    for _i, _c in enumerate(_cs):
        SHAPES[f"city-{_v}-s{_i + 1}"] = (1, _c, 256 >> _i, 512 >> _i)
#: CPU shapes: the ADE20K 512x512 stages at batch 1 (and the Cityscapes ones above, batch 1 already)
for _v, _cs in _WIDTHS.items():
    for _i, _c in enumerate(_cs):
        SHAPES[f"ade512b1-{_v}-s{_i + 1}"] = (1, _c, 128 >> _i, 128 >> _i)
CPU_SHAPES = {n: s for n, s in sorted(SHAPES.items(), key=lambda t: not t[0].startswith("ade512b1")) if s[0] == 1}
#: the default CPU run (.ci/run): one representative shape (SegNeXt-T stage 1 at 512x512), fwd, fp32, 2 threads
CPU_DEFAULT = dict(shapes=("ade512b1-T-s1",), dtypes=("fp32",), modes=("fwd",), threads=(2,))
#: --full on CPU: every batch-1 stage shape, fp32 and bf16, fwd and fwdbwd, 1 and 2 threads
CPU_FULL = dict(shapes=tuple(CPU_SHAPES), dtypes=("fp32", "bf16"), modes=("fwd", "fwdbwd"), threads=(1, 2))
#: --quick (the GPU subset run by bench/gpu_check.sh): bf16, ADE20K stages of T and S/B/L, Cityscapes stage 1.
QUICK_SHAPES = [f"ade512-SBL-s{i}" for i in range(1, 5)] + [f"ade512-T-s{i}" for i in range(1, 5)] + \
    ["city-SBL-s1", "city-T-s1"]

BACKENDS = ("cuda", "cuda_fma", "triton", "cpu", "reference")
GPU_BACKENDS = ("cuda", "cuda_fma", "triton", "reference")
CPU_BACKENDS = ("cpu", "reference")
#: knobs (fields of segnext_kernels.knobs.Knobs) each impl runs under: "cuda_fma" is the cuda backend with its
#: depthwise part on fp32 FMA instead of tensor cores (msca_cuda_dw, which msca/cuda.py reads from knobs.KNOBS at each
#: call: the environment's SEGNEXT_MSCA_CUDA_DW is read once at import), for fp16/bf16 (fp32 always runs FMA)
IMPL_KNOBS = {"cuda": {"msca_cuda_dw": "auto"}, "cuda_fma": {"msca_cuda_dw": "fma"}}
BASELINES = ("eager_nchw", "eager_cl", "compile", "compile_max", "ort", "openvino", "openvino_default")
GPU_BASELINES = ("eager_nchw", "eager_cl", "compile", "compile_max")
#: CPU peers (bench/cpu_peers.py): ONNX Runtime and OpenVINO; "openvino_default" = cpu.md's exact OpenVINO config
#: (no precision hint), fp32 rows only: on CPUs with bf16 support OpenVINO's default inference precision is bf16
CPU_BASELINES = ("eager_nchw", "eager_cl", "compile", "ort", "openvino", "openvino_default")
PEERS = ("ort", "openvino", "openvino_default")
MODES = ("fwd", "fwdbwd")
#: rows with the same values of these share baselines (speedup columns); threads is None on GPU rows
GROUP_KEYS = ("shape_name", "dtype", "mode", "threads")
#: rel_err above this marks the row "CHECK FAILED" (loose: TF32 1x1 mix in fp32, eager's own half rounding).
CHECK_TOL = {"fp32": 1e-2, "fp16": 2e-2, "bf16": 6e-2}


def byte_flop_model(shape, dtype_name: str, mode: str) -> dict:
    """``bytes``, ``flops`` and ``fma_flops`` of one MSCA call (module docstring)."""
    B, C, H, W = shape
    E = B * C * H * W
    s = common.DTYPE_BYTES[dtype_name]
    if mode == "fwd":
        return {"bytes": 2 * E * s, "flops": E * (2 * C + 218), "fma_flops": E * 206, "fma_macs": E * (103 + C)}
    return {"bytes": 5 * E * s, "flops": E * (6 * C + 644), "fma_flops": E * 618, "fma_macs": E * (309 + 3 * C)}


@contextlib.contextmanager
def impl_knobs(impl: str):
    """Replace ``segnext_kernels.knobs.KNOBS`` with IMPL_KNOBS[impl] applied for the duration (restored afterwards);
    an impl without an entry runs under the knobs as they are."""
    change = IMPL_KNOBS.get(impl)
    if not change:
        yield
        return
    from segnext_kernels import knobs

    old = knobs.KNOBS
    knobs.KNOBS = dataclasses.replace(old, **change)
    try:
        yield
    finally:
        knobs.KNOBS = old


def impl_status(impl: str, device: torch.device) -> tuple[bool, str]:
    """(runs here, note). The note of a runnable impl is a label for its rows (e.g. the Triton interpreter).
    The "cpu" backend is always attempted on CPU: when it is missing its rows say why (skipped: <reason>)."""
    if impl == "cpu":
        if device.type != "cpu":
            return False, "cpu skipped: the CPU backend is measured on CPU runs (--cpu)"
        return True, ""
    if impl in PEERS and device.type != "cpu":
        return False, f"{impl} skipped: the ONNX Runtime / OpenVINO peers are measured on CPU runs (--cpu)"
    if impl == "compile_max" and device.type != "cuda":
        return False, "compile_max skipped: max-autotune (CUDA graphs) is measured on CUDA only"
    if impl == "compile" and device.type == "cpu":
        return True, ""
    if impl in ("cuda", "cuda_fma", "triton"):
        ok, why = common.sk_status("msca", "triton" if impl == "triton" else "cuda", device)
        if impl == "triton" and device.type == "cpu":
            if ok:
                return True, "Triton interpreter (TRITON_INTERPRET=1): runs, but not a speed figure"
            return False, ("triton skipped on CPU: the kernels need a GPU; TRITON_INTERPRET=1 would run them in "
                           "the interpreter, which is not a speed measurement")
        return ok, "" if ok else f"{impl} skipped: {why}"
    if impl.startswith("compile") and device.type != "cuda":
        return False, f"{impl} skipped: the torch.compile baselines are measured on CUDA only"
    return True, ""


def strip_shapes(channels: int) -> list[tuple[int, int, int, int]]:
    """The weight shapes of the six MSCA strip convs, official order: (C, 1, 1, k), (C, 1, k, 1) for k = 7, 11, 21."""
    return [s for k in (7, 11, 21) for s in ((channels, 1, 1, k), (channels, 1, k, 1))]


def code_of(impl: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """What code an implementation runs (equal strings = same code: no ratio between them). Backends are asked
    which backend actually runs (``segnext_kernels.backend.resolve_backend``): one resolving to "reference" runs
    ``msca_reference`` on the NCHW input, as ``eager_nchw`` does."""
    if impl == "eager_nchw":
        return "msca_reference NCHW"
    if impl == "eager_cl":
        return "msca_reference channels_last"
    if impl in BACKENDS:
        name = "cuda" if impl == "cuda_fma" else impl
        try:
            name = common.sk_resolve_backend(name, device, dtype)
        except Exception:  # noqa: BLE001 - a backend that does not exist (yet) or cannot run is its own code
            pass
        if name == "reference":
            return "msca_reference NCHW"
        return f"backend {impl}"
    return impl


def make_inputs(shape, dtype: torch.dtype, device: torch.device, n_rot: int, seed: int = 0):
    """``(us, gs, weights)``: ``n_rot`` random inputs u and grad_outs (rotated to defeat the L2) and the MSCA
    weights ``[w0, b0, [6 strip w], [6 strip b], w3, b3]`` with unit-scale activations."""
    B, C, H, W = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    weights = [r(C, 1, 5, 5, scale=0.2), r(C, scale=0.5), [r(*s, scale=0.25) for s in strip_shapes(C)],
               [r(C, scale=0.5) for _ in range(6)], r(C, C, 1, 1, scale=C ** -0.5), r(C, scale=0.5)]
    us = [r(*shape) for _ in range(n_rot)]
    gs = [r(*shape) for _ in range(n_rot)]
    return us, gs, weights


def build_op(impl: str):
    """The callable ``op(u, w0, b0, strip_ws, strip_bs, w3, b3) -> out`` of one implementation."""
    msca_reference = common.sk_msca_reference()
    if impl in BACKENDS:
        import segnext_kernels

        backend = "cuda" if impl == "cuda_fma" else impl  # "cpu": segnext_kernels.msca(..., backend="cpu")

        def op(u, *w):
            return segnext_kernels.msca(u, *w, backend=backend)
        return op
    if impl in ("eager_nchw", "eager_cl"):
        return msca_reference
    if impl in ("compile", "compile_max"):
        common.compile_reset()
        kw = {"mode": "max-autotune"} if impl == "compile_max" else {}
        return torch.compile(msca_reference, dynamic=False, **kw)
    raise ValueError(impl)


def make_fn(impl: str, mode: str, us, gs, weights):
    """``(fn, op, prep)``: ``fn()`` runs one timed call on the next rotated input; ``op``/``prep`` for the check."""
    op = build_op(impl)
    prep = ((lambda t: t.contiguous(memory_format=torch.channels_last)) if impl == "eager_cl" else (lambda t: t))
    us = [prep(u) for u in us]
    gs = [prep(g) for g in gs]
    state = {"i": 0}
    w0, b0, sw, sb, w3, b3 = weights
    if mode == "fwd":
        def fn():
            u = us[state["i"] % len(us)]
            state["i"] += 1
            with torch.no_grad():
                return op(u, w0, b0, sw, sb, w3, b3)
        return fn, op, prep
    leaves = [t.detach().requires_grad_(True) for t in [w0, b0, *sw, *sb, w3, b3]]
    us = [u.detach().requires_grad_(True) for u in us]

    def fn():
        i = state["i"] % len(us)
        state["i"] += 1
        out = op(us[i], leaves[0], leaves[1], leaves[2:8], leaves[8:14], leaves[14], leaves[15])
        return torch.autograd.grad(out, [us[i], *leaves], gs[i])
    return fn, op, prep


def rel_error(op, prep, u, weights, ref) -> float:
    w0, b0, sw, sb, w3, b3 = weights
    with torch.no_grad():
        out = op(prep(u), w0, b0, sw, sb, w3, b3).float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run_cases(shapes: dict, dtypes, modes, impls, device, env_meta: dict, budget: common.Budget, *,
              labels: dict, warmup_ms: float, rep_ms: float, check: bool = True, on_row=None) -> list[dict]:
    """Measure every (shape, dtype, mode, impl); the torch.compile baselines last (a spent budget skips them
    first). Returns the rows (``env_meta`` columns + case + timings; derived columns are added later)."""
    msca_reference = common.sk_msca_reference()
    rows = []
    phases = [[i for i in impls if not i.startswith("compile")], [i for i in impls if i.startswith("compile")]]
    for phase in (p for p in phases if p):
        for sname, shape in shapes.items():
            for dname in dtypes:
                dtype = common.DTYPES[dname]
                nbytes = math.prod(shape) * common.DTYPE_BYTES[dname]
                n_rot = common.rotation_count(nbytes, device)
                inputs = None
                ref = None
                for mode in modes:
                    for impl in phase:
                        row = dict(env_meta, shape_name=sname, shape="x".join(map(str, shape)), B=shape[0],
                                   C=shape[1], H=shape[2], W=shape[3], dtype=dname, mode=mode, impl=impl,
                                   impl_type="backend" if impl in BACKENDS else "baseline",
                                   code=code_of(impl, device, dtype), rotations=n_rot, status="ok", median_ms=None,
                                   p20_ms=None, p80_ms=None, reps=None, rel_err=None,
                                   **byte_flop_model(shape, dname, mode))
                        if labels.get(impl):
                            row["status"] = f"ok ({labels[impl]})"
                        if impl == "cuda_fma" and dname == "fp32":
                            row["status"] = "skipped (fp32 runs the FMA variant under 'cuda' already)"
                            rows.append(row)
                            if on_row is not None:
                                on_row(row)
                            continue
                        if budget.spent():
                            row["status"] = "skipped (time budget)"
                            rows.append(row)
                            if on_row is not None:
                                on_row(row)
                            continue
                        try:
                            if inputs is None:
                                inputs = make_inputs(shape, dtype, device, n_rot)
                                us, gs, weights = inputs
                                if check:
                                    w32 = [[t.float() for t in w] if isinstance(w, list) else w.float()
                                           for w in weights]
                                    with torch.no_grad():
                                        ref = msca_reference(us[0].float(), *w32)
                            with impl_knobs(impl):
                                fn, op, prep = make_fn(impl, mode, *inputs)
                                fn()  # compile / JIT / autotune outside the timing
                                common.sync(device)
                                interp = "interpreter" in labels.get(impl, "")  # one timed call: no speed figure
                                row.update(common.time_fn(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                                          **({"cpu_min_reps": 1, "cpu_max_reps": 1} if interp
                                                             else {})))
                                if check and mode == "fwd":
                                    row["rel_err"] = rel_error(op, prep, inputs[0][0], inputs[2], ref)
                                    if not row["rel_err"] <= CHECK_TOL[dname]:
                                        row["status"] = f"CHECK FAILED (rel_err > {CHECK_TOL[dname]:g})"
                            del fn, op
                        except Exception as e:  # noqa: BLE001 - one broken impl must not hide the others
                            row["status"] = common.short_error(e)
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
                        med = f"{row['median_ms']:.4f} ms" if row["median_ms"] else "-"
                        print(f"  {sname:14s} {dname:4s} {mode:6s} {impl:11s} {med:>13s}  {row['status']}",
                              flush=True)
                del inputs, ref
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], baselines) -> str:
    cols = [("shape", "shape_name", "s"), ("dtype", "dtype", "s"), ("mode", "mode", "s"), ("impl", "impl", "s"),
            ("median ms", "median_ms", ".4f"), ("p20 ms", "p20_ms", ".4f"), ("p80 ms", "p80_ms", ".4f")]
    cols += [(f"vs {b}", f"vs_{b}", "s") for b in baselines]
    cols += [("GB/s", "GBps", "g3"), ("TFLOP/s", "TFLOPs", "g3"), ("%HBM", "hbm_frac", "%"),
             ("%FMA", "fma_frac", "%"), ("rel_err", "rel_err", ".1e"), ("status", "status", "s")]
    rows = common.sort_rows(rows, ("shape_name", "dtype", "mode"))
    return common.format_table(rows, cols)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speedup over eager NCHW by stage shape, one panel per (dtype, mode)."""
    common.bar_plot(path, [r for r in rows if r["impl"] != "eager_nchw"], facet_keys=("dtype", "mode"),
                    x_key="shape_name", bar_key="impl", value_key="speedup_vs_eager_nchw", title=title,
                    ylabel="speedup vs eager NCHW (x)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.msca", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="GPU subset: bf16, ADE20K stages of T and S/B/L + Cityscapes stage 1, fwd+fwdbwd, "
                         "backends + eager_nchw, eager_cl, compile (CPU: the default run)")
    ap.add_argument("--full", action="store_true",
                    help="CPU: the whole matrix (every batch-1 stage shape of T and S/B/L at 512x512 and 1024x2048, "
                         "fp32+bf16, fwd+fwdbwd, 1 and 2 threads; saved); GPU: the default")
    ap.add_argument("--shape", action="append", default=None, metavar="B,C,H,W",
                    help="custom shape (repeatable); replaces the default shape set")
    ap.add_argument("--shapes", default=None, help=f"comma-separated names from {','.join(SHAPES)}")
    ap.add_argument("--dtype", default=None, help="comma-separated subset of fp32,fp16,bf16 (default: all; "
                                                  "CPU default fp32, --full fp32,bf16)")
    ap.add_argument("--mode", default=None, help="fwd, fwdbwd or both (default both; CPU default fwd)")
    ap.add_argument("--backends", default=None,
                    help="subset of cuda,cuda_fma,triton,cpu,reference (default: GPU cuda,cuda_fma,triton,reference; "
                         "CPU cpu,reference; cuda_fma = the cuda backend with its depthwise part on fp32 FMA)")
    ap.add_argument("--baselines", default=None,
                    help="subset of eager_nchw,eager_cl,compile,compile_max,ort,openvino,openvino_default (default: "
                         "GPU the first four, CPU all but compile_max)")
    ap.add_argument("--resume", default=None, metavar="FILE.json",
                    help="CPU: go on with an earlier run's result file (its rows are kept; errors and budget skips "
                         "are measured again); give the same selection options")
    ap.add_argument("--reps", type=int, default=15, help="CPU: minimum timed rounds per case (default 15)")
    ap.add_argument("--max-reps", type=int, default=60, help="CPU: maximum timed rounds per case (default 60)")
    ap.add_argument("--min-s", type=float, default=0.5, help="CPU: minimum timing seconds per case (default 0.5)")
    ap.add_argument("--clock-source", choices=("measured", "cpuinfo"), default="measured",
                    help="CPU FMA floor clock: derived from a 1-thread torch.mm (default) or /proc/cpuinfo MHz")
    common.add_timing_args(ap, "25, quick 10", "100, quick 50")
    common.add_common_args(ap, threads_list=True)
    return ap


def main(argv=None) -> int:
    return common.run_main(build_parser, _main, argv)


def _main(args, argv, device) -> int:
    if device.type == "cpu":
        from . import msca_cpu

        return msca_cpu.main_cpu(args, argv)
    return _main_gpu(args, argv, device)


def _main_gpu(args, argv, device) -> int:
    gpu = device.type == "cuda"
    if args.shape:
        shapes = {}
        for i, s in enumerate(args.shape):
            shape = common.parse_shape(s, 4, "--shape")
            shapes[f"custom{i + 1 if len(args.shape) > 1 else ''}"] = shape
    elif args.shapes:
        shapes = {n: SHAPES[n] for n in common.parse_list(args.shapes, list(SHAPES), "--shapes")}
    elif args.quick:
        shapes = {n: SHAPES[n] for n in QUICK_SHAPES}
    else:
        shapes = {n: s for n, s in SHAPES.items() if not n.startswith("ade512b1")}
    dtypes = common.parse_list(args.dtype or ("bf16" if args.quick else "fp32,fp16,bf16"), list(common.DTYPES),
                               "--dtype")
    modes = common.parse_list(args.mode or "fwd,fwdbwd", MODES, "--mode")
    backends = common.parse_list(args.backends or ",".join(GPU_BACKENDS), BACKENDS, "--backends")
    baselines = common.parse_list(args.baselines or ("eager_nchw,eager_cl,compile" if args.quick
                                                     else ",".join(GPU_BASELINES)), BASELINES, "--baselines")
    notes, labels, impls = [], {}, []
    for impl in backends + baselines:
        ok, note = impl_status(impl, device)
        if ok:
            impls.append(impl)
            if note:
                labels[impl] = "Triton interpreter: not a speed figure" if "interpreter" in note else note
        if note:
            notes.append(note)
    env = common.environment(device)
    floors = common.device_floors(device, env, measure=not args.no_measure_bw)
    meta_cols = common.run_meta("msca", env, floors)
    common.print_header("MSCA benchmark" + (" (quick subset)" if args.quick else ""), env, floors, notes)
    print(f"shapes: {', '.join(f'{n} {tuple(s)}' for n, s in shapes.items())}; dtypes {','.join(dtypes)}; "
          f"modes {','.join(modes)}; impls {','.join(impls)}")
    warmup = args.warmup_ms if args.warmup_ms is not None else (10 if args.quick else 25)
    rep = args.rep_ms if args.rep_ms is not None else (50 if args.quick else 100)
    present = [b for b in baselines if b in impls]
    meta = dict(env, kind="msca", subset="quick" if args.quick else ("custom" if args.shape else "full"),
                floors=floors, notes=notes, argv=list(sys.argv[1:] if argv is None else argv),
                byte_model="fwd 2*E*s, fwdbwd 5*E*s (E = B*C*H*W, s = dtype bytes)",
                flop_model="fwd E*(2C+218), fwdbwd E*(6C+644); fma floor 206*E fwd, 618*E fwdbwd")
    writer = common.ResultWriter("msca", env, meta, Path(args.out), common.decide_save(args, device),
                                 lambda rs: common.add_derived(rs, GROUP_KEYS, present, floors=floors))
    rows = run_cases(shapes, dtypes, modes, impls, device, meta_cols, common.Budget(args.budget_s),
                     labels=labels, warmup_ms=warmup, rep_ms=rep, check=not args.no_check, on_row=writer.add)
    title = common.plot_title("MSCA speedup vs eager NCHW", env)
    paths = writer.finish(lambda p: plot(rows, p, title))
    print()
    print(("MSCA, CPU wall-clock figures" if not gpu else f"MSCA on {env['device']}") +
          " (median ms; vs X = X's median / this median (p20/p80 range; ~same = spreads overlap; same code = no "
          "ratio); %HBM, %FMA = floor / median)")
    print(table(rows, present))
    common.report_saved(paths)
    bad = [r for r in rows if r["status"].startswith("CHECK FAILED")]
    if bad:
        print(f"!! {len(bad)} row(s) failed the output check (see status)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
