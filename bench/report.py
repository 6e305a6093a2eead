"""Regenerate the benchmark-results section of README.md from the newest GPU result files.

    python -m bench.report [--readme README.md] [--results bench/results] [--dtype bf16] [--check] [--stdout]

Only the text between ``<!-- bench:results:start -->`` and ``<!-- bench:results:end -->`` is replaced. For each
kind (msca, nmf, model) the newest JSON file written on a CUDA device (``meta.device_kind == "cuda"``, newest by
``meta.date``), merged with older GPU files of the same device and commit (a run split over several calls, the
newest row winning), is summarised: a markdown table (median ms, speedups, fraction of the floors; images/s for
the model), the PNG link, and the GPU, driver, versions, commit and date of the run. CPU result files are never
used.
Without any GPU file the section says that no GPU measurements exist yet: numbers are missing, not guessed.
When the README lacks the markers the section is printed to stdout and the README is left alone.

``--check``: exit 1 when the README section differs from what would be generated (nothing is written).
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
TITLES = {"msca": "MSCA (one attention module)", "nmf": "NMF2D (Hamburger decoder)", "model": "Whole SegNeXt models"}


#: columns identifying one measurement; a newer file's row replaces an older one's with the same identity
IDENTITY = {"msca": ("shape_name", "shape", "dtype", "mode", "impl"),
            "nmf": ("shape_name", "shape", "R", "K", "dtype", "mode", "grad", "impl"),
            "model": ("model", "case", "batch", "H", "W", "precision", "variant")}


def _load(results_dir: Path) -> list[tuple[tuple, Path, dict]]:
    found = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            meta = data["meta"]
            kind = meta["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if kind in KINDS and meta.get("device_kind") == "cuda" and data.get("rows"):
            found.append(((str(meta.get("date", "")), path.name), path, data))
    return sorted(found, key=lambda t: t[0])


def newest_gpu_results(results_dir: Path) -> dict:
    """kind -> {"meta", "files", "rows"}: the newest GPU result file of that kind (by ``meta.date``) merged with
    the older files of the same device and commit (a run split over several calls); for a measurement present in
    several files the newest row wins. Speedup columns are recomputed over the merged rows."""
    from . import model as _model, msca as _msca, nmf as _nmf

    files = _load(results_dir)
    out = {}
    for kind in KINDS:
        mine = [(k, p, d) for k, p, d in files if d["meta"]["kind"] == kind]
        if not mine:
            continue
        newest = mine[-1][2]["meta"]
        same = [(p, d) for _, p, d in mine if (d["meta"].get("device"), d["meta"].get("commit")) ==
                (newest.get("device"), newest.get("commit"))]
        merged: dict[tuple, dict] = {}
        for _, d in same:
            for r in d["rows"]:
                merged[tuple(str(r.get(c)) for c in IDENTITY[kind])] = dict(r)
        rows = list(merged.values())
        if kind == "model":
            common.add_derived(rows, _model.GROUP_KEYS, ("eager", "compile"), impl_key="variant")
        else:
            mod = _msca if kind == "msca" else _nmf
            common.add_derived(rows, mod.GROUP_KEYS, mod.BASELINES)
        out[kind] = {"meta": newest, "files": [p for p, _ in same], "rows": rows,
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


def build_section(results: dict, readme_dir: Path, want_dtype: str = "bf16") -> str:
    """The markdown placed between the markers (without the markers)."""
    lines = ["_Generated by `python -m bench.report` from the newest GPU result files in `bench/results/`; "
             "do not edit by hand. Times are `triton.testing.do_bench` medians in ms (inputs rotated past the L2); "
             "`vs X` = X's time / ours; floors as defined in `bench/common.py`, byte and FLOP models in "
             "`bench/msca.py` and `bench/nmf.py`._", ""]
    if not results:
        lines += ["No GPU measurements exist yet: `bench/results/` holds no result file from a GPU, so there are no "
                  "speed figures here (they are missing, not guessed). To produce them on a CUDA machine: "
                  "`python -m bench.msca`, `python -m bench.nmf`, `python -m bench.model` (or `--quick` for the "
                  "subset `bench/gpu_check.sh` runs), then `python -m bench.report`."]
        return "\n".join(lines)
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
    return "\n".join(lines).rstrip()


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
    ap.add_argument("--readme", default=str(common.ROOT / "README.md"))
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    ap.add_argument("--dtype", default="bf16", help="dtype of the MSCA / NMF tables (default bf16 when measured)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README section is out of date; write nothing")
    ap.add_argument("--stdout", action="store_true", help="print the section instead of writing the README")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    readme = Path(args.readme)
    results = newest_gpu_results(Path(args.results))
    section = build_section(results, readme.resolve().parent, args.dtype)
    text = readme.read_text() if readme.is_file() else None
    new = splice(text, section) if text is not None else None
    if args.stdout or new is None:
        if new is None:
            why = "does not exist" if text is None else f"has no {START} ... {END} markers"
            print(f"{readme} {why}: not modified; the section follows (put it between the markers).")
        print(START)
        print(section)
        print(END)
        return 1 if args.check else 0
    if args.check:
        if new != text:
            print(f"{readme}: benchmark section is out of date (run python -m bench.report)")
            return 1
        print(f"{readme}: benchmark section is up to date")
        return 0
    if new == text:
        print(f"{readme}: benchmark section already up to date ({_names(results) or 'no GPU result files'})")
        return 0
    readme.write_text(new)
    print(f"{readme}: benchmark section regenerated from {_names(results) or 'no GPU result files (it says so)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
