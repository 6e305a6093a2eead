"""The benchmark-results section of README.md, generated from the newest GPU result files and the newest CPU MSCA
result files.

    python -m bench.report [--readme docs/benchmarks.md] [--results bench/results] [--dtype bf16] [--write | --check]

Without flags the section is printed to stdout and nothing is written; ``--write`` writes it into the README;
``--check`` exits 1 when the README's section differs from what would be generated (nothing is written).

Only the text between ``<!-- bench:results:start -->`` and ``<!-- bench:results:end -->`` is replaced. For each
kind (msca, nmf, model) the newest JSON file written on a CUDA device (``meta.device_kind == "cuda"``, newest by
``meta.date``), merged with older GPU files of the same device and commit (a run split over several calls, the
newest row winning), is summarised: a markdown table (median ms, speedups, fraction of the floors; images/s for
the model), the PNG link, and the GPU, driver, versions, commit and date of the run. CPU files never stand in
for GPU figures: without any GPU file the section says that no GPU measurements exist yet (missing, not guessed).
After the GPU part, a CPU part from the newest CPU MSCA files (``python -m bench.msca`` on CPU, merged over files of
the same CPU model and commit, and shapes those did not measure from the newest earlier preset file of the same CPU
that did, its commit named): the CPU model, commit, date and versions, per mode a table of every implementation's
median ms at the largest thread count measured, the FMA floor, the cpu backend against its fastest peer (with the
spread), and a plain list of what was not run; the newest CPU NMF2D files (``python -m bench.nmf`` on CPU): the cpu
backend against the eager reference per shape, dtype, mode and thread count. Then, from the newest CPU whole-model
files of ``python -m bench.model --cpu`` (files that carry ``meta.goals``, i.e. written by ``bench/model_cpu.py``)
and of its ``--sweep``: per case ms of every variant, images/s, peak RSS, the goals of the CPU issue (met / missed / not measured, with
the numbers) and the size sweep. When the README lacks the markers the section is printed and the README is left
alone.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import common

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"
KINDS = ("msca", "nmf", "model")
#: CPU result kinds summarised (model_sweep: ``python -m bench.model --cpu --sweep``)
CPU_KINDS = ("msca", "nmf", "model", "model_sweep")
TITLES = {"msca": "MSCA (one attention module)", "nmf": "NMF2D (Hamburger decoder)", "model": "Whole SegNeXt models"}


#: columns identifying one measurement; a newer file's row replaces an older one's with the same identity
IDENTITY = {"msca": ("shape_name", "shape", "dtype", "mode", "impl", "threads"),
            "nmf": ("shape_name", "shape", "R", "K", "dtype", "mode", "grad", "impl", "threads"),
            "model": ("model", "case", "batch", "H", "W", "precision", "variant", "threads"),
            "model_sweep": ("model", "case", "batch", "H", "W", "precision", "variant", "threads")}


def _load(results_dir: Path, device_kind: str = "cuda") -> list[tuple[tuple, Path, dict]]:
    found = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            meta = data["meta"]
            kind = meta["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if kind in KINDS + CPU_KINDS and meta.get("device_kind") == device_kind and data.get("rows"):
            found.append(((str(meta.get("date", "")), path.name), path, data))
    return sorted(found, key=lambda t: t[0])


def newest_gpu_results(results_dir: Path) -> dict:
    """kind -> {"meta", "files", "rows"}: the newest GPU result file of that kind (by ``meta.date``) merged with
    the older files of the same device and commit (a run split over several calls); for a measurement present in
    several files the newest row wins. Speedup columns are recomputed over the merged rows."""
    return _newest_results(results_dir, "cuda", KINDS)


def newest_cpu_results(results_dir: Path) -> dict:
    """As ``newest_gpu_results`` for the CPU files: MSCA (``python -m bench.msca`` on CPU) and the whole models
    (``python -m bench.model --cpu``, only files with ``meta.goals``; ``--sweep`` ones as kind "model_sweep"): the
    newest file, preferring the preset runs (default / full) over custom-shape ones, merged with the other CPU
    files of the same CPU model and commit."""
    return _newest_results(results_dir, "cpu", CPU_KINDS)


def _base_commit(commit) -> str:
    return str(commit or "").removesuffix("-dirty")


def _older_shapes(mine, same, newest) -> list:
    """CPU MSCA: the shapes that the newest commit's files did not measure, each from the newest other preset
    file of the same CPU that did (a run split over commits: 512x512 at one, 1024x2048 at the next), as (path,
    {"meta", "rows"}) pairs; every file's commit is named in the section."""
    covered = {str(r.get("shape_name")) for _, d in same for r in d["rows"]}
    taken = {p for p, _ in same}
    extra = []
    for _, p, d in reversed(mine):
        if p in taken or d["meta"].get("device") != newest.get("device") or d["meta"].get("subset") == "custom":
            continue
        rows = [r for r in d["rows"] if str(r.get("shape_name")) not in covered]
        if rows:
            extra.append((p, {"meta": d["meta"], "rows": rows}))
            covered |= {str(r.get("shape_name")) for r in rows}
    return extra


