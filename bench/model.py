"""Whole-model benchmark: SegNeXt-T/S/B/L inference throughput (images/s) and training-step time, eager against
``segnext_kernels.fuse(model)`` and torch.compile of each, in fp32 and fp16 / bf16 autocast, with peak memory; on
CPU also against ONNX Runtime and OpenVINO, and a cost-against-input-size sweep.

    python -m bench.model [--quick] [--models t,s,b,l] [--cases NAME,...] [--shape B,H,W] [--train-shape B,H,W]
                          [--precision fp32,fp16,bf16] [--variants eager,fused,compile,compile_fused,ort,openvino]
                          [--fuse-backend auto] [--out DIR] [--save | --no-save] [--budget-s S] [--cpu]
                          [--threads T] [--no-memory] [--reps N] [--max-reps N] [--min-s S]
                          [--sweep [--sizes 256,512,...]] [--goals FILE.json ...]

Cases (``CASES``, H x W): ADE20K 512x512 batch 1 and 16, Cityscapes 768x1536 and 1024x2048 (the 2048x1024 frames,
W x H) batch 1, inference in eval mode under no_grad; one training step (forward, cross-entropy against random
labels, backward; no optimizer step) at 512x512 batch 16, train mode (BN batch statistics,
NMF2D with 6 steps), the single-GPU batch of mmseg's 1x16 ADE20K recipe.

On CPU (no GPU, or ``--cpu``; ``bench/model_cpu.py`` has the details): SegNeXt-T, -S and -B at ADE20K 512x512 and
Cityscapes 1024x2048 batch 1 (inference) and one training step at 512x512 batch 1 (``CPU_CASES``), fp32 and bf16,
2 threads (``--threads``), variants eager, fused, compile, compile_fused and the ONNX Runtime / OpenVINO peers (forward
only; ONNX Runtime fp32 only), timed round-robin in one process; peak memory as peak RSS growth in a fresh subprocess
per row (``peak_rss_MiB``; ``--no-memory`` skips it); the goals of the CPU issue printed at the end. ``--quick``: T,
512x512, fp32, eager / fused / ort / openvino. ``--sweep``: SegNeXt-T and -B, eager / fused / ort, fp32, square
inputs 256 to 2048 (``--sizes``), ms against size in one PNG. ``--goals FILE.json``: the goals from result files.
CPU runs write result files only with ``--save``.

Variants: "eager" (the reference model), "fused" (``segnext_kernels.fuse(model)``: MSCA and NMF2D swapped in place,
same parameters), "compile" and "compile_fused" (``torch.compile`` of each, default mode; compile time
excluded: one call before timing, caches reset per case), "ort" and "openvino" (CPU only: the exported eager model,
``bench/cpu_peers.py``). Precision "fp32" runs the fp32 model; "fp16" / "bf16" run it under
``torch.autocast(dtype=...)`` (weights stay fp32, as in mixed-precision training).

Columns: median / p20 / p80 ms per call (a batch, or one training step); img/s = batch / median; ``vs eager`` /
``vs compile`` = that variant's median / this median; peak MiB = ``torch.cuda.max_memory_allocated`` over one call
after a reset (weights, inputs and activations; on CPU ``peak_rss_MiB`` instead, see ``bench/model_cpu.py``).
Printed beside the table: the paper's real-time claim, SegNeXt-T at 25 FPS for 768x1536 on one RTX 3090 (paper
section 4.3 / Table 11), next to our SegNeXt-T 768x1536 figure (a different GPU: compare with care).
"""
from __future__ import annotations

import argparse
import gc
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common

MODELS = ("t", "s", "b", "l")
#: name -> (mode, batch, H, W)
CASES = {
    "ade512-b1": ("infer", 1, 512, 512),
    "ade512-b16": ("infer", 16, 512, 512),
    "city768x1536-b1": ("infer", 1, 768, 1536),
    "city1024x2048-b1": ("infer", 1, 1024, 2048),
    "train512-b16": ("train", 16, 512, 512),
}
#: CPU runs: batch 1 (and tiny cases for smoke tests, selectable with --cases)
CPU_CASES = {"ade512-b1": ("infer", 1, 512, 512), "city1024x2048-b1": ("infer", 1, 1024, 2048),
             "cpu-train512-b1": ("train", 1, 512, 512), "cpu64-b1": ("infer", 1, 64, 64),
             "cpu-train64-b1": ("train", 1, 64, 64)}
