"""The CPU side of ``python -m bench.msca``: the fused ``cpu`` backend and the reference against eager PyTorch
(NCHW, channels_last), torch.compile (inductor, default mode) and the ONNX Runtime / OpenVINO peers
(``bench/cpu_peers.py``), side by side in one process.

Timing: for one case (threads, shape, dtype, mode) every implementation is built and called once untimed
(compile, export, JIT; that time is the ``setup_s`` column), then called twice more, then timed round-robin over
blocks (per round, for each implementation: ``WARM_CALLS`` untimed calls and more for at least ``WARM_S`` seconds,
so that another runtime's spinning worker threads stop competing, then ``BLOCK`` timed calls, ``time.perf_counter``) for at least
``--reps`` rounds and ``--min-s`` seconds
(at most ``--max-reps``): on a shared, noisy machine the load of other processes then hits every implementation of a
case alike, and the ratios hold better than the absolute times. glibc's heap thresholds are pinned first
(``common.pin_malloc``), so that one implementation's frees cannot leave the next one page-faulting. Columns: median / p20 / p80 ms over the rounds.

Speedups (``vs X``): X's median / this median with its range from the spreads, ``3.1x (2.8-3.4)`` = X's p20 /
this p80 to X's p80 / this p20; ``~same`` when the two [p20, p80] ranges overlap (no measurable difference); ``same
code`` when the two run the same code (``reference`` resolves to the eager ops ``eager_nchw`` runs; so does
``cpu`` while the backend falls back to the reference): no ratio then.

FMA floor (``floor ms``, ``%FMA`` = floor / median): ``fma_macs`` / (threads x FMA ports x fp32 lanes x clock), with
``fma_macs`` = E * (103 + C) multiply-adds forward (the depthwise taps and the 1x1 mix) and E * (309 + 3C)
forward+backward (the multiply-add part of the FLOP model of ``bench/msca.py``: 6C + 644 FLOP = 2 x (309 + 3C) MAC
+ 26 elementwise), E = B*C*H*W; 2 FMA ports; the lanes detected at run time (16 for AVX-512, 8 for AVX2); the clock
derived from a single-thread fp32 ``torch.mm`` (GFLOP/s / (2 x 2 x 16): a large GEMM runs at or a little under the
FMA peak, so the floor is the rate the machine demonstrably reaches) or, with ``--clock-source cpuinfo``, the
/proc/cpuinfo MHz. The same fp32 floor is used for bf16 rows (bf16 dot products / AMX can pass it). GFLOP/s from the
FLOP model. ``rel_err`` = max |out - ref| / max |ref| of the forward output against the fp32 eager reference.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import common, cpu_peers, msca

#: Per round and implementation: untimed calls after switching from another implementation, then timed calls
#: (see the module docstring).
WARM_CALLS = 2
WARM_S = 0.05  # and untimed calls for at least this long: ONNX Runtime's spinning workers outlast two short calls
BLOCK = 5

DEVICE = torch.device("cpu")
IDENTITY = ("shape_name", "shape", "dtype", "mode", "impl", "threads")


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


def _torch_fn(impl: str, mode: str, us, gs, weights):
    """(fn, prep): fn() runs one call; fwd under ``torch.inference_mode`` (as cpu.md), fwdbwd with
    ``torch.autograd.grad`` of u and every weight."""
    op = msca.build_op(impl)
    prep = ((lambda t: t.contiguous(memory_format=torch.channels_last)) if impl == "eager_cl" else (lambda t: t))
    u, g = prep(us[0]), prep(gs[0])
    w0, b0, sw, sb, w3, b3 = weights
    if mode == "fwd":
        def fn():
            with torch.inference_mode():
                return op(u, w0, b0, sw, sb, w3, b3)
        return fn
    leaves = [t.detach().requires_grad_(True) for t in [w0, b0, *sw, *sb, w3, b3]]
    ug = u.detach().requires_grad_(True)

    def fn():
        out = op(ug, leaves[0], leaves[1], leaves[2:8], leaves[8:14], leaves[14], leaves[15])
        return torch.autograd.grad(out, [ug, *leaves], g)
    return fn


def _build(impl: str, mode: str, dname: str, threads: int, shape, inputs, exporter):
    """(fn, info) of one implementation; raises on failure."""
    us, gs, weights = inputs
    if impl in msca.PEERS:
        peer = "openvino" if impl == "openvino_default" else impl
        path = exporter.path(shape, weights)
        if impl == "openvino_default":  # cpu.md's exact config: no precision hint
            import openvino as ov

            compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
            req = compiled.create_infer_request()

            def run(x):
                req.infer({0: x})
                return req.get_output_tensor(0).data
            info = {"peer_settings": f"openvino {ov.__version__} CPU, INFERENCE_NUM_THREADS={threads}, no hint "
                                     f"(compiled: {compiled.get_property('INFERENCE_PRECISION_HINT')})"}
        else:
            run, info = cpu_peers.build_peer(peer, path, threads, dname)
        x = np.ascontiguousarray(us[0].float().numpy())
        return (lambda: run(x)), info
    if impl == "compile":
        common.compile_reset()
    return _torch_fn(impl, mode, us, gs, weights), {}


def _skip_reason(impl: str, dname: str, mode: str):
    if impl in msca.PEERS:
        ok, why = cpu_peers.peer_status("openvino" if impl == "openvino_default" else impl, dname, mode)
        if not ok:
            return why
        if impl == "openvino_default" and dname != "fp32":
            return "n/a (the default-precision OpenVINO run is an fp32-input row only; see openvino)"
    return None


def run_cases(shapes: dict, dtypes, modes, threads_list, impls, env_meta: dict, budget: common.Budget, *,
              min_reps: int, max_reps: int, min_s: float, check: bool = True, done=frozenset(),
              on_row=None) -> list[dict]:
    """Measure every (threads, shape, dtype, mode) with all ``impls`` round-robin; rows whose ``IDENTITY`` is in
    ``done`` (a resumed run) are not measured again. Returns the new rows."""
    msca_reference = common.sk_msca_reference()

    rows = []
    exporter = cpu_peers.Exporter()
    saved_threads = torch.get_num_threads()

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)
        med = f"{row['median_ms']:.3f} ms" if row.get("median_ms") else "-"
        print(f"  t{row['threads']} {row['shape_name']:15s} {row['dtype']:4s} {row['mode']:6s} {row['impl']:16s} "
              f"{med:>11s}  {row['status']}", flush=True)

    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for sname, shape in shapes.items():
                for dname in dtypes:
                    inputs = ref = None
                    for mode in modes:
                        group = []
                        for impl in impls:
                            row = dict(env_meta, threads=threads, shape_name=sname, shape="x".join(map(str, shape)),
                                       B=shape[0], C=shape[1], H=shape[2], W=shape[3], dtype=dname, mode=mode,
                                       impl=impl, impl_type="backend" if impl in msca.BACKENDS else "baseline",
                                       code=msca.code_of(impl, DEVICE, common.DTYPES[dname]), rotations=1,
                                       status="ok", median_ms=None,
                                       p20_ms=None,
                                       p80_ms=None, reps=None, setup_s=None, rel_err=None, peer_settings=None,
                                       **msca.byte_flop_model(shape, dname, mode))
                            if tuple(str(row[k]) for k in IDENTITY) in done:
                                continue
                            why = _skip_reason(impl, dname, mode)
                            if why:
                                row["status"] = why
                                emit(row)
                                continue
                            if budget.spent():
                                row["status"] = "skipped (time budget)"
                                emit(row)
                                continue
                            try:
                                if inputs is None:
                                    inputs = msca.make_inputs(shape, common.DTYPES[dname], DEVICE, 1)
                                    w32 = [[t.float() for t in w] if isinstance(w, list) else w.float()
                                           for w in inputs[2]]
                                    with torch.inference_mode():
                                        ref = msca_reference(inputs[0][0].float(), *w32)
                                t0 = time.perf_counter()
                                fn, info = _build(impl, mode, dname, threads, shape, inputs, exporter)
                                row.update(info)
                                try:
                                    out = fn()  # compile / export / first call outside the timing
                                except (RuntimeError, ValueError, NotImplementedError) as e:
                                    if impl in msca.BACKENDS:  # e.g. the "cpu" backend missing or not built
                                        row["status"] = "skipped: " + common.short_error(e)[len("error: "):]
                                        emit(row)
                                        continue
                                    raise
                                row["setup_s"] = round(time.perf_counter() - t0, 3)
                                interp = impl == "triton"  # the Triton interpreter: one call, not a speed figure
                                if check and mode == "fwd":
                                    o = torch.from_numpy(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
                                    row["rel_err"] = float((o.float() - ref).abs().max() /
                                                           ref.abs().max().clamp_min(1e-30))
                                    if not row["rel_err"] <= msca.CHECK_TOL[dname]:
                                        row["status"] = f"CHECK FAILED (rel_err > {msca.CHECK_TOL[dname]:g})"
                                del out
                                if interp:
                                    row.update(median_ms=row["setup_s"] * 1e3, reps=1,
                                               status=row["status"] + " (Triton interpreter: not a speed figure)")
                                    emit(row)
                                    continue
                                fn()
                                fn()
                                group.append((row, fn))
                            except Exception as e:  # noqa: BLE001 - one broken impl must not hide the others
                                row["status"] = common.short_error(e)
                                emit(row)
                        if group:
                            # a block per impl: ONNX Runtime's and OpenVINO's worker threads spin-wait after a
                            # call and slow the next impl's call down (4x measured for the cpu kernels right after
                            # an ORT call); untimed calls first (a pause would be worse: the cores' first calls
                            # after idling are slow too)
                            times, _ = common.round_robin([fn for _, fn in group], [(WARM_CALLS, BLOCK)] * len(group),
                                                          min_reps=min_reps, max_reps=max_reps, min_s=min_s,
                                                          warm_s=WARM_S)
                            for (row, _), ts in zip(group, times):
                                row.update(_stats(ts))
                                emit(row)
                        del group
                        gc.collect()
                    del inputs, ref
            common.compile_reset()
    finally:
        exporter.close()
        torch.set_num_threads(saved_threads)
    return rows


def table(rows: list[dict], baselines) -> str:
    cols = [("threads", "threads", "s"), ("shape", "shape_name", "s"), ("C,H,W", "_chw", "s"), ("dtype", "dtype", "s"),
            ("mode", "mode", "s"), ("impl", "impl", "s"), ("median ms", "median_ms", ".3f"),
            ("p20 ms", "p20_ms", ".3f"), ("p80 ms", "p80_ms", ".3f")]
    cols += [(f"vs {b}", f"vs_{b}", "s") for b in baselines]
    cols += [("GFLOP/s", "GFLOPs", "g3"), ("floor ms", "fma_floor_ms", ".3f"), ("%FMA", "fma_frac", "%"),
             ("rel_err", "rel_err", ".1e"), ("status", "status", "s")]
    for r in rows:
        r["_chw"] = f"{r['C']},{r['H']},{r['W']}"
    try:
        return common.format_table(common.sort_rows(rows, ("threads", "shape_name", "dtype", "mode")), cols)
    finally:
        for r in rows:
            r.pop("_chw", None)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Median ms (log scale, p20-p80 error bars) by stage shape, one bar per implementation, one panel per
    (threads, dtype, mode)."""
    for r in rows:
        r["_facet"] = f"{r['threads']} thr"
    try:
        common.bar_plot(path, rows, facet_keys=("_facet", "dtype", "mode"), x_key="shape_name", bar_key="impl",
                        value_key="median_ms", title=title, ylabel="median ms (log; p20-p80 bars)", hline=None,
                        logy=True, err_keys=("p20_ms", "p80_ms"))
    finally:
        for r in rows:
            r.pop("_facet", None)