def _newest_results(results_dir: Path, device_kind: str, kinds) -> dict:
    from . import model as _model, model_cpu as _model_cpu, msca as _msca, nmf as _nmf

    files = _load(results_dir, device_kind)
    out = {}
    for kind in kinds:
        mine = [(k, p, d) for k, p, d in files if d["meta"]["kind"] == kind]
        if device_kind == "cpu" and kind.startswith("model"):  # the CPU model files of bench/model_cpu.py (goals)
            mine = [t for t in mine if "goals" in t[2]["meta"]]
        if not mine:
            continue
        preset = [t for t in mine if t[2]["meta"].get("subset") != "custom"]
        newest = (preset or mine)[-1][2]["meta"]
        # files of one device and commit; a "-dirty" run (uncommitted edits in the tree) joins its commit's files:
        # each file's own commit label is listed under the section (``files``)
        same = [(p, d) for _, p, d in mine if (d["meta"].get("device"), _base_commit(d["meta"].get("commit"))) ==
                (newest.get("device"), _base_commit(newest.get("commit")))]
        if device_kind == "cpu" and kind == "msca":
            same += _older_shapes(mine, same, newest)
        merged: dict[tuple, dict] = {}
        for _, d in same:
            for r in d["rows"]:
                merged[tuple(str(r.get(c)) for c in IDENTITY[kind])] = dict(r)
        rows = list(merged.values())
        if device_kind == "cpu" and kind.startswith("model"):
            _model_cpu.derive(rows)
        elif kind == "model":
            common.add_derived(rows, _model.GROUP_KEYS, ("eager", "compile"), impl_key="variant")
        else:
            mod = _msca if kind == "msca" else _nmf
            common.add_derived(rows, mod.GROUP_KEYS, mod.BASELINES)
        out[kind] = {"meta": newest, "files": [p for p, _ in same], "rows": rows,
                     "commits": list(dict.fromkeys(str(d["meta"].get("commit")) for _, d in same)),
                     "complete": all(d["meta"].get("complete", True) for _, d in same)}
    return out


def _ms(v):
    return common.fmt(v, ".3f") if v else "-"


def _x(v):
    return common.fmt(v, "x") if v else "-"


def _pct(v):
    return common.fmt(v, "%") if v else "-"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _link(path: Path, readme_dir: Path) -> str:
    return Path(os.path.relpath(path, readme_dir)).as_posix()


def _run_line(res: dict, readme_dir: Path) -> str:
    meta = res["meta"]
    data = ", ".join(f"[{p.stem}]({_link(p.with_suffix('.csv'), readme_dir)}) (CSV; "
                     f"[JSON]({_link(p, readme_dir)}))" for p in res["files"])
    subset = meta.get("subset", "full") + (" run" if len(res["files"]) == 1 else f" run over {len(res['files'])} files")
    if not res["complete"]:
        subset += ", cut off before the end"
    return (f"{meta.get('device')} (driver {meta.get('driver')}), torch {meta.get('torch')}, triton "
            f"{meta.get('triton')}, CUDA {meta.get('cuda')}, commit `{meta.get('commit')}`, {meta.get('date')}; "
            f"{subset}; data: {data}")


def _ok(r) -> bool:
    return bool(r.get("median_ms")) and str(r.get("status", "")).startswith("ok")


def _pick_dtype(rows, want):
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    return want if want in dtypes else ("bf16" if "bf16" in dtypes else dtypes[0]), dtypes