QUICK = dict(models=("t", "b"), cases=("ade512-b16", "city768x1536-b1", "train512-b16"),
             precisions=("fp32", "bf16"), variants=("eager", "fused"))
VARIANTS = ("eager", "fused", "compile", "compile_fused", "ort", "openvino")
GPU_VARIANTS = ("eager", "fused", "compile", "compile_fused")
#: the CPU presets: the full matrix of the CPU issue, and --quick (the smoke run)
CPU_FULL = dict(models=("t", "s", "b"), cases=("ade512-b1", "city1024x2048-b1", "cpu-train512-b1"),
                precisions=("fp32", "bf16"), variants=VARIANTS)
CPU_QUICK = dict(models=("t",), cases=("ade512-b1",), precisions=("fp32",),
                 variants=("eager", "fused", "ort", "openvino"))
PRECISIONS = ("fp32", "fp16", "bf16")
#: rows with the same values of these share baselines (speedup columns)
GROUP_KEYS = ("model", "case", "precision")
PAPER_CLAIM = ("paper (SegNeXt, NeurIPS 2022, section 4.3 / Table 11): SegNeXt-T runs at 25 FPS on a 768x1536 "
               "image on one RTX 3090, 'without any specific software or hardware acceleration'")
NUM_CLASSES = 150


def resolve_fuse():
    """``(fuse_fn, description)``: ``segnext_kernels.fuse`` (MSCA and NMF2D swapped in place)."""
    from segnext_kernels import fuse

    return fuse, "segnext_kernels.fuse (MSCA + NMF2D)"


def resolved_backends(model, device: torch.device) -> dict:
    """``{"msca": {backend: count}, "ham": {backend: count}, "mlp": {...}}``: which backend each swapped module of
    ``model`` actually runs on ``device`` (its ``backend`` attribute resolved by ``segnext_kernels.backends.resolve``,
    the function the ops themselves call)."""
    out: dict[str, dict[str, int]] = {"msca": {}, "ham": {}, "mlp": {}}
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    for m in model.modules():
        kind = {"FusedMSCA": "msca", "FusedNMF2D": "ham", "FusedMlp": "mlp"}.get(type(m).__name__)
        if kind is None:
            continue
        try:
            name = common.sk_resolve({"ham": "nmf2d"}.get(kind, kind), m.backend, device, dtype)
        except Exception as e:  # noqa: BLE001 - the forward would raise the same
            name = f"unavailable ({type(e).__name__})"
        out[kind][name] = out[kind].get(name, 0) + 1
    return out


def describe_backends(res: dict) -> str:
    """'msca: reference x8; ham: reference x1'."""
    return "; ".join(f"{k}: " + ", ".join(f"{n} x{c}" for n, c in v.items()) for k, v in res.items() if v) or "none"


def fused_code(res: dict) -> str:
    """The ``code`` column of a fused variant: "eager ops" (as the eager variant) when every swapped module resolves
    to the reference backend, i.e. runs the eager ops; otherwise the backends that run."""
    names = {n for v in res.values() for n in v}
    return "eager ops" if names <= {"reference"} else "fused " + describe_backends(res)


def build_model(variant_letter: str, device: torch.device):
    import segnext

    factory = getattr(segnext, f"segnext_{variant_letter}")
    return factory(num_classes=NUM_CLASSES).to(device).eval()


