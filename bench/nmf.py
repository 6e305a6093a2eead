"""NMF2D benchmark (SegNeXt's Hamburger "ham"): ``segnext_kernels.nmf2d`` backends against the eager reference
and torch.compile, for every SegNeXt decoder shape, dtype and mode.

    python -m bench.nmf [--quick] [--shape B,D,N,R ...] [--dtype fp32,fp16,bf16] [--mode fwd,fwdbwd]
                        [--steps K] [--grad unrolled,one_step] [--backends cuda,triton,reference]
                        [--baselines eager,compile,compile_max] [--out DIR] [--save | --no-save] [--budget-s S]

Shapes (``SHAPES``): x (B, D, N) non-negative, bases (B, D, R); D = ham_channels (256 T/S, 512 B, 1024 L),
R = 16 (T/S) or 64 (B/L), N = (H/8)(W/8): 64*64 = 4096 for ADE20K 512x512 (batch 16), 128*256 = 32768 for
Cityscapes 2048x1024 (batch 1). On CPU the defaults are the ADE20K 512x512 head shapes at batch 1 (what the
whole-model CPU benchmark runs): "ade512-TS-b1" (1, 256, 4096, 16) and "ade512-B-b1" (1, 512, 4096, 64);
``--quick`` on CPU runs one tiny shape (1, 64, 256, 16).

Steps K: 7 in ``fwd`` (eval, as the models run at inference) and 6 in ``fwdbwd`` (training), ``--steps`` sets both.
``fwdbwd``: forward + ``torch.autograd.grad`` of the reconstruction with respect to x (x comes from ham_in + ReLU
in the model, so it needs a gradient; the random initial bases have none), with ``--grad`` "unrolled" (official
SegNeXt / mmseg, default) or "one_step" (Hamburger paper). Inputs: x = torch.rand (uniform [0, 1)), bases =
torch.rand normalised over D (the official draw, done once outside the timing), x rotated over enough copies to
exceed twice the L2.

Implementations: backends "cuda", "triton", "cpu" and "reference" through ``segnext_kernels.nmf2d(..., backend=)``
(each reported unavailable, with the reason, where it cannot run; "cpu" is forward only, its ``fwdbwd`` rows run the
reference's backward); baselines "eager" (``nmf2d_reference`` called directly), "compile" / "compile_max"
(``torch.compile(nmf2d_reference)``, default / max-autotune, CUDA only).

Byte model (a fused implementation streaming x once per pass; bases and coef, at most R/D of x, not counted),
X = B*D*N*s bytes (s = dtype size):
  fwd:    K + 1 reads of x (init folded into step 1; the last coef update folded into the reconstruction) and one
          write of the reconstruction                                      = (K + 2) * X
  fwdbwd: fwd + backward reading grad_out once and x K + 1 times and writing grad_x once = (K + 2) + (K + 3)
                                                                           = (2K + 5) * X
  (x of one sample may stay in the L2 across passes, so a kernel can beat this "floor": fractions above 100% are
  possible and mean L2 reuse.)
FLOP model (per sample, the reference's math, multiply-add = 2):
  2DNR (2K + 3)                         x^T bases at init and in K + 1 coef updates, x coef in K bases updates,
                                        the reconstruction bases coef^T
  + (2K + 1) (2DR^2 + 2NR^2)            the Gram matrices and their products (K + 1 coef and K bases updates)
  + 3NR (K + 1) + 3DRK + 4NR            elementwise multiply, divide, + eps; softmax (max, exp, sum, divide)
  fwdbwd: 3x the forward of the same K (backward of a product chain = 2 products per product).
FMA floor: all of the above at the fp32 FMA rate (the updates run in fp32); tensor cores (TF32) may beat it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common

#: name -> (B, D, N, R)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "ade512-TS": (16, 256, 64 * 64, 16),
    "ade512-B": (16, 512, 64 * 64, 64),
    "ade512-L": (16, 1024, 64 * 64, 64),
    "city-TS": (1, 256, 128 * 256, 16),
    "city-B": (1, 512, 128 * 256, 64),
    "city-L": (1, 1024, 128 * 256, 64),
}
CPU_SHAPES = {"ade512-TS-b1": (1, 256, 64 * 64, 16), "ade512-B-b1": (1, 512, 64 * 64, 64)}
CPU_QUICK_SHAPES = {"cpu-tiny": (1, 64, 256, 16)}
QUICK_SHAPES = ["ade512-TS", "ade512-B", "city-B"]
BACKENDS = ("cuda", "triton", "cpu", "reference")
BASELINES = ("eager", "compile", "compile_max")
MODES = ("fwd", "fwdbwd")
#: rows with the same values of these share baselines (speedup columns)
GROUP_KEYS = ("shape_name", "dtype", "mode", "grad")
GRADS = ("unrolled", "one_step")
CHECK_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 4e-2}


def steps_for(mode: str, steps) -> int:
    return steps if steps is not None else (7 if mode == "fwd" else 6)


def byte_flop_model(shape, dtype_name: str, mode: str, K: int) -> dict:
    """``bytes``, ``flops``, ``fma_flops`` of one NMF2D call with K steps (module docstring)."""
    B, D, N, R = shape
    X = B * D * N * common.DTYPE_BYTES[dtype_name]
    fwd = B * (2 * D * N * R * (2 * K + 3) + (2 * K + 1) * (2 * D * R * R + 2 * N * R * R)
               + 3 * N * R * (K + 1) + 3 * D * R * K + 4 * N * R)
    if mode == "fwd":
        return {"bytes": (K + 2) * X, "flops": fwd, "fma_flops": fwd}
    return {"bytes": (2 * K + 5) * X, "flops": 3 * fwd, "fma_flops": 3 * fwd}


def impl_status(impl: str, device: torch.device) -> tuple[bool, str]:
    """(runs here, note); see bench.msca.impl_status."""
    if impl in ("cuda", "triton", "cpu"):
        try:
            common.sk_backends()
        except ImportError as e:
            return False, f"{impl} skipped: segnext_kernels is not importable ({e})"
        try:
            common.sk_resolve_nmf_backend(impl, device)
        except (RuntimeError, ValueError) as e:
            if impl == "triton" and device.type == "cpu":
                return False, ("triton skipped on CPU: the kernels need a GPU; TRITON_INTERPRET=1 would run them "
                               "in the interpreter, which is not a speed measurement")
            return False, f"{impl} skipped: {e}"
        if impl == "triton" and device.type == "cpu":
            return True, "Triton interpreter (TRITON_INTERPRET=1): runs, but not a speed figure"
        return True, ""
    if impl == "reference":
        try:
            from segnext_kernels import nmf2d  # noqa: F401
        except ImportError as e:
            return False, f"reference skipped: segnext_kernels.nmf is not importable ({e})"
    if impl.startswith("compile") and device.type != "cuda":
        return False, f"{impl} skipped: the torch.compile baselines are measured on CUDA only"
    return True, ""


def code_of(impl: str, device: torch.device) -> str:
    """What code an implementation runs; equal strings = same code (no speedup between them). A backend that
    resolves to "reference" runs ``nmf2d_reference``, the ops of the "eager" baseline."""
    if impl == "eager":
        return "nmf2d_reference"
    if impl in BACKENDS:
        try:
            name = common.sk_resolve_nmf_backend(impl, device)
        except Exception:  # noqa: BLE001
            name = impl
        return "nmf2d_reference" if name == "reference" else f"backend {name}"
    return impl


def make_inputs(shape, dtype: torch.dtype, device: torch.device, n_rot: int, seed: int = 0):
    """``(xs, gs, bases)``: ``n_rot`` non-negative inputs x (B, D, N) and grad_outs, and one bases (B, D, R)
    float32 tensor, random and L2-normalised over D."""
    B, D, N, R = shape
    g = torch.Generator(device=device).manual_seed(seed)
    xs = [torch.rand(B, D, N, generator=g, device=device).to(dtype) for _ in range(n_rot)]
    gs = [torch.randn(B, D, N, generator=g, device=device).to(dtype) for _ in range(n_rot)]
    bases = F.normalize(torch.rand(B, D, R, generator=g, device=device), dim=1)
    return xs, gs, bases


def _grad_kw(fn, grad: str) -> dict:
    """The gradient-mode keyword of ``fn``: ``grad_mode`` (current API) or ``grad`` (older)."""
    import inspect

    return {"grad_mode" if "grad_mode" in inspect.signature(fn).parameters else "grad": grad}


def build_op(impl: str, K: int, grad: str):
    """``op(x, bases) -> recon`` of one implementation."""
    from segnext_kernels import nmf2d_reference

    if impl in BACKENDS:
        from segnext_kernels import nmf2d

        def op(x, bases):
            return nmf2d(x, bases, K, backend=impl, **_grad_kw(nmf2d, grad))
        return op

    def ref(x, bases):
        return nmf2d_reference(x, bases, K, **_grad_kw(nmf2d_reference, grad))
    if impl == "eager":
        return ref
    if impl in ("compile", "compile_max"):
        common.compile_reset()
        kw = {"mode": "max-autotune"} if impl == "compile_max" else {}
        return torch.compile(ref, dynamic=False, **kw)
    raise ValueError(impl)


def make_fn(impl: str, mode: str, K: int, grad: str, xs, gs, bases):
    op = build_op(impl, K, grad)
    state = {"i": 0}
    if mode == "fwd":
        def fn():
            x = xs[state["i"] % len(xs)]
            state["i"] += 1
            with torch.no_grad():
                return op(x, bases)
        return fn, op
    xs = [x.detach().requires_grad_(True) for x in xs]

    def fn():
        i = state["i"] % len(xs)
        state["i"] += 1
        return torch.autograd.grad(op(xs[i], bases), [xs[i]], gs[i])
    return fn, op


def run_cases(shapes: dict, dtypes, modes, impls, device, env_meta: dict, budget: common.Budget, *, steps,
              grads, labels: dict, warmup_ms: float, rep_ms: float, check: bool = True, on_row=None) -> list[dict]:
    """Measure every (shape, dtype, mode, grad, impl), torch.compile last. Rows as in bench.msca."""
    from segnext_kernels import nmf2d_reference

    rows = []
    phases = [[i for i in impls if not i.startswith("compile")], [i for i in impls if i.startswith("compile")]]
    for phase in (p for p in phases if p):
        for sname, shape in shapes.items():
            B, D, N, R = shape
            for dname in dtypes:
                nbytes = B * D * N * common.DTYPE_BYTES[dname]
                n_rot = common.rotation_count(nbytes, device)
                inputs, refs = None, {}
                for mode in modes:
                    K = steps_for(mode, steps)
                    for grad in (grads if mode == "fwdbwd" else grads[:1]):
                        for impl in phase:
                            row = dict(env_meta, shape_name=sname, shape=f"{B}x{D}x{N}", B=B, D=D, N=N, R=R,
                                       K=K, dtype=dname, mode=mode, grad=grad if mode == "fwdbwd" else "-",
                                       impl=impl, impl_type="backend" if impl in BACKENDS else "baseline",
                                       code=code_of(impl, device), rotations=n_rot, status="ok", median_ms=None,
                                       p20_ms=None, p80_ms=None,
                                       reps=None, rel_err=None, **byte_flop_model(shape, dname, mode, K))
                            if labels.get(impl):
                                row["status"] = f"ok ({labels[impl]})"
                            if budget.spent():
                                row["status"] = "skipped (time budget)"
                                rows.append(row)
                                if on_row is not None:
                                    on_row(row)
                                continue
                            try:
                                if inputs is None:
                                    inputs = make_inputs(shape, common.DTYPES[dname], device, n_rot)
                                xs, gs, bases = inputs
                                fn, op = make_fn(impl, mode, K, grad, xs, gs, bases)
                                fn()  # compile / JIT outside the timing
                                common.sync(device)
                                interp = "interpreter" in labels.get(impl, "")  # one timed call: no speed figure
                                row.update(common.time_fn(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                                          **({"cpu_min_reps": 1, "cpu_max_reps": 1} if interp else {})))
                                if check and mode == "fwd":
                                    if K not in refs:
                                        with torch.no_grad():
                                            refs[K] = nmf2d_reference(xs[0].float(), bases, K)
                                    with torch.no_grad():
                                        out = op(xs[0], bases).float()
                                    ref = refs[K]
                                    row["rel_err"] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                                    if not row["rel_err"] <= CHECK_TOL[dname]:
                                        row["status"] = f"CHECK FAILED (rel_err > {CHECK_TOL[dname]:g})"
                                del fn, op
                            except Exception as e:  # noqa: BLE001
                                row["status"] = common.short_error(e)
                            rows.append(row)
                            if on_row is not None:
                                on_row(row)
                            med = f"{row['median_ms']:.4f} ms" if row["median_ms"] else "-"
                            tag = f"{mode}/{grad}" if mode == "fwdbwd" else mode
                            print(f"  {sname:10s} {dname:4s} K={K} {tag:15s} {impl:11s} {med:>13s}  {row['status']}",
                                  flush=True)
                del inputs, refs
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], baselines) -> str:
    cols = [("shape", "shape_name", "s"), ("BxDxN", "shape", "s"), ("R", "R", "d"), ("K", "K", "d"),
            ("dtype", "dtype", "s"), ("mode", "mode", "s"), ("grad", "grad", "s"), ("impl", "impl", "s"),
            ("median ms", "median_ms", ".4f"), ("p20 ms", "p20_ms", ".4f"), ("p80 ms", "p80_ms", ".4f")]
    cols += [(f"vs {b}", f"vs_{b}", "s") for b in baselines]
    cols += [("GB/s", "GBps", "g3"), ("TFLOP/s", "TFLOPs", "g3"), ("%HBM", "hbm_frac", "%"),
             ("%FMA", "fma_frac", "%"), ("rel_err", "rel_err", ".1e"), ("status", "status", "s")]
    return common.format_table(common.sort_rows(rows, ("shape_name", "dtype", "mode", "grad")), cols)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speedup over eager by shape, one panel per (dtype, mode, grad)."""
    common.bar_plot(path, [r for r in rows if r["impl"] != "eager"], facet_keys=("dtype", "mode", "grad"),
                    x_key="shape_name", bar_key="impl", value_key="speedup_vs_eager", title=title,
                    ylabel="speedup vs eager (x)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.nmf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="GPU subset: bf16, ade512-TS, ade512-B, city-B, fwd+fwdbwd, backends + eager + compile")
    ap.add_argument("--shape", action="append", default=None, metavar="B,D,N,R",
                    help="custom shape (repeatable); replaces the default shape set")
    ap.add_argument("--shapes", default=None, help="comma-separated names from "
                    f"{','.join([*SHAPES, *CPU_SHAPES, *CPU_QUICK_SHAPES])}")
    ap.add_argument("--dtype", default=None, help="comma-separated subset of fp32,fp16,bf16 (default: all)")
    ap.add_argument("--mode", default="fwd,fwdbwd", help="fwd, fwdbwd or both")
    ap.add_argument("--steps", type=int, default=None, help="K (default: 7 for fwd = eval, 6 for fwdbwd = train)")
    ap.add_argument("--grad", default="unrolled", help="gradient mode(s) of fwdbwd: unrolled, one_step or both")
    ap.add_argument("--backends", default=None, help="subset of cuda,triton,cpu,reference (default: all that run here)")
    ap.add_argument("--baselines", default=None, help="subset of eager,compile,compile_max (default: all)")
    common.add_timing_args(ap, "25, quick 10", "100, quick 50")
    common.add_common_args(ap)
    return ap


def main(argv=None) -> int:
    return common.run_main(build_parser, _main, argv)


def _main(args, argv, device) -> int:
    gpu = device.type == "cuda"
    if args.steps is not None and args.steps < 0:
        raise SystemExit("--steps: expected K >= 0")
    if args.shape:
        shapes = {f"custom{i + 1 if len(args.shape) > 1 else ''}": common.parse_shape(s, 4, "--shape")
                  for i, s in enumerate(args.shape)}
    elif args.shapes:
        named = {**SHAPES, **CPU_SHAPES, **CPU_QUICK_SHAPES}
        shapes = {n: named[n] for n in common.parse_list(args.shapes, list(named), "--shapes")}
    elif args.quick:
        shapes = {n: SHAPES[n] for n in QUICK_SHAPES} if gpu else dict(CPU_QUICK_SHAPES)
    else:
        shapes = dict(SHAPES) if gpu else dict(CPU_SHAPES)
    dtypes = common.parse_list(args.dtype or ("bf16" if args.quick else "fp32,fp16,bf16"), list(common.DTYPES),
                               "--dtype")
    modes = common.parse_list(args.mode, MODES, "--mode")
    grads = common.parse_list(args.grad, GRADS, "--grad")
    backends = common.parse_list(args.backends or ",".join(BACKENDS), BACKENDS, "--backends")
    baselines = common.parse_list(args.baselines or ("eager,compile" if args.quick else ",".join(BASELINES)),
                                  BASELINES, "--baselines")
    notes, labels, impls = [], {}, []
    for impl in backends + baselines:
        ok, note = impl_status(impl, device)
        if ok:
            impls.append(impl)
            if note:
                labels[impl] = "Triton interpreter: not a speed figure" if "interpreter" in note else note
        if note:
            notes.append(note)
    if not gpu:
        notes.append("CPU run: result files are written only with --save")
    env = common.environment(device)
    floors = common.device_floors(device, env, measure=not args.no_measure_bw)
    meta_cols = common.run_meta("nmf", env, floors)
    common.print_header("NMF2D benchmark" + (" (quick subset)" if args.quick else ""), env, floors, notes)
    print(f"shapes (B, D, N, R): {', '.join(f'{n} {tuple(s)}' for n, s in shapes.items())}; dtypes "
          f"{','.join(dtypes)}; modes {','.join(modes)} (K = {steps_for('fwd', args.steps)} fwd, "
          f"{steps_for('fwdbwd', args.steps)} fwdbwd); grad {','.join(grads)}; impls {','.join(impls)}")
    warmup = args.warmup_ms if args.warmup_ms is not None else (10 if args.quick else 25)
    rep = args.rep_ms if args.rep_ms is not None else (50 if args.quick else 100)
    present = [b for b in baselines if b in impls]
    meta = dict(env, kind="nmf", subset="quick" if args.quick else ("custom" if args.shape else "full"),
                floors=floors, notes=notes, argv=list(sys.argv[1:] if argv is None else argv),
                byte_model="fwd (K+2)*X, fwdbwd (2K+5)*X (X = B*D*N*s)",
                flop_model="B*(2DNR(2K+3) + (2K+1)(2DR^2+2NR^2) + 3NR(K+1) + 3DRK + 4NR) fwd, 3x fwdbwd")
    writer = common.ResultWriter("nmf", env, meta, Path(args.out), common.decide_save(args, device),
                                 lambda rs: common.add_derived(rs, GROUP_KEYS, present, floors=floors))
    rows = run_cases(shapes, dtypes, modes, impls, device, meta_cols, common.Budget(args.budget_s),
                     steps=args.steps, grads=grads, labels=labels, warmup_ms=warmup, rep_ms=rep,
                     check=not args.no_check, on_row=writer.add)
    title = common.plot_title("NMF2D speedup vs eager", env)
    paths = writer.finish(lambda p: plot(rows, p, title))
    print()
    print(("NMF2D, CPU wall-clock figures" if not gpu else f"NMF2D on {env['device']}") +
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