def _kernel_section(kind: str, rows: list[dict], want_dtype: str, baselines_all) -> tuple[list[str], str]:
    dtype, dtypes = _pick_dtype(rows, want_dtype)
    rows = [r for r in rows if r["dtype"] == dtype]
    key = ("shape_name", "mode", "grad") if kind == "nmf" else ("shape_name", "mode")
    present = [b for b in baselines_all if any(r["impl"] == b and _ok(r) for r in rows)]
    header = ["shape", "B,C,H,W" if kind == "msca" else "B,D,N / R / K", "mode", "fastest backend", "ms"]
    header += [f"{b} ms" for b in present]
    header += [f"vs {present[0]}" if present else "vs baseline", "vs best baseline", "% HBM floor"]
    if kind == "msca":
        header.append("% FMA floor")
    table = []
    groups = list(dict.fromkeys(tuple(r.get(k, "-") for k in key) for r in rows))
    for g in groups:
        sub = [r for r in rows if tuple(r.get(k, "-") for k in key) == g]
        first = sub[0]
        fused = [r for r in sub if r["impl"] in ("cuda", "cuda_fma", "triton") and _ok(r)]
        best = min(fused, key=lambda r: r["median_ms"]) if fused else None
        base = {r["impl"]: r for r in sub if r["impl"] in present and _ok(r)}
        best_base = min(base.values(), key=lambda r: r["median_ms"]) if base else None
        shape = (first["shape"].replace("x", ",") if kind == "msca"
                 else f"{first['shape'].replace('x', ',')} / {first['R']} / {first['K']}")
        mode = first["mode"] + (f" ({first['grad']})" if kind == "nmf" and first["mode"] == "fwdbwd" else "")
        line = [first["shape_name"], shape, mode, best["impl"] if best else "none ran", _ms(best and best["median_ms"])]
        line += [_ms(base[b]["median_ms"]) if b in base else "-" for b in present]
        line.append(_x(best and present and best.get(f"speedup_vs_{present[0]}")))
        line.append(_x(best["median_ms"] and best_base and best_base["median_ms"] / best["median_ms"])
                    if best and best_base else "-")
        line.append(_pct(best and best.get("hbm_frac")))
        if kind == "msca":
            line.append(_pct(best and best.get("fma_frac")))
        table.append(line)
    failed = [r for r in rows if str(r.get("status", "")).startswith(("error", "CHECK"))]
    note = f"dtype {dtype}" + (f" (the files also hold {', '.join(d for d in dtypes if d != dtype)})"
                               if len(dtypes) > 1 else "")
    out = _md_table(header, table)
    if failed:
        out.append("")
        out.append("Rows that failed (see the CSV): " + "; ".join(
            f"{r['shape_name']} {r['mode']} {r['impl']}: {r['status'][:80]}" for r in failed[:8]) +
            (f"; and {len(failed) - 8} more" if len(failed) > 8 else ""))
    return out, note


def _model_section(rows: list[dict], meta: dict) -> list[str]:
    variants = [v for v in ("eager", "fused", "compile", "compile_fused") if any(r["variant"] == v for r in rows)]
    header = ["model", "case", "precision"] + [f"{v} img/s" for v in variants]
    header += ["fused vs eager"] if "fused" in variants else []
    header += ["peak MiB " + " / ".join(variants)]
    table = []
    for g in dict.fromkeys((r["model"], r["case"], r["precision"]) for r in rows):
        sub = {r["variant"]: r for r in rows if (r["model"], r["case"], r["precision"]) == g}
        line = list(g)
        line += [common.fmt(sub[v]["img_per_s"], "g3") if v in sub and _ok(sub[v]) else
                 ("error" if v in sub and str(sub[v]["status"]).startswith("error") else "-") for v in variants]
        if "fused" in variants:
            f = sub.get("fused")
            line.append(_x(f and _ok(f) and f.get("speedup_vs_eager")))
        line.append(" / ".join(common.fmt(sub[v].get("peak_mem_MiB"), ".0f") if v in sub else "-" for v in variants))
        table.append(line)
    out = _md_table(header, table)
    ours = [r for r in rows if r["model"] == "SegNeXt-T" and (r["H"], r["W"], r["batch"]) == (768, 1536, 1)
            and _ok(r)]
    claim = meta.get("paper_claim", "paper: SegNeXt-T 25 FPS at 768x1536 on one RTX 3090")
    out.append("")
    if ours:
        best = max(ours, key=lambda r: r["img_per_s"])
        out.append(f"For comparison, the {claim}. Ours, SegNeXt-T 768x1536 batch 1 on {meta.get('device')}: "
                   f"{best['img_per_s']:.1f} images/s ({best['variant']}, {best['precision']}); a different GPU.")
    else:
        out.append(f"For comparison, the {claim}. SegNeXt-T at 768x1536 is not in this run.")
    errors = [r for r in rows if str(r.get("status", "")).startswith("error")]
    if errors:
        out.append("")
        out.append("Failed combinations (see the CSV): " + "; ".join(
            f"{r['model']} {r['case']} {r['precision']} {r['variant']}: {r['status'][:80]}" for r in errors[:6]) +
            (f"; and {len(errors) - 6} more" if len(errors) > 6 else ""))
    return out


