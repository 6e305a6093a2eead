"""The benchmark CLIs (``python -m bench.msca / nmf / model / report``), run in-process on CPU at the smallest
shapes: the printed table, the CSV / JSON / PNG files with their metadata columns, and the README section.

Always ``--cpu`` (also on a GPU machine), so these tests stay fast and write nothing unless given ``--save``.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from bench import common, model as model_bench, msca, nmf, report

ROOT = Path(__file__).resolve().parent.parent
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
    assert files[".csv"].name.startswith(f"{kind}_cpu-") and "T" in files[".csv"].stem.split("_")[-1]
    return rows, data


def test_msca_cli_prints_table_and_writes_nothing_without_save(tmp_path, capsys):
    out = tmp_path / "res"
    rc = msca.main(["--cpu", "--shape", "1,8,12,12", "--dtype", "fp32", "--backends", "reference",
                    "--baselines", "eager_nchw,eager_cl", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "CPU wall-clock" in text and "CPU figures" in text
    for col in ("median ms", "vs eager_nchw", "vs eager_cl", "GB/s", "TFLOP/s", "%HBM", "%FMA", "rel_err"):
        assert col in text, col
    table_rows = [line.split() for line in text.split("median ms", 1)[1].splitlines() if line.startswith("custom ")]
    assert sorted((r[2], r[3]) for r in table_rows) == sorted(
        (mode, impl) for mode in ("fwd", "fwdbwd") for impl in ("reference", "eager_nchw", "eager_cl"))
    assert all(r[-1] == "ok" for r in table_rows)
    assert "compile skipped" not in text  # not requested
    assert not out.exists()


def test_msca_cli_save_writes_csv_json_png(tmp_path, capsys):
    rc = msca.main(["--cpu", "--shape", "1,8,12,12", "--dtype", "fp32,bf16", "--backends", "reference",
                    "--baselines", "eager_nchw,compile", "--save", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "compile skipped: the torch.compile baselines are measured on CUDA only" in text
    rows, data = _check_files(tmp_path, "msca", n_rows=2 * 2 * 2)  # dtypes x modes x (reference, eager_nchw)
    assert {r["impl"] for r in rows} == {"reference", "eager_nchw"}
    for r in rows:
        assert r["status"] == "ok" and float(r["median_ms"]) > 0 and float(r["speedup_vs_eager_nchw"]) > 0
        E = 8 * 12 * 12
        s = 4 if r["dtype"] == "fp32" else 2
        assert int(r["bytes"]) == (2 if r["mode"] == "fwd" else 5) * E * s
        assert int(r["flops"]) == E * ((2 * 8 + 218) if r["mode"] == "fwd" else (6 * 8 + 644))
        if r["mode"] == "fwd":
            assert float(r["rel_err"]) < msca.CHECK_TOL[r["dtype"]]
    assert data["meta"]["subset"] == "custom"
    assert "wrote " in text


def test_msca_cli_triton_interpreter_is_labelled(capsys):
    if not common.triton_interpreting():
        pytest.skip("TRITON_INTERPRET is not set in this process")
    rc = msca.main(["--cpu", "--shape", "1,4,8,8", "--dtype", "fp32", "--mode", "fwd", "--backends", "triton",
                    "--baselines", "eager_nchw"])
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
        K = int(r["K"])
        assert int(r["bytes"]) == (K + 2 if r["mode"] == "fwd" else 2 * K + 5) * 16 * 64 * 4


def test_model_cli_save(tmp_path, capsys):
    rc = model_bench.main(["--cpu", "--shape", "1,64,64", "--train-shape", "1,64,64", "--save", "--out",
                           str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "SegNeXt, CPU wall-clock figures" in text and "img/s" in text and "peak MiB" in text
    assert "25 FPS" in text and "768x1536" in text and "RTX 3090" in text
    assert "compile variants skipped" in text and "fused = " in text
    rows, data = _check_files(tmp_path, "model", n_rows=2 * 2)  # (infer, train) x (eager, fused)
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert r["model"] == "SegNeXt-T" and float(r["img_per_s"]) > 0 and r["peak_mem_MiB"] == ""
    assert data["meta"]["fuse"]


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
                      "--baselines", "eager_nchw,eager_cl", "--save", "--out", str(res)]) == 0
    capsys.readouterr()
    readme = _readme_copy(tmp_path)
    # CPU files alone never make it into the README
    report.main(["--readme", str(readme), "--results", str(res)])
    assert "No GPU measurements exist yet" in readme.read_text()
    # the same rows relabelled as a GPU run (an older and a newer one): the newer is reported
    src = next(res.glob("msca_cpu-*.json"))
    for date, name in (("2000-01-01T00:00:00Z", "Old GPU"), ("2099-01-01T00:00:00Z", "NVIDIA H100 80GB HBM3")):
        data = json.loads(src.read_text())
        data["meta"].update(device_kind="cuda", device=name, date=date, commit="abc1234")
        stem = f"msca_fake-{date[:4]}_x"
        (res / f"{stem}.json").write_text(json.dumps(data))
        if HAVE_MPL:
            shutil.copy(src.with_suffix(".png"), res / f"{stem}.png")
    assert report.main(["--readme", str(readme), "--results", str(res)]) == 0
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
                          "reference", "--baselines", impls, "--save", "--out", str(res)]) == 0
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
    assert ref["speedup_vs_eager_nchw"] and ref["speedup_vs_eager_cl"]  # recomputed across the two files
    section = report.build_section(report.newest_gpu_results(res), tmp_path)
    assert "eager_nchw ms | eager_cl ms" in section and "run over 2 files" in section


def test_report_without_markers_prints_and_leaves_readme(tmp_path, capsys):
    readme = _readme_copy(tmp_path, markers=False)
    before = readme.read_text()
    empty = tmp_path / "none"
    empty.mkdir()
    assert report.main(["--readme", str(readme), "--results", str(empty)]) == 0
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