def make_fn(model, case, precision: str, device: torch.device, seed: int = 0):
    """``fn()`` running one inference batch or one training step of ``model`` on fixed random images."""
    mode, B, H, W = case
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g, device=device)
    amp = (torch.autocast(device.type, dtype=common.DTYPES[precision]) if precision != "fp32" else nullcontext())
    if mode == "infer":
        def fn():
            with torch.no_grad(), amp:
                return model(x)
        return fn
    target = torch.randint(0, NUM_CLASSES, (B, H, W), generator=g, device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def fn():
        for p in params:
            p.grad = None
        with amp:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        return loss.detach()
    return fn


def peak_memory_mib(fn, device: torch.device):
    """max_memory_allocated over one call of ``fn`` (MiB), None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def run_cases(models, cases: dict, precisions, variants, device, env_meta: dict, budget: common.Budget, *,
              fuse_fn, fuse_backend: str, warmup_ms: float, rep_ms: float, on_row=None) -> list[dict]:
    """Every (model, variant, case, precision). Each variant runs on its own freshly built model holding the same
    weights (one state_dict per model size), built when the variant starts and freed when it ends, so exactly one
    model is resident at a time and peak memory compares fairly. eager and fused of every model run first, the
    torch.compile variants after them (a spent budget skips those first)."""
    rows = []
    states: dict[str, dict] = {}
    phases = [[v for v in VARIANTS if v in variants and not v.startswith("compile")],
              [v for v in VARIANTS if v in variants and v.startswith("compile")]]
    for phase in (p for p in phases if p):
        for letter in models:
            name = f"SegNeXt-{letter.upper()}"
            for variant in phase:
                model, swapped = None, None
                for cname, case in cases.items():
                    mode, B, H, W = case
                    for prec in precisions:
                        row = dict(env_meta, model=name, case=cname, mode=mode, batch=B, H=H, W=W, precision=prec,
                                   variant=variant, status="ok", median_ms=None, p20_ms=None, p80_ms=None,
                                   reps=None, img_per_s=None, peak_mem_MiB=None, fused_modules=None,
                                   fused_backends=None, code=None)
                        if budget.spent():
                            row["status"] = "skipped (time budget)"
                        else:
                            try:
                                if model is None:
                                    if letter not in states:
                                        states[letter] = {k: v.cpu().clone() for k, v in
                                                          build_model(letter, torch.device("cpu")).state_dict().items()}
                                    model = build_model(letter, device)
                                    model.load_state_dict(states[letter])
                                    if variant.endswith("fused"):
                                        swapped = fuse_fn(model, backend=fuse_backend)
                                row["fused_modules"] = None if swapped is None else str(swapped)
                                if swapped is not None:
                                    res = resolved_backends(model, device)
                                    row["fused_backends"] = describe_backends(res)
                                    code = fused_code(res)
                                else:
                                    code = "eager ops"
                                row["code"] = ("compiled " + code) if variant.startswith("compile") else code
                                _measure(row, model, variant, case, prec, device, warmup_ms, rep_ms)
                            except Exception as e:  # noqa: BLE001 - OOM or an unsupported combination: go on
                                row["status"] = common.short_error(e)
                        rows.append(row)
                        if on_row is not None:
                            on_row(row)
                        med = f"{row['median_ms']:.3f} ms" if row["median_ms"] else "-"
                        print(f"  {name:10s} {cname:16s} {prec:4s} {variant:13s} {med:>12s}  {row['status']}",
                              flush=True)
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _measure(row: dict, model, variant: str, case, prec: str, device, warmup_ms: float, rep_ms: float) -> None:
    """Time one (variant, case, precision) into ``row``: median/p20/p80 ms, img/s, peak MiB."""
    model.train(case[0] == "train")
    run_model = model
    if variant.startswith("compile"):
        common.compile_reset()
        run_model = torch.compile(model, dynamic=False)
    fn = make_fn(run_model, case, prec, device)
    fn()  # compile / JIT / autotune / cuDNN algorithm choice outside the timing
    common.sync(device)
    row.update(common.time_fn(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms, cpu_min_s=0.3, cpu_min_reps=3,
                              cpu_max_reps=10))
    row["img_per_s"] = case[1] * 1e3 / row["median_ms"]
    row["peak_mem_MiB"] = peak_memory_mib(fn, device)


def table(rows, baselines) -> str:
    cols = [("model", "model", "s"), ("case", "case", "s"), ("prec", "precision", "s"), ("variant", "variant", "s"),
            ("median ms", "median_ms", ".3f"), ("p20 ms", "p20_ms", ".3f"), ("p80 ms", "p80_ms", ".3f"),
            ("img/s", "img_per_s", "g3")]
    cols += [(f"vs {b}", f"vs_{b}", "s") for b in baselines]
    cols += [("peak MiB", "peak_mem_MiB", ".0f"), ("backends run", "fused_backends", "s"), ("status", "status", "s")]
    return common.format_table(common.sort_rows(rows, ("model", "case", "precision")), cols)


def paper_line(rows, device_name: str) -> str:
    """The paper's real-time claim next to our SegNeXt-T 768x1536 batch-1 figures."""
    ours = [r for r in rows if r["model"] == "SegNeXt-T" and (r["H"], r["W"], r["batch"]) == (768, 1536, 1)
            and r["img_per_s"]]
    if not ours:
        return (f"{PAPER_CLAIM}.\n  ours: SegNeXt-T at 768x1536 was not measured in this run"
                + (" (the CPU cases are 512x512 and 1024x2048)" if "CPU" in device_name else ""))
    parts = ", ".join(f"{r['variant']} {r['precision']} {r['img_per_s']:.1f}" for r in ours)
    best = max(ours, key=lambda r: r["img_per_s"])
    return (f"{PAPER_CLAIM}.\n  ours on {device_name} (images/s, batch 1): {parts}; best {best['img_per_s']:.1f} "
            f"({best['variant']}, {best['precision']}). Different GPU from the paper's: compare with care.")


def plot(rows, path: Path, title: str) -> None:
    """Speedup over eager by model and case, one panel per precision."""
    for r in rows:
        r["_label"] = f"{r['model'][-1]} {r['case']}"
    try:
        common.bar_plot(path, [r for r in rows if r["variant"] != "eager"], facet_keys=("precision",),
                        x_key="_label", bar_key="variant", value_key="speedup_vs_eager", title=title,
                        ylabel="speedup vs eager (x)")
    finally:
        for r in rows:
            r.pop("_label", None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="GPU subset: SegNeXt-T and -B, ade512-b16, city768x1536-b1, train512-b16, fp32 and bf16, "
                         "eager and fused; CPU: SegNeXt-T, ade512-b1, fp32, eager, fused, ort, openvino")
    ap.add_argument("--models", default=None, help="subset of t,s,b,l (default all; CPU: t,s,b; sweep: t,b)")
    ap.add_argument("--cases", default=None,
                    help=f"subset of {','.join(CASES)} (default all) or, on CPU, of {','.join(CPU_CASES)} "
                         "(default the first three)")
    ap.add_argument("--shape", default=None, metavar="B,H,W", help="custom inference case (replaces --cases)")
    ap.add_argument("--train-shape", default=None, metavar="B,H,W", help="custom training-step case (with --shape)")
    ap.add_argument("--precision", default=None,
                    help="subset of fp32,fp16,bf16 (default all; CPU: fp32,bf16; sweep: fp32)")
    ap.add_argument("--variants", default=None,
                    help="subset of eager,fused,compile,compile_fused,ort,openvino (default: GPU the first four, CPU "
                         "all; ort and openvino are CPU only; sweep: eager,fused,ort)")
    ap.add_argument("--fuse-backend", default="auto", help="backend passed to fuse() (default auto)")
    ap.add_argument("--sweep", action="store_true",
                    help="CPU: cost against input size: SegNeXt-T and -B, eager/fused/ort, fp32, batch 1, square "
                         "inputs (--sizes); its own CSV/JSON/PNG")
    ap.add_argument("--sizes", default=None,
                    help="sweep sizes, comma-separated multiples of 32 (default 256,512,768,1024,1536,2048)")
    ap.add_argument("--no-memory", action="store_true",
                    help="CPU: skip the peak-memory subprocesses (peak_rss_MiB empty)")
    ap.add_argument("--reps", type=int, default=5, help="CPU: minimum timed calls per variant (default 5)")
    ap.add_argument("--max-reps", type=int, default=25, help="CPU: maximum timed calls per variant (default 25)")
    ap.add_argument("--min-s", type=float, default=0.0,
                    help="CPU: minimum timing seconds per (model, case, precision) (default 0)")
    ap.add_argument("--goals", nargs="+", default=None, metavar="FILE.json",
                    help="print the CPU goals from result files (JSON or CSV path) and exit")
    common.add_timing_args(ap, "100, quick 50", "500, quick 200", check=False)
    common.add_common_args(ap)
    ap.set_defaults(threads=None)  # CPU: 2 threads unless --threads (bench/model_cpu.py)
    for a in ap._actions:
        if a.dest == "threads":
            a.help = "CPU runs: torch / ONNX Runtime / OpenVINO threads (default 2)"
    return ap


def main(argv=None) -> int:
    return common.run_main(build_parser, _main, argv)


def custom_cases(args) -> dict:
    """The cases of ``--shape`` (inference) and ``--train-shape`` (a training step); empty without either."""
    cases = {}
    if args.shape:
        B, H, W = common.parse_shape(args.shape, 3, "--shape")
        cases[f"custom{H}x{W}-b{B}"] = ("infer", B, H, W)
    if args.train_shape:
        B, H, W = common.parse_shape(args.train_shape, 3, "--train-shape")
        cases[f"train-custom{H}x{W}-b{B}"] = ("train", B, H, W)
    return cases


def _main(args, argv, device) -> int:
    if args.goals:
        from . import model_cpu

        return model_cpu.main_goals(args.goals)
    if device.type == "cpu":
        from . import model_cpu

        return model_cpu.main_cpu(args, argv)
    return _main_gpu(args, argv, device)


def _main_gpu(args, argv, device) -> int:
    """The CUDA run (CPU runs: ``bench/model_cpu.py``)."""
    quick = args.quick
    models = common.parse_list(args.models or (",".join(QUICK["models"]) if quick else ",".join(MODELS)), MODELS,
                               "--models")
    if args.shape or args.train_shape:
        cases = custom_cases(args)
    elif args.cases:
        allowed = dict(CASES, **CPU_CASES)
        cases = {n: allowed[n] for n in common.parse_list(args.cases, list(allowed), "--cases")}
    else:
        cases = {n: CASES[n] for n in QUICK["cases"]} if quick else dict(CASES)
    precisions = common.parse_list(args.precision or (",".join(QUICK["precisions"]) if quick else
                                                      ",".join(PRECISIONS)), PRECISIONS, "--precision")
    variants = common.parse_list(args.variants or (",".join(QUICK["variants"]) if quick else ",".join(GPU_VARIANTS)),
                                 VARIANTS, "--variants")
    notes = []
    if any(v in ("ort", "openvino") for v in variants):
        variants = [v for v in variants if v not in ("ort", "openvino")]
        notes.append("ort / openvino skipped: the ONNX Runtime and OpenVINO peers are measured on CPU runs (--cpu)")
    if args.sweep:
        notes.append("--sweep is a CPU run (--cpu): ignored here")
    fuse_fn, fuse_desc = resolve_fuse()
    if any(v.endswith("fused") for v in variants):
        notes.append(f"fused = {fuse_desc}, backend={args.fuse_backend!r}")
        notes.append("the backend each fused module actually runs is asked for (resolve_backend); where they all "
                     "resolve to the reference, fused runs the eager ops: its rows say 'same code', no speedup")
    env = common.environment(device)
    floors = {"hbm_GBps": None, "hbm_source": "none", "hbm_peak_GBps": None, "fma_peak_TFLOPs": None}
    meta_cols = common.run_meta("model", env, floors)
    common.print_header("SegNeXt whole-model benchmark" + (" (quick subset)" if quick else ""), env, None, notes)
    shown = ", ".join(f"{n} {c[0]} {c[1]}x3x{c[2]}x{c[3]}" for n, c in cases.items())
    print(f"models {','.join(models)}; cases {shown}; precisions {','.join(precisions)}; "
          f"variants {','.join(variants)}")
    warmup = args.warmup_ms if args.warmup_ms is not None else (50 if quick else 100)
    rep = args.rep_ms if args.rep_ms is not None else (200 if quick else 500)
    present = [b for b in ("eager", "compile") if b in variants]
    meta = dict(env, kind="model", subset="quick" if quick else "full", notes=notes, fuse=fuse_desc,
                argv=list(sys.argv[1:] if argv is None else argv), paper_claim=PAPER_CLAIM)
    writer = common.ResultWriter("model", env, meta, Path(args.out), common.decide_save(args, device),
                                 lambda rs: common.add_derived(rs, GROUP_KEYS, present, impl_key="variant"))
    rows = run_cases(models, cases, precisions, variants, device, meta_cols, common.Budget(args.budget_s),
                     fuse_fn=fuse_fn, fuse_backend=args.fuse_backend, warmup_ms=warmup, rep_ms=rep,
                     on_row=writer.add)
    title = common.plot_title("SegNeXt speedup vs eager", env)
    paths = writer.finish(lambda p: plot(rows, p, title))
    print()
    print(f"SegNeXt on {env['device']}" +
          " (median ms per batch / training step; img/s = batch / median; vs X = X's median / this median with its "
          "p20/p80 range; ~same = the spreads overlap; same code = both ran the same ops: no ratio)")
    print(table(rows, present))
    print()
    print(paper_line(rows, env["device"]))
    common.report_saved(paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