CPU_COLS = (("cpu", "cpu backend"), ("reference", "reference"), ("eager_nchw", "eager NCHW"),
            ("eager_cl", "eager channels_last"), ("compile", "torch.compile"), ("ort", "ONNX Runtime"),
            ("openvino", "OpenVINO"), ("openvino_default", "OpenVINO, default hint"))
CPU_PEERS = ("eager_nchw", "eager_cl", "compile", "ort", "openvino", "openvino_default")


def _cell_ms(r) -> str:
    if r is None:
        return "not run"
    if _ok(r):
        v = r["median_ms"]
        return f"{v:.0f}" if v >= 100 else f"{v:.3g}"
    st = str(r.get("status", ""))
    return "n/a" if st.startswith("n/a") else ("skipped" if st.startswith("skipped") else "error")


def _cpu_section(res: dict, readme_dir: Path) -> list[str]:
    """The CPU MSCA part of the section: per mode, the fp32/bf16 stage shapes at the largest thread count measured,
    every implementation's median ms, the FMA floor and the fused cpu backend against its fastest peer (with the
    spread); then, said plainly, what was not run."""
    from . import msca as _m

    meta, rows = res["meta"], res["rows"]
    data = ", ".join(f"[{p.stem}]({_link(p.with_suffix('.csv'), readme_dir)}) (CSV)" for p in res["files"])
    floors = (meta.get("floors") or {}).get("cpu_fma") or {}
    threads = sorted({int(r["threads"]) for r in rows if str(r.get("threads", "")).isdigit()})
    subset = meta.get("subset", "?") + (" run" if len(res["files"]) == 1 else f" run over {len(res['files'])} files")
    if not res["complete"]:
        subset += ", cut off before the end"
    others = [c for c in res.get("commits", []) if c != str(meta.get("commit"))]
    older = (f" (shapes it did not measure from the newest earlier file that did, commit "
             f"{', '.join(f'`{c}`' for c in others)}: see each file's name)") if others else ""
    out = [f"**MSCA on CPU** (wall-clock `time.perf_counter` medians, implementations timed round-robin in one "
           f"process; CPU figures, they say nothing about GPU speed): {meta.get('cpu_model', meta.get('device'))}, "
           f"threads measured {', '.join(map(str, threads)) or '-'}; torch "
           f"{meta.get('torch')}, onnxruntime {meta.get('onnxruntime')}, openvino {meta.get('openvino')}; commit "
           f"`{meta.get('commit')}`, {meta.get('date')}{older}; {subset}; data: {data}.", ""]
    if floors:
        out += [f"FMA floor = multiply-adds (E x (103 + C) fwd, E x (309 + 3C) fwd+bwd) / (threads x "
                f"{floors.get('fma_ports')} FMA ports x {floors.get('fma_lanes')} fp32 lanes x "
                f"{floors.get('clock_GHz')} GHz); clock {floors.get('clock_source')}, "
                f"1-thread torch.mm {floors.get('mm_GFLOPs')} GFLOP/s, /proc/cpuinfo "
                f"{floors.get('cpuinfo_MHz') or 'no'} MHz. `x (a-b)` = ratio of medians (range over the p20-p80 "
                "spreads); `~same` = the spreads overlap.", ""]
    # the noise of this run, from two implementations that run the same code (reference and eager NCHW)
    pairs = []
    for r in rows:
        if r["impl"] == "reference" and _ok(r):
            twin = next((e for e in rows if e["impl"] == "eager_nchw" and _ok(e) and e.get("code") == r.get("code")
                         and all(e.get(k) == r.get(k) for k in ("shape_name", "dtype", "mode", "threads"))), None)
            if twin:
                pairs.append(max(r["median_ms"], twin["median_ms"]) / min(r["median_ms"], twin["median_ms"]))
    if pairs:
        pairs.sort()
        out += [f"Noise check: `reference` and `eager_nchw` run the same code; their medians differ by "
                f"{(pairs[len(pairs) // 2] - 1) * 100:.0f}% (median over {len(pairs)} cases), "
                f"{pairs[int(0.9 * (len(pairs) - 1))]:.2g}x at the 90th percentile, at most {pairs[-1]:.2g}x: "
                "differences of that size between other columns are not a measured speedup (a shared machine).", ""]
    present = [(i, h) for i, h in CPU_COLS if any(r["impl"] == i for r in rows)]
    for threads_, mode in [(t, m) for t in threads for m in _m.MODES]:
        mrows = [r for r in rows if str(r.get("threads")) == str(threads_) and r["mode"] == mode]
        if not mrows:
            continue
        out.append(f"{'Forward' if mode == 'fwd' else 'Forward + backward'}, {threads_} "
                   f"thread{'s' * (threads_ != 1)} (median ms):")
        out.append("")
        header = ["shape", "C,H,W", "dtype"] + [h for _, h in present] + ["FMA floor", "cpu vs fastest other"]
        table = []
        for g in dict.fromkeys((r["shape_name"], r["dtype"]) for r in mrows):
            cells = {r["impl"]: r for r in mrows if (r["shape_name"], r["dtype"]) == g}
            first = next(iter(cells.values()))
            line = [g[0], f"{first['C']},{first['H']},{first['W']}", g[1]]
            line += [_cell_ms(cells.get(i)) for i, _ in present]
            fl = first.get("fma_floor_ms")
            line.append(f"{fl:.3g}" if fl else "-")
            cpu = cells.get("cpu")
            others = [r for i, r in cells.items() if i in CPU_PEERS and _ok(r)]
            if cpu is None or not _ok(cpu):
                line.append("cpu not run")
            elif not others:
                line.append("-")
            else:
                best = min(others, key=lambda r: r["median_ms"])
                same = bool(cpu.get("code")) and cpu.get("code") == best.get("code")
                c = common.compare_timings(best, cpu, same_code=same)
                line.append(f"{c['text']} vs {best['impl']}")
            table.append(line)
        out += _md_table(header, table) + [""]
    # what was not run, plainly
    missing = []
    reasons = {}
    for r in rows:
        st = str(r.get("status", ""))
        if not _ok(r):
            reasons.setdefault((r["impl"], st if not st.startswith("skipped (time") else "skipped (time budget)"),
                               []).append(r)
    for (impl, st), rs in reasons.items():
        missing.append(f"`{impl}` {len(rs)} row(s): {st[:140]}")
    full = _m.CPU_FULL
    have = {(r["shape_name"], r["dtype"], r["mode"], str(r.get("threads"))) for r in rows}
    shapes_missing = [n for n in full["shapes"] if not any(h[0] == n for h in have)]
    if shapes_missing:
        missing.append("shapes not measured: " + ", ".join(shapes_missing))
    for what, key, idx in (("dtypes", "dtypes", 1), ("modes", "modes", 2), ("thread counts", "threads", 3)):
        absent = [str(v) for v in full[key] if not any(h[idx] == str(v) for h in have)]
        if absent:
            missing.append(f"{what} not measured: {', '.join(absent)}")
    out.append("Not run or not applicable in these files: " + ("; ".join(missing) if missing else "nothing") + ".")
    pngs = [p.with_suffix(".png") for p in res["files"] if p.with_suffix(".png").is_file()]
    if pngs:
        out += ["", f"![MSCA on CPU: median ms by stage]({_link(pngs[-1], readme_dir)})"]
    return out


