"""The benchmark CLIs (``python -m bench.msca / nmf / model / report``), run in-process on CPU at the smallest
shapes: the printed table, the CSV / JSON / PNG files with their metadata columns, and the README section.

Always ``--cpu`` (also on a GPU machine), so these tests stay fast and write nothing unless given ``--save``.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from bench import common, model as model_bench, msca, nmf, report

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:  # e.g. a GPU machine's bare Python: the CLIs then skip the PNG and say so
    HAVE_MPL = False


def _files(out: Path, kind: str) -> dict:
    found = {p.suffix: p for p in out.glob(f"{kind}_cpu-*")}
    want = {".csv", ".json", ".png"} if HAVE_MPL else {".csv", ".json"}
    assert set(found) == want, sorted(p.name for p in out.iterdir())
    return found


def _check_files(out: Path, kind: str, n_rows: int) -> tuple[list[dict], dict]:
    files = _files(out, kind)
    with open(files[".csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_rows
    for key in common.META_KEYS:
        assert key in rows[0], key
    for r in rows:
        assert r["kind"] == kind and r["device_kind"] == "cpu" and r["device"].startswith("CPU")
        assert r["torch"] and r["triton"] and r["commit"] and r["date"] and r["driver"] == "n/a"
    data = json.loads(files[".json"].read_text())
    assert data["meta"]["kind"] == kind and data["meta"]["device_kind"] == "cpu"
    assert len(data["rows"]) == n_rows and all(k in data["rows"][0] for k in common.META_KEYS)
    if HAVE_MPL:
        assert files[".png"].read_bytes()[:8] == PNG_MAGIC and files[".png"].stat().st_size > 5000
    assert files[".csv"].name.startswith(f"{kind}_cpu-")
    stamp = rows[0]["date"].replace("-", "").replace(":", "")
    assert stamp in files[".csv"].stem and common.slugify(rows[0]["commit"], 20) in files[".csv"].stem
    return rows, data


#: fast CPU timing for the MSCA CLI tests (a few rounds: plumbing, not a measurement)
FAST = ["--reps", "3", "--max-reps", "4", "--min-s", "0", "--threads", "1"]
HAVE_PEERS = all(importlib.util.find_spec(m) for m in ("onnxruntime", "openvino", "onnx"))


@pytest.fixture
def cpu_backend_missing(monkeypatch):
    """``segnext_kernels.msca(..., backend="cpu")`` raising as it does when the C++ extension is missing (the real
    backend may need a build of minutes on first use: not for these fast tests; its own tests cover it)."""
    import segnext_kernels

    real = segnext_kernels.msca

    def fake(*args, backend="auto", **kw):
        if backend == "cpu":
            raise RuntimeError("backend='cpu' is not available: the CPU extension is not built (test stand-in)")
        return real(*args, backend=backend, **kw)
    monkeypatch.setattr(segnext_kernels, "msca", fake)


# --------------------------------------------------------------------------------------------- spread / same code
def test_compare_timings_spread_overlap_and_same_code():
    base = {"median_ms": 10.0, "p20_ms": 9.0, "p80_ms": 11.0}
    fast = {"median_ms": 2.0, "p20_ms": 1.8, "p80_ms": 2.2}
    c = common.compare_timings(base, fast)
    assert c["verdict"] == "faster" and c["ratio"] == pytest.approx(5.0)
    assert c["lo"] == pytest.approx(9.0 / 2.2) and c["hi"] == pytest.approx(11.0 / 1.8)
    assert c["text"] == "5.0x (4.1-6.1)"
    slow = common.compare_timings(fast, base)
    assert slow["verdict"] == "slower" and slow["text"] == "0.20x (0.16-0.24)"
    # overlapping [p20, p80] ranges: no measurable difference, no ratio printed
    close = {"median_ms": 9.5, "p20_ms": 8.0, "p80_ms": 9.2}
    assert common.compare_timings(base, close)["text"] == "~same"
    assert common.compare_timings(base, close)["verdict"] == "~same"
    # touching ranges count as overlap
    assert common.compare_timings(base, {"median_ms": 8.0, "p20_ms": 7.0, "p80_ms": 9.0})["text"] == "~same"
    # the same code is never compared, whatever the timings
    same = common.compare_timings(base, fast, same_code=True)
    assert same["text"] == "same code" and same["ratio"] is None
    # no quantiles: the ratio alone
    assert common.compare_timings({"median_ms": 3.0}, {"median_ms": 1.0})["text"] == "3.0x"
    assert common.compare_timings({"median_ms": 300.0}, {"median_ms": 1.0})["text"] == "300x"


def test_add_derived_same_code_and_never_self():
    rows = [dict(shape_name="s", dtype="fp32", mode="fwd", impl=i, code=c, median_ms=m, p20_ms=m * 0.95,
                 p80_ms=m * 1.05) for i, c, m in (("eager_nchw", "ops A", 10.0), ("reference", "ops A", 8.0),
                                                  ("eager_cl", "ops B", 5.0), ("fast", "ops C", 1.0))]
    common.add_derived(rows, ("shape_name", "dtype", "mode"), ("eager_nchw", "eager_cl"))
    by = {r["impl"]: r for r in rows}
    assert by["reference"]["vs_eager_nchw"] == "same code" and by["reference"]["speedup_vs_eager_nchw"] is None
    assert by["eager_nchw"]["vs_eager_nchw"] is None  # never against itself
    assert by["eager_cl"]["vs_eager_nchw"].startswith("2.0x (")
    assert by["fast"]["vs_eager_cl"].startswith("5.0x (") and by["fast"]["speedup_vs_eager_cl"] == pytest.approx(5)


def test_msca_code_of_detects_reference_fallback():
    import torch

    cpu = torch.device("cpu")
    assert msca.code_of("reference", cpu) == msca.code_of("eager_nchw", cpu)
    assert msca.code_of("eager_cl", cpu) != msca.code_of("eager_nchw", cpu)
    # the cpu backend: the eager ops only if it resolves to the reference; a missing backend is its own code
    try:
        resolved = common.sk_resolve_backend("cpu", cpu)
    except Exception:  # noqa: BLE001 - not there (yet)
        resolved = None
    assert (msca.code_of("cpu", cpu) == msca.code_of("eager_nchw", cpu)) == (resolved == "reference")


def test_msca_cli_prints_table_and_writes_nothing_without_save(tmp_path, capsys, cpu_backend_missing):
    out = tmp_path / "res"
    rc = msca.main(["--cpu", "--shape", "1,8,12,12", "--dtype", "fp32", "--mode", "fwd,fwdbwd", "--backends",
                    "cpu,reference", "--baselines", "eager_nchw,eager_cl", "--out", str(out), *FAST])
    text = capsys.readouterr().out
    assert rc == 0
    assert "CPU wall-clock" in text and "CPU figures" in text
    for col in ("median ms", "p20 ms", "p80 ms", "vs eager_nchw", "vs eager_cl", "GFLOP/s", "floor ms", "%FMA",
                "rel_err"):
        assert col in text, col
    assert "derived from torch.mm" in text and "fp32 lanes" in text
    table = text.split("median ms", 1)[1]
    rows = {(line.split()[4], line.split()[5]): line for line in table.splitlines() if " custom " in line}
    assert set(rows) == {(m, i) for m in ("fwd", "fwdbwd") for i in ("cpu", "reference", "eager_nchw", "eager_cl")}
    for mode in ("fwd", "fwdbwd"):
        assert "same code" in rows[(mode, "reference")]  # reference runs eager_nchw's ops: no ratio
        assert rows[(mode, "reference")].rstrip().endswith("ok")
        # a missing cpu backend: its row says why, and the rest still runs
        assert "skipped: RuntimeError: backend='cpu' is not available: the CPU extension is not built" in \
            rows[(mode, "cpu")]
    assert not out.exists()


def test_msca_cli_save_csv_names_cpu_commit_date(tmp_path, capsys):
    rc = msca.main(["--cpu", "--shape", "1,8,12,12", "--dtype", "fp32,bf16", "--mode", "fwd,fwdbwd", "--backends",
                    "reference", "--baselines", "eager_nchw", "--save", "--out", str(tmp_path), *FAST])
    text = capsys.readouterr().out
    assert rc == 0
    rows, data = _check_files(tmp_path, "msca", n_rows=2 * 2 * 2)  # dtypes x modes x (reference, eager_nchw)
    name = next(tmp_path.glob("msca_cpu-*.csv")).name
    assert common.slugify(common.cpu_label(), 40) in name and "_t1_" in name and "torch" in name
    for key in ("cpu_model", "threads", "commit", "date", "torch", "onnxruntime", "openvino", "clock_GHz",
                "clock_source", "fma_lanes", "fma_macs", "fma_floor_ms", "fma_frac", "GFLOPs", "code",
                "vs_eager_nchw", "speedup_vs_eager_nchw_lo", "speedup_vs_eager_nchw_hi"):
        assert key in rows[0], key
    E = 8 * 12 * 12
    for r in rows:
        assert r["status"] == "ok" and float(r["median_ms"]) > 0 and r["threads"] == "1"
        assert r["cpu_model"] == common.cpu_label() and r["device"] == f"CPU: {common.cpu_label()}"
        assert "torch.mm" in r["clock_source"] or "cpuinfo" in r["clock_source"]
        s = 4 if r["dtype"] == "fp32" else 2
        assert int(r["bytes"]) == (2 if r["mode"] == "fwd" else 5) * E * s
        assert int(r["flops"]) == E * ((2 * 8 + 218) if r["mode"] == "fwd" else (6 * 8 + 644))
        assert int(r["fma_macs"]) == E * ((103 + 8) if r["mode"] == "fwd" else (309 + 3 * 8))
        if r["mode"] == "fwd":
            assert float(r["rel_err"]) < msca.CHECK_TOL[r["dtype"]]
        if r["impl"] == "reference":
            assert r["vs_eager_nchw"] == "same code" and r["speedup_vs_eager_nchw"] == ""
    assert data["meta"]["subset"] == "custom" and data["meta"]["floors"]["cpu_fma"]["fma_lanes"] in (4, 8, 16)
    assert "wrote " in text


@pytest.mark.skipif(not HAVE_PEERS, reason="onnxruntime, openvino or onnx is not importable in this environment")
def test_msca_cli_peers_tiny_shape(tmp_path, capsys):
    rc = msca.main(["--cpu", "--shape", "1,8,12,12", "--dtype", "fp32,bf16", "--mode", "fwd,fwdbwd", "--backends",
                    "reference", "--baselines", "eager_nchw,ort,openvino,openvino_default", "--save", "--out",
                    str(tmp_path), *FAST])
    capsys.readouterr()
    assert rc == 0
    with open(next(tmp_path.glob("msca_cpu-*.csv")), newline="") as f:
        rows = {(r["dtype"], r["mode"], r["impl"]): r for r in csv.DictReader(f)}
    for impl in ("ort", "openvino", "openvino_default"):
        r = rows[("fp32", "fwd", impl)]
        assert r["status"] == "ok", r["status"]
        assert float(r["median_ms"]) > 0 and float(r["rel_err"]) < msca.CHECK_TOL["bf16"]
        assert r["peer_settings"] and r["vs_eager_nchw"]
        assert rows[("fp32", "fwdbwd", impl)]["status"].startswith("n/a")  # forward only
    assert "INFERENCE_PRECISION_HINT=f32" in rows[("fp32", "fwd", "openvino")]["peer_settings"]
    assert rows[("bf16", "fwd", "openvino")]["status"] == "ok"
    assert "INFERENCE_PRECISION_HINT=bf16" in rows[("bf16", "fwd", "openvino")]["peer_settings"]
    assert rows[("bf16", "fwd", "ort")]["status"].startswith("n/a")  # ORT: fp32 only


def test_msca_cli_triton_interpreter_is_labelled(capsys):
    if not common.triton_interpreting():
        pytest.skip("TRITON_INTERPRET is not set in this process")
    rc = msca.main(["--cpu", "--shape", "1,4,8,8", "--dtype", "fp32", "--mode", "fwd", "--backends", "triton",
                    "--baselines", "eager_nchw", *FAST])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Triton interpreter: not a speed figure" in text
    assert "CHECK FAILED" not in text and "error" not in text


def test_nmf_cli_save(tmp_path, capsys):
    rc = nmf.main(["--cpu", "--shape", "1,16,64,4", "--dtype", "fp32", "--grad", "unrolled,one_step",
                   "--backends", "reference", "--baselines", "eager", "--save", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "NMF2D, CPU wall-clock figures" in text and "vs eager" in text
    rows, _ = _check_files(tmp_path, "nmf", n_rows=(1 + 2) * 2)  # (fwd + 2 grads) x 2 impls
    assert {(r["mode"], r["K"]) for r in rows} == {("fwd", "7"), ("fwdbwd", "6")}
    for r in rows:
        assert r["status"] == "ok", r["status"]
        if r["impl"] == "reference":  # the reference backend runs the eager baseline's nmf2d_reference
            assert r["vs_eager"] == "same code" and r["speedup_vs_eager"] == ""
        K = int(r["K"])
        assert int(r["bytes"]) == (K + 2 if r["mode"] == "fwd" else 2 * K + 5) * 16 * 64 * 4


def test_model_cli_save(tmp_path, capsys, monkeypatch):
    # --fuse-backend reference: the modules resolve to the reference, deterministically (auto may pick the cpu
    # backend, whose extension can take minutes to build on first use); one timed round (plumbing)
    from bench import model_cpu

    for name, value in (("WARM_CALLS", 1), ("BLOCK", 1), ("MIN_ROUNDS", 1)):
        monkeypatch.setattr(model_cpu, name, value)
    rc = model_bench.main(["--cpu", "--models", "t", "--precision", "fp32", "--variants", "eager,fused",
                           "--shape", "1,64,64", "--train-shape", "1,64,64", "--fuse-backend", "reference",
                           "--threads", "1", "--reps", "1", "--max-reps", "1", "--no-memory", "--save",
                           "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "SegNeXt on CPU" in text and "img/s" in text and "peak RSS MiB" in text
    assert "25 FPS" in text and "768x1536" in text and "RTX 3090" in text
    assert "fused = " in text and "Goals (SegNeXt-T and -B" in text
    rows, data = _check_files(tmp_path, "model", n_rows=2 * 2)  # (infer, train) x (eager, fused)
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert r["model"] == "SegNeXt-T" and float(r["img_per_s"]) > 0 and r["peak_rss_MiB"] == ""
        assert r["threads"] == "1" and int(r["reps"]) >= 1
        if r["variant"] == "fused":
            # the backends the swapped modules actually run are recorded; where all resolve to the reference the
            # fused model runs eager's ops: "same code", no speedup (the old "fused 1.07x vs eager" on CPU was noise
            # between identical code)
            ran = dict(part.split(": ") for part in r["fused_backends"].split("; "))
            all_reference = all(n.startswith("reference x") for n in ran.values())
            assert (r["code"] == "eager ops") == all_reference
            assert (r["vs_eager"] == "same code") == all_reference
            assert all_reference and r["speedup_vs_eager"] == "" and "same code" in text
    assert data["meta"]["fuse"] and data["meta"]["goals"]


def _readme_copy(tmp_path: Path, markers: bool = True) -> Path:
    text = (ROOT / "README.md").read_text()
    if markers and report.START in text:   # whatever the real README holds, the copy starts out stale
        head, rest = text.split(report.START, 1)
        text = head + report.START + "\nstale text\n" + report.END + rest.split(report.END, 1)[1]
    elif markers:
        text += f"\n## Benchmark results\n\n{report.START}\nstale text\n{report.END}\n\nAfter the section.\n"
    if not markers:
        text = text.replace(report.START, "").replace(report.END, "")
    path = tmp_path / "README.md"
    path.write_text(text)
    return path


def test_report_without_gpu_results_says_so(tmp_path, capsys):
    readme = _readme_copy(tmp_path)
    before = readme.read_text()
    results = tmp_path / "results"
    results.mkdir()
    assert report.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert readme.read_text() == before
    assert report.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert readme.read_text() == before  # no flags: printed, not written
    assert "No GPU measurements exist yet" in capsys.readouterr().out
    assert report.main(["--readme", str(readme), "--results", str(results), "--write"]) == 0
    after = readme.read_text()
    head, rest = before.split(report.START, 1)
    tail = rest.split(report.END, 1)[1]
    assert after.startswith(head + report.START) and after.endswith(report.END + tail)
    section = after.split(report.START, 1)[1].split(report.END, 1)[0]
    assert "No GPU measurements exist yet" in section and "missing, not guessed" in section
    assert "stale text" not in after
    assert report.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0
    capsys.readouterr()


def test_report_uses_newest_gpu_files_only(tmp_path, capsys):
    res = tmp_path / "results"
    assert msca.main(["--cpu", "--shape", "1,8,12,12", "--dtype", "fp32", "--backends", "reference",
                      "--baselines", "eager_nchw,eager_cl", "--save", "--out", str(res), *FAST]) == 0
    capsys.readouterr()
    readme = _readme_copy(tmp_path)
    # CPU files never stand in for GPU figures: they appear in the CPU part only
    report.main(["--readme", str(readme), "--results", str(res), "--write"])
    text = readme.read_text()
    assert "No GPU measurements exist yet" in text
    assert "**MSCA on CPU**" in text and common.cpu_name() in text
    # the same rows relabelled as a GPU run (an older and a newer one): the newer is reported
    src = next(res.glob("msca_cpu-*.json"))
    for date, name in (("2000-01-01T00:00:00Z", "Old GPU"), ("2099-01-01T00:00:00Z", "NVIDIA H100 80GB HBM3")):
        data = json.loads(src.read_text())
        data["meta"].update(device_kind="cuda", device=name, date=date, commit="abc1234")
        stem = f"msca_fake-{date[:4]}_x"
        (res / f"{stem}.json").write_text(json.dumps(data))
        if HAVE_MPL:
            shutil.copy(src.with_suffix(".png"), res / f"{stem}.png")
    assert report.main(["--readme", str(readme), "--results", str(res), "--write"]) == 0
    section = readme.read_text().split(report.START, 1)[1].split(report.END, 1)[0]
    assert "NVIDIA H100 80GB HBM3" in section and "Old GPU" not in section
    assert "abc1234" in section and "2099-01-01T00:00:00Z" in section
    assert "| shape |" in section and "| custom | 1,8,12,12 | fwd |" in section
    assert ("![" in section and "results/msca_fake-2099_x.png" in section) or not HAVE_MPL
    assert "NMF2D (Hamburger decoder)**: no GPU result file yet" in section


def test_report_merges_files_of_one_device_and_commit(tmp_path, capsys):
    res = tmp_path / "results"
    for impls in ("eager_nchw", "eager_cl"):
        assert msca.main(["--cpu", "--shape", "1,8,12,12", "--dtype", "fp32", "--mode", "fwd", "--backends",
                          "reference", "--baselines", impls, "--save", "--out", str(res), *FAST]) == 0
    capsys.readouterr()
    for i, src in enumerate(sorted(res.glob("msca_cpu-*.json"))):
        data = json.loads(src.read_text())
        data["meta"].update(device_kind="cuda", device="NVIDIA H200", commit="def5678",
                            date=f"2099-01-0{i + 1}T00:00:00Z")
        (res / f"msca_h200_{i}.json").write_text(json.dumps(data))
    merged = report.newest_gpu_results(res)["msca"]
    assert [p.name for p in merged["files"]] == ["msca_h200_0.json", "msca_h200_1.json"]
    assert sorted(r["impl"] for r in merged["rows"]) == ["eager_cl", "eager_nchw", "reference"]
    ref = next(r for r in merged["rows"] if r["impl"] == "reference")
    assert ref["vs_eager_nchw"] == "same code" and ref["vs_eager_cl"]  # recomputed across the two files
    section = report.build_section(report.newest_gpu_results(res), tmp_path)
    assert "eager_nchw ms | eager_cl ms" in section and "run over 2 files" in section


def test_report_cpu_msca_takes_unmeasured_shapes_from_older_commits(tmp_path, capsys):
    """CPU MSCA: the newest commit's files, plus the shapes they lack from the newest earlier preset file of the same
    CPU (a run split over commits); a shape both measured comes from the newest commit only; custom-shape runs and
    other CPUs never join."""
    res = tmp_path / "results"
    for shapes in ("ade512b1-T-s4", "ade512b1-T-s3,ade512b1-T-s4"):
        assert msca.main(["--cpu", "--shapes", shapes, "--dtype", "fp32", "--mode", "fwd", "--backends",
                          "reference", "--baselines", "eager_nchw", "--save", "--out", str(res), *FAST]) == 0
    capsys.readouterr()
    newer, older = sorted(res.glob("msca_cpu-*.json"), key=lambda q: len(json.loads(q.read_text())["rows"]))
    for path, commit, date in ((newer, "bbb2222", "2099-01-02T00:00:00Z"), (older, "aaa1111", "2099-01-01T00:00:00Z")):
        data = json.loads(path.read_text())
        data["meta"].update(commit=commit, date=date)
        for r in data["rows"]:
            r["commit"] = commit
        path.write_text(json.dumps(data))
    other = json.loads(older.read_text())
    other["meta"].update(device="CPU: another", commit="ccc3333", date="2098-01-01T00:00:00Z")
    (res / "msca_cpu-other.json").write_text(json.dumps(other))
    cpu = report.newest_cpu_results(res)["msca"]
    assert cpu["meta"]["commit"] == "bbb2222" and cpu["commits"] == ["bbb2222", "aaa1111"]
    assert [p.name for p in cpu["files"]] == [newer.name, older.name]
    by_shape = {}
    for r in cpu["rows"]:
        by_shape.setdefault(r["shape_name"], set()).add(r["commit"])
    assert by_shape == {"ade512b1-T-s4": {"bbb2222"}, "ade512b1-T-s3": {"aaa1111"}}
    section = report.build_section({}, tmp_path, cpu_results=report.newest_cpu_results(res))
    assert "commit `bbb2222`" in section and "commit `aaa1111`" in section


def test_report_cpu_section_names_cpu_commit_date_and_what_did_not_run(tmp_path, capsys, cpu_backend_missing):
    res = tmp_path / "results"
    assert msca.main(["--cpu", "--shapes", "ade512b1-T-s4", "--dtype", "fp32", "--mode", "fwd", "--backends",
                      "cpu,reference", "--baselines", "eager_nchw,eager_cl", "--save", "--out", str(res),
                      *FAST]) == 0
    capsys.readouterr()
    cpu = report.newest_cpu_results(res)
    assert report.newest_gpu_results(res) == {}
    meta = cpu["msca"]["meta"]
    section = report.build_section({}, tmp_path, cpu_results=cpu)
    assert "No GPU measurements exist yet" in section
    cpu_part = section.split("**MSCA on CPU**", 1)[1]
    assert common.cpu_name() in cpu_part and f"`{meta['commit']}`" in cpu_part and meta["date"] in cpu_part
    assert "Forward, 1 thread (median ms):" in cpu_part
    assert "| ade512b1-T-s4 | 256,16,16 | fp32 |" in cpu_part and "eager NCHW" in cpu_part
    assert "FMA floor" in cpu_part and "torch.mm" in cpu_part
    # said plainly: the other shapes, dtypes, modes and thread counts of the full matrix were not run
    assert "Not run or not applicable" in cpu_part and "shapes not measured: ade512b1-T-s1," in cpu_part
    assert "dtypes not measured: bf16" in cpu_part and "modes not measured: fwdbwd" in cpu_part
    assert "thread counts not measured: 2" in cpu_part
    assert "`cpu` 1 row(s): skipped: RuntimeError" in cpu_part and "cpu not run" in cpu_part


def test_report_without_write_never_touches_readme(tmp_path, capsys):
    readme = _readme_copy(tmp_path)
    before = readme.read_text()
    empty = tmp_path / "none"
    empty.mkdir()
    for flags in ([], ["--stdout"], ["--check"]):
        report.main(["--readme", str(readme), "--results", str(empty), *flags])
        assert readme.read_text() == before, flags
    out = capsys.readouterr().out
    assert report.START in out and "stale text" not in out.split(report.START, 1)[1]
    with pytest.raises(SystemExit):
        report.main(["--readme", str(readme), "--results", str(empty), "--write", "--check"])


def test_report_without_markers_prints_and_leaves_readme(tmp_path, capsys):
    readme = _readme_copy(tmp_path, markers=False)
    before = readme.read_text()
    empty = tmp_path / "none"
    empty.mkdir()
    assert report.main(["--readme", str(readme), "--results", str(empty), "--write"]) == 0
    text = capsys.readouterr().out
    assert "markers" in text and "not modified" in text
    assert report.START in text and "No GPU measurements exist yet" in text
    assert readme.read_text() == before


def test_bad_arguments_are_reported():
    with pytest.raises(SystemExit):
        msca.main(["--cpu", "--dtype", "fp64"])
    with pytest.raises(SystemExit):
        msca.main(["--cpu", "--shape", "1,2,3"])
    with pytest.raises(SystemExit):
        nmf.main(["--cpu", "--grad", "sideways"])
    with pytest.raises(SystemExit):
        model_bench.main(["--cpu", "--models", "xl"])
    with pytest.raises(SystemExit):
        model_bench.main(["--cpu", "--sweep", "--sizes", "100"])


def test_sass_census_parses_loops():
    """bench.sass_census finds loops as backward branches and counts their instruction kinds (a SASS excerpt in
    cuobjdump's format; the tool itself needs cuobjdump, which CI lacks)."""
    from bench import sass_census

    sass = """
\t\tFunction : _Z6kernelv
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
        /*0010*/                   LDSM.16.M88.4 R4, [R2] ;                 /* 0x000000000204783b */
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R12, RZ ;    /* 0x0000000c0408723c */
        /*0030*/               @P0 LDGSTS.E.64 [R3], desc[UR4][R6.64] ;    /* 0x0000000006037fae */
        /*0040*/                   STS [R3], R8 ;                           /* 0x0000000803007388 */
        /*0050*/              @!P1 BRA 0x10 ;                               /* 0xfffffffc00007947 */
        /*0060*/                   EXIT ;                                   /* 0x000000000000794d */
        /*0070*/                   BRA 0x70;                                /* 0xfffffffc00007947 */
\t\tFunction : _Z5otherv
        /*0000*/                   EXIT ;                                   /* 0x000000000000794d */
"""
    (name, n, loops), = sass_census.census(sass, "kernel")
    assert name == "_Z6kernelv" and n == 8
    big = [r for r in loops if r["n"] > 1]
    assert len(big) == 1
    r = big[0]
    assert (r["start"], r["end"], r["n"]) == (0x10, 0x50, 5)
    assert (r["HMMA"], r["LDSM"], r["LDGSTS"], r["STS"], r["LDG"]) == (1, 1, 1, 1, 0)
    assert [c[0] for c in sass_census.census(sass)] == ["_Z6kernelv", "_Z5otherv"]


def test_cpu_label_keeps_cpus_with_and_without_avx512_apart(monkeypatch):
    """Two CPUs that /proc/cpuinfo names alike ("AMD EPYC") get distinct device names and file slugs when one lacks
    AVX-512; AVX-512 CPUs and CPUs without a flags line keep the plain name of the earlier result files."""
    monkeypatch.setattr(common, "cpu_name", lambda: "AMD EPYC")
    for flags, want in (({"avx512f", "avx2", "fma"}, "AMD EPYC"), (set(), "AMD EPYC"),
                        ({"avx2", "fma", "f16c"}, "AMD EPYC (AVX2, no AVX-512)"), ({"sse2"}, "AMD EPYC (no AVX2)")):
        monkeypatch.setattr(common, "cpu_flags", lambda f=flags: f)
        assert common.cpu_label() == want
        env = common.environment(torch.device("cpu"))
        assert env["device"] == f"CPU: {want}" and env["cpu_model"] == want
        assert env["device_slug"] == "cpu-" + common.slugify(want, 40)