def _parse_threads(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or any(t < 1 for t in out):
        raise SystemExit(f"--threads: expected comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(out))


def main_cpu(args, argv) -> int:
    malloc_note = common.pin_malloc()  # first: before the implementations allocate
    full = args.full
    preset = msca.CPU_FULL if full else msca.CPU_DEFAULT
    if args.shape:
        shapes = {}
        for i, s in enumerate(args.shape):
            shapes[f"custom{i + 1 if len(args.shape) > 1 else ''}"] = common.parse_shape(s, 4, "--shape")
    elif args.shapes:
        shapes = {n: msca.SHAPES[n] for n in common.parse_list(args.shapes, list(msca.CPU_SHAPES), "--shapes")}
    else:
        shapes = {n: msca.SHAPES[n] for n in preset["shapes"]}
    dtypes = common.parse_list(args.dtype or ",".join(preset["dtypes"]), ("fp32", "bf16", "fp16"), "--dtype")
    modes = common.parse_list(args.mode or ",".join(preset["modes"]), msca.MODES, "--mode")
    threads = _parse_threads(args.threads) if args.threads else list(preset["threads"])
    backends = common.parse_list(args.backends or ",".join(msca.CPU_BACKENDS), msca.BACKENDS, "--backends")
    baselines = common.parse_list(args.baselines or ",".join(msca.CPU_BASELINES), msca.BASELINES, "--baselines")
    notes, impls = [], []
    for impl in backends + baselines:
        ok, note = msca.impl_status(impl, DEVICE)
        if ok:
            impls.append(impl)
        if note:
            notes.append(note)
    if "openvino" in impls or "openvino_default" in impls:
        notes.append("openvino = compile_model(path, 'CPU', {INFERENCE_NUM_THREADS: T, INFERENCE_PRECISION_HINT: "
                     "f32 | bf16 (the row's dtype)}); openvino_default = cpu.md's config without the hint (fp32 rows; "
                     "its precision is OpenVINO's default, recorded in peer_settings: bf16 on CPUs with bf16 support)")
    if "ort" in impls:
        notes.append("ort = onnxruntime CPUExecutionProvider, intra_op_num_threads=T, fp32 only (bf16 rows n/a)")
    if "fwdbwd" in modes:
        notes.append("fwdbwd: torch implementations only (the peers have no backward)")
    if malloc_note:
        notes.append(malloc_note + " (one implementation's frees cannot make the next one page-fault)")
    save = not args.no_save and (args.save or full or bool(args.resume))
    if not save:
        notes.append("result files are written only with --save, --full or --resume")
    env = common.environment(DEVICE)
    env["threads"] = ",".join(map(str, threads))
    floors = common.device_floors(DEVICE, env, measure=not args.no_measure_bw)
    floors["cpu_fma"] = common.cpu_fma_floor_info(args.clock_source)
    meta_cols = common.run_meta("msca", env, floors)
    cf = floors["cpu_fma"]
    meta_cols.update(clock_GHz=cf["clock_GHz"], clock_source=cf["clock_source"], fma_lanes=cf["fma_lanes"],
                     fma_ports=cf["fma_ports"], mm_GFLOPs=cf["mm_GFLOPs"], cpuinfo_MHz=cf["cpuinfo_MHz"])
    common.print_header("MSCA benchmark on CPU" + (" (full matrix)" if full else ""), env, floors, notes)
    print(f"cpu: {env['cpu_model']}; onnxruntime {env['onnxruntime']}, openvino {env['openvino']}; FMA floor = MACs / "
          f"(threads x {cf['fma_ports']} ports x {cf['fma_lanes']} fp32 lanes [{cf['fma_lanes_source']}] x "
          f"{cf['clock_GHz']} GHz [{cf['clock_source']}]); 1-thread torch.mm {cf['mm_GFLOPs']} GFLOP/s; "
          f"/proc/cpuinfo MHz {cf['cpuinfo_MHz'] or 'absent'}")
    print(f"shapes: {', '.join(f'{n} {tuple(s)}' for n, s in shapes.items())}; dtypes {','.join(dtypes)}; "
          f"modes {','.join(modes)}; threads {','.join(map(str, threads))}; impls {','.join(impls)}", flush=True)
    present = [b for b in baselines if b in impls]
    all_baselines = list(dict.fromkeys(present + [b for b in msca.CPU_BASELINES if b in present]))
    chosen = args.shapes or args.dtype or args.mode or args.threads
    subset = "custom" if args.shape else ("selection" if chosen else ("full" if full else "default"))
    meta = dict(env, kind="msca", subset=subset,
                floors=floors, notes=notes, argv=list(sys.argv[1:] if argv is None else argv),
                byte_model="fwd 2*E*s, fwdbwd 5*E*s (E = B*C*H*W, s = dtype bytes)",
                flop_model="fwd E*(2C+218), fwdbwd E*(6C+644) FLOP; CPU FMA floor MACs fwd E*(103+C), "
                           "fwdbwd E*(309+3C) / (threads x ports x lanes x clock)",
                timing=("round-robin over blocks of 5 timed calls per impl after 2 untimed ones, time.perf_counter; "
                        "median/p20/p80 over the calls"),
                matrix={"shapes": list(shapes), "dtypes": dtypes, "modes": modes, "threads": threads, "impls": impls})
    tag = f"_t{'-'.join(map(str, threads))}_torch{torch.__version__.split('+')[0]}"
    tag += f"-ort{env['onnxruntime']}-ov{env['openvino']}" if any(i in msca.PEERS for i in impls) else ""
    writer = common.ResultWriter("msca", env, meta, Path(args.out), save,
                                 lambda rs: common.add_derived(rs, msca.GROUP_KEYS, all_baselines, floors=floors),
                                 stem_extra=tag.replace("+", ""),
                                 resume=Path(args.resume) if args.resume else None)
    done = set()
    if args.resume:  # keep what was measured (or marked n/a); measure again what failed or the budget skipped
        keep = [r for r in writer.rows if not str(r.get("status", "")).startswith(("error", "skipped (time"))]
        writer.rows[:] = keep
        done = {tuple(str(r.get(k)) for k in IDENTITY) for r in keep}
        print(f"resuming {writer.json.name}: {len(keep)} row(s) kept", flush=True)
    rows = run_cases(shapes, dtypes, modes, threads, impls, meta_cols, common.Budget(args.budget_s),
                     min_reps=args.reps, max_reps=args.max_reps, min_s=args.min_s, check=not args.no_check,
                     done=done, on_row=writer.add)
    title = common.plot_title("MSCA on CPU: median ms by stage", env)
    all_rows = writer.rows
    paths = writer.finish(lambda p: plot(all_rows, p, title))
    print()
    print("MSCA, CPU wall-clock figures (median ms over round-robin rounds; vs X = X's median / this median with its "
          "p20/p80 range, ~same = spreads overlap, same code = no ratio; floor = FMA floor)")
    print(table(all_rows if args.resume else rows, all_baselines))
    common.report_saved(paths)
    bad = [r for r in rows if r["status"].startswith("CHECK FAILED")]
    if bad:
        print(f"!! {len(bad)} row(s) failed the output check (see status)")
    return 0