MODEL_COLS = (("eager", "eager"), ("fused", "fused"), ("compile", "torch.compile"),
              ("compile_fused", "compile of fused"), ("ort", "ONNX Runtime"), ("openvino", "OpenVINO"))


def _cpu_head(what: str, res: dict, readme_dir: Path) -> str:
    meta = res["meta"]
    data = ", ".join(f"[{p.stem}]({_link(p.with_suffix('.csv'), readme_dir)}) (CSV)" for p in res["files"])
    threads = sorted({str(r.get("threads")) for r in res["rows"] if r.get("threads") not in (None, "")})
    subset = meta.get("subset", "?") + (" run" if len(res["files"]) == 1 else f" run over {len(res['files'])} files")
    if not res["complete"]:
        subset += ", cut off before the end"
    return (f"**{what}** (wall-clock `time.perf_counter` medians per image or training step, the variants timed "
            f"round-robin in one process; CPU figures): {meta.get('cpu_model', meta.get('device'))}, "
            f"{', '.join(threads) or '?'} thread(s); torch {meta.get('torch')}, onnxruntime {meta.get('onnxruntime')}, "
            f"openvino {meta.get('openvino')}; commit `{meta.get('commit')}`, {meta.get('date')}; {subset}; "
            f"{meta.get('fuse', 'fused = segnext_kernels.fuse')}; data: {data}.")


def _cpu_nmf_section(res: dict, readme_dir: Path) -> list[str]:
    """The CPU NMF2D part (``python -m bench.nmf`` on CPU): per shape, dtype, mode and thread count the median ms of
    the cpu backend and of the eager reference, and their ratio with its spread."""
    meta, rows = res["meta"], res["rows"]
    data = ", ".join(f"[{p.stem}]({_link(p.with_suffix('.csv'), readme_dir)}) (CSV)" for p in res["files"])
    out = [f"**NMF2D on CPU** (wall-clock `time.perf_counter` medians; CPU figures): "
           f"{meta.get('cpu_model', meta.get('device'))}; torch {meta.get('torch')}; commit `{meta.get('commit')}`, "
           f"{meta.get('date')}; data: {data}. The cpu backend is forward only: its fwd+bwd rows run the "
           "reference's backward.", ""]
    table = []
    keys = sorted({(r["shape_name"], str(r.get("shape")), r["R"], r["K"], r["dtype"], r["mode"], str(r.get("threads")))
                   for r in rows if r["impl"] == "cpu"}, key=lambda k: (k[0], k[6], k[4], k[5]))
    for name, shape, R, K, dt, mode, th in keys:
        same = [r for r in rows if (r["shape_name"], str(r.get("shape")), r["R"], r["K"], r["dtype"], r["mode"],
                                    str(r.get("threads"))) == (name, shape, R, K, dt, mode, th)]
        cpu = next((r for r in same if r["impl"] == "cpu"), None)
        eager = next((r for r in same if r["impl"] == "eager"), None)
        if not (cpu and eager and _ok(cpu) and _ok(eager)):
            continue
        lo, hi = eager.get("p20_ms"), eager.get("p80_ms")
        spread = (f" ({lo / cpu['p80_ms']:.2g}-{hi / cpu['p20_ms']:.2g})" if lo and hi and cpu.get("p20_ms")
                  and cpu.get("p80_ms") else "")
        ratio = _x(eager["median_ms"] / cpu["median_ms"]) + spread
        table.append([f"{name} {shape} R={R} K={K}", dt, mode, th, _ms(cpu["median_ms"]), _ms(eager["median_ms"]),
                      ratio])
    if not table:
        return out[:1] + ["", "no complete cpu / eager pair in the file."]
    return out + _md_table(["shape (B, D, N)", "dtype", "mode", "threads", "cpu ms", "eager ms", "eager / cpu"],
                           table)


def _cpu_model_section(res: dict, readme_dir: Path) -> list[str]:
    """The CPU whole-model part: per (model, case, precision) the ms of every variant, images/s of eager and fused,
    fused against eager and against the faster peer, peak RSS; then the goals, plainly; the PNG."""
    from . import model_cpu as _mc

    rows = res["rows"]
    present = [(v, h) for v, h in MODEL_COLS if any(r["variant"] == v for r in rows)]
    out = [_cpu_head("Whole SegNeXt models on CPU", res, readme_dir), "",
           "Peak memory = peak RSS of one call minus the RSS before the model was built (weights, runtime state "
           "and the call's working memory), each variant in a fresh subprocess (`bench/model_cpu.py`). `x (a-b)` = "
           "ratio of medians (range over the p20-p80 spreads), `~same` = the spreads overlap.", ""]
    header = ["model", "case", "precision"] + [f"{h} ms" for _, h in present]
    header += ["img/s eager / fused", "fused vs eager", "fused / best peer", "peak RSS MiB " +
               " / ".join(v for v, _ in present)]
    table = []
    for g in dict.fromkeys((r["model"], r["case"], r["precision"]) for r in rows):
        sub = {r["variant"]: r for r in rows if (r["model"], r["case"], r["precision"]) == g}
        line = list(g) + [_cell_ms(sub.get(v)) for v, _ in present]
        line.append(" / ".join(common.fmt(sub[v]["img_per_s"], "g3") if v in sub and _ok(sub[v]) else "-"
                               for v in ("eager", "fused")))
        f = sub.get("fused")
        line.append((f.get("vs_eager") or "-") if f and _ok(f) else "-")
        line.append(_x(f and _ok(f) and f.get("ms_vs_best_peer")) + (f" ({f['best_peer']})" if f and _ok(f) and
                                                                    f.get("best_peer") else ""))
        line.append(" / ".join(common.fmt(sub[v].get("peak_rss_MiB"), ".0f") if v in sub else "-"
                               for v, _ in present))
        table.append(line)
    out += _md_table(header, table) + [""]
    gs = _mc.goals(rows)
    out.append("Goals of the CPU issue (" + ", ".join(f"{n} {v}" for v, n in (
        ("met", sum(g["verdict"] == "met" for g in gs)), ("missed", sum(g["verdict"] == "missed" for g in gs)),
        ("not measured", sum(g["verdict"] == "not measured" for g in gs)))) + f"; {_mc.GOAL_CASE}, fp32, "
               f"{_mc.GOAL_THREADS} threads, batch 1):")
    out.append("")
    out += [f"- **{g['verdict']}**: {g['model']}, {g['goal']}: {g['text']}" for g in gs]
    failed = [r for r in rows if str(r.get("status", "")).startswith(("error", "CHECK"))]
    if failed:
        out += ["", "Failed combinations (see the CSV): " + "; ".join(
            f"{r['model']} {r['case']} {r['precision']} {r['variant']}: {r['status'][:80]}" for r in failed[:6]) +
            (f"; and {len(failed) - 6} more" if len(failed) > 6 else "")]
    pngs = [p.with_suffix(".png") for p in res["files"] if p.with_suffix(".png").is_file()]
    if pngs:
        out += ["", f"![SegNeXt on CPU: median ms]({_link(pngs[-1], readme_dir)})"]
    return out


def _cpu_sweep_section(res: dict, readme_dir: Path) -> list[str]:
    """The size sweep: ms of each (model, variant) by input size, and the PNG."""
    rows = res["rows"]
    cols = list(dict.fromkeys((r["model"], r["variant"]) for r in rows))
    header = ["H = W"] + [f"{m[-1]} {v} ms" for m, v in cols]
    table = []
    for size in sorted({int(r["H"]) for r in rows}):
        line = [str(size)]
        for m, v in cols:
            r = next((x for x in rows if x["model"] == m and x["variant"] == v and int(x["H"]) == size), None)
            line.append(_cell_ms(r))
        table.append(line)
    out = [_cpu_head("Cost against input size on CPU", res, readme_dir) + " fp32, batch 1, square inputs.", ""]
    out += _md_table(header, table)
    pngs = [p.with_suffix(".png") for p in res["files"] if p.with_suffix(".png").is_file()]
    if pngs:
        out += ["", f"![SegNeXt on CPU: ms against input size]({_link(pngs[-1], readme_dir)})"]
    return out


def build_section(results: dict, readme_dir: Path, want_dtype: str = "bf16", cpu_results=None) -> str:
    """The markdown placed between the markers (without the markers): the GPU results, then the CPU MSCA ones."""
    lines = ["_Generated by `python -m bench.report --write` from the newest result files in `bench/results/`; "
             "do not edit by hand. GPU times are `triton.testing.do_bench` medians in ms (inputs rotated past the "
             "L2); `vs X` = X's time / ours; floors as defined in `bench/common.py`, byte and FLOP models in "
             "`bench/msca.py` and `bench/nmf.py`._", ""]
    cpu_lines = []
    if cpu_results and "msca" in cpu_results:
        cpu_lines = [""] + _cpu_section(cpu_results["msca"], readme_dir)
    else:
        cpu_lines = ["", "**MSCA on CPU**: no CPU result file yet (`python -m bench.msca --full` writes one)."]
    for kind, part in (("nmf", _cpu_nmf_section), ("model", _cpu_model_section), ("model_sweep", _cpu_sweep_section)):
        if cpu_results and kind in cpu_results:
            cpu_lines += [""] + part(cpu_results[kind], readme_dir)
    if not results:
        lines += ["No GPU measurements exist yet: `bench/results/` holds no result file from a GPU, so there are no "
                  "speed figures here (they are missing, not guessed). To produce them on a CUDA machine: "
                  "`python -m bench.msca`, `python -m bench.nmf`, `python -m bench.model` (or `--quick` for the "
                  "subset `bench/gpu_check.sh` runs), then `python -m bench.report --write`."]
        return "\n".join(lines + cpu_lines)
    for kind in KINDS:
        if kind not in results:
            lines += [f"**{TITLES[kind]}**: no GPU result file yet.", ""]
            continue
        res = results[kind]
        meta, rows = res["meta"], res["rows"]
        if kind == "model":
            body, note = _model_section(rows, meta), f"fused = {meta.get('fuse', 'segnext_kernels.fuse')}"
        else:
            from . import msca as _m, nmf as _n

            mod = _m if kind == "msca" else _n
            body, note = _kernel_section(kind, rows, want_dtype, mod.BASELINES)
        skipped = sum(1 for r in rows if str(r.get("status", "")).startswith("skipped"))
        if skipped:
            note += f"; {skipped} measurement(s) skipped by the time budget"
        lines.append(f"**{TITLES[kind]}**: {_run_line(res, readme_dir)}; {note}.")
        lines.append("")
        lines += body
        pngs = [p.with_suffix(".png") for p in res["files"] if p.with_suffix(".png").is_file()]
        if pngs:
            lines += ["", f"![{TITLES[kind]}: speedup]({_link(pngs[-1], readme_dir)})"]
        lines.append("")
    return "\n".join(lines + cpu_lines).rstrip()


def _names(results: dict) -> str:
    return ", ".join(p.name for res in results.values() for p in res["files"])


def splice(text: str, section: str):
    """README text with ``section`` between the markers, or None when the markers are missing or out of order."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        return None
    return text[:i + len(START)] + "\n" + section + "\n" + text[j:]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", default=str(common.ROOT / "docs" / "benchmarks.md"),
                    help="the file whose results section is generated (default: docs/benchmarks.md, which the "
                         "README's results section points to)")
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    ap.add_argument("--dtype", default="bf16", help="dtype of the MSCA / NMF tables (default bf16 when measured)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the section into the README (between the markers)")
    mode.add_argument("--check", action="store_true", help="exit 1 if the README section is out of date; write nothing")
    mode.add_argument("--stdout", action="store_true", help="print the section (the default without --write)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    readme = Path(args.readme)
    results = newest_gpu_results(Path(args.results))
    cpu = newest_cpu_results(Path(args.results))
    section = build_section(results, readme.resolve().parent, args.dtype, cpu_results=cpu)
    text = readme.read_text() if readme.is_file() else None
    new = splice(text, section) if text is not None else None
    if new is None and (args.write or args.check):
        why = "does not exist" if text is None else f"has no {START} ... {END} markers"
        print(f"{readme} {why}: not modified; the section follows (put it between the markers).")
    if args.check:
        if new is None:
            print(START)
            print(section)
            print(END)
            return 1
        if new != text:
            print(f"{readme}: benchmark section is out of date (run python -m bench.report --write)")
            return 1
        print(f"{readme}: benchmark section is up to date")
        return 0
    if not args.write or new is None:
        print(START)
        print(section)
        print(END)
        return 0
    names = _names(results) + (", " if results and cpu else "") + _names(cpu)
    if new == text:
        print(f"{readme}: benchmark section already up to date ({names or 'no result files'})")
        return 0
    readme.write_text(new)
    print(f"{readme}: benchmark section regenerated from {names or 'no result files (it says so)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
