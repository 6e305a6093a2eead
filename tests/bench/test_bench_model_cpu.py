"""``python -m bench.model`` on CPU (``bench/model_cpu.py``), at tiny shapes and with a fast timing loop: the ONNX
Runtime / OpenVINO variants and their output check, the torch.compile variants (a stand-in for the compiler: a real
inductor compile takes minutes), the peak-memory subprocess, the size sweep's CSV / PNG, the goals summary and the
README section. Plumbing, not measurements.
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import common, cpu_peers, model as model_bench, model_cpu, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
HAVE_PEERS = all(importlib.util.find_spec(m) for m in ("onnxruntime", "openvino", "onnx"))
needs_peers = pytest.mark.skipif(not HAVE_PEERS, reason="onnxruntime, openvino and onnx are needed for the peers")
#: tiny runs: SegNeXt-T, fp32, no memory subprocess, one timed call per variant
TINY = ["--cpu", "--models", "t", "--shape", "1,64,64", "--fuse-backend", "reference", "--threads", "1",
        "--reps", "1", "--max-reps", "1"]


@pytest.fixture(autouse=True)
def fast_rounds(monkeypatch):
    """One round of one untimed and one timed call per variant."""
    monkeypatch.setattr(model_cpu, "WARM_CALLS", 1)
    monkeypatch.setattr(model_cpu, "BLOCK", 1)
    monkeypatch.setattr(model_cpu, "MIN_ROUNDS", 1)


def _csv(out: Path, prefix: str) -> tuple[list[dict], dict]:
    (path,) = out.glob(f"{prefix}_cpu-*.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    data = json.loads(path.with_suffix(".json").read_text())
    if HAVE_MPL:
        assert path.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    return rows, {"path": path, **data}


# --------------------------------------------------------------------------------------------- selection, timing
def test_cpu_presets():
    parse = model_bench.build_parser().parse_args
    models, cases, precisions, variants, subset = model_cpu._selection(parse(["--cpu"]), model_bench)
    assert (models, list(cases), precisions, subset) == (["t", "s", "b"], ["ade512-b1", "city1024x2048-b1",
                                                                           "cpu-train512-b1"], ["fp32", "bf16"], "full")
    assert variants == ["eager", "fused", "compile", "compile_fused", "ort", "openvino"]
    assert cases["cpu-train512-b1"] == ("train", 1, 512, 512) and cases["city1024x2048-b1"] == ("infer", 1, 1024, 2048)
    q = model_cpu._selection(parse(["--cpu", "--quick"]), model_bench)
    assert q[0] == ["t"] and list(q[1]) == ["ade512-b1"] and q[2] == ["fp32"]
    assert q[3] == ["eager", "fused", "ort", "openvino"] and q[4] == "quick"
    sw = model_cpu._selection(parse(["--cpu", "--sweep"]), model_bench)
    assert sw[0] == ["t", "b"] and [c[2] for c in sw[1].values()] == [256, 512, 768, 1024, 1536, 2048]
    assert sw[2] == ["fp32"] and sw[3] == ["eager", "fused", "ort"] and sw[4] == "sweep"
    with pytest.raises(SystemExit):
        model_cpu.parse_sizes("100,512")


def test_block_plan_and_round_robin_order(monkeypatch):
    monkeypatch.setattr(model_cpu, "WARM_CALLS", 2)
    monkeypatch.setattr(model_cpu, "BLOCK", 5)
    monkeypatch.setattr(model_cpu, "MIN_ROUNDS", 2)
    assert model_cpu.block_plan(0.1) == (2, 5)  # short calls: as bench/msca_cpu.py
    assert model_cpu.block_plan(1.0) == (1, 2) and model_cpu.block_plan(9.0) == (1, 1)
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    times, rounds = common.round_robin(fns, [(2, 3), (1, 1)], min_reps=3, max_reps=10, min_s=0, min_rounds=2)
    # per round: a's 2 untimed + 3 timed calls, then b's 1 + 1; rounds go on until b has 3 timed calls
    assert calls[:7] == ["a"] * 5 + ["b"] * 2 and rounds == 3
    assert [len(t) for t in times] == [9, 3] and len(calls) == 3 * 7
    # max_reps stops it; min_rounds holds it going
    times, rounds = common.round_robin(fns, [(0, 4), (0, 4)], min_reps=1, max_reps=4, min_s=0, min_rounds=3)
    assert rounds == 3 and [len(t) for t in times] == [12, 12]
    times, rounds = common.round_robin(fns, [(0, 4), (0, 4)], min_reps=1, max_reps=4, min_s=0)
    assert rounds == 1

# --------------------------------------------------------------------------------------------- peers
@needs_peers
def test_peers_run_checked_and_named_in_the_files(tmp_path, capsys):
    rc = model_bench.main([*TINY, "--precision", "fp32,bf16", "--variants", "eager,ort,openvino", "--no-memory",
                           "--save", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0 and "Goals (SegNeXt-T and -B" in text and "not measured" in text
    rows, data = _csv(tmp_path, "model")
    by = {(r["variant"], r["precision"]): r for r in rows}
    assert len(rows) == 6
    for v in ("ort", "openvino"):
        r = by[(v, "fp32")]
        assert r["status"] == "ok", r["status"]
        assert float(r["rel_err"]) < model_cpu.CHECK_TOL["fp32"] and float(r["export_s"]) > 0
        assert "threads=1" in r["peer_settings"].lower()  # intra_op_num_threads / INFERENCE_NUM_THREADS
        assert r["vs_eager"] and r["code"] == cpu_peers.LABELS[v]
    assert by[("ort", "bf16")]["status"].startswith("n/a") and by[("ort", "bf16")]["median_ms"] == ""
    assert "bf16" in by[("openvino", "bf16")]["peer_settings"]
    assert by[("eager", "fp32")]["best_peer"] in ("ort", "openvino")
    for r in rows:  # the CPU, threads, commit, date and versions on every row, in the file name too
        assert r["cpu_model"] == common.cpu_label() and r["threads"] == "1" and r["commit"] and r["date"]
        assert r["torch"] == torch.__version__ and r["onnxruntime"] != "not installed" and r["openvino"]
        assert "peak_rss_MiB" in r and r["peak_rss_MiB"] == ""  # --no-memory
    name = data["path"].name
    assert name.startswith("model_cpu-") and "_t1_torch" in name and "-ort" in name and "-ov" in name
    assert data["meta"]["kind"] == "model" and data["meta"]["complete"] and "goals" in data["meta"]


def test_peer_output_check_flags_a_wrong_peer(monkeypatch, capsys):
    """A peer whose output differs from eager's is marked CHECK FAILED (export and runtime replaced by stand-ins)."""
    monkeypatch.setattr(cpu_peers, "peer_status", lambda name, d="fp32", m="fwd": (True, ""))
    monkeypatch.setattr(model_cpu.ModelExporter, "get",
                        lambda self, letter, state, case: (Path("none.onnx"), np.ones((1, 150, 8, 8), np.float32),
                                                           0.0))
    monkeypatch.setattr(cpu_peers, "build_peer", lambda name, path, threads, prec: (
        (lambda x: np.zeros((1, 150, 8, 8), np.float32)), {"peer_settings": "stand-in"}))
    rc = model_bench.main([*TINY, "--precision", "fp32", "--variants", "eager,ort", "--no-memory"])
    text = capsys.readouterr().out
    assert rc == 0 and "CHECK FAILED (rel_err > 0.01)" in text and "!! 1 row(s) failed the output check" in text


# --------------------------------------------------------------------------------------------- compile, fused
def test_compile_variants_run_and_a_failing_compile_is_recorded(monkeypatch, tmp_path, capsys):
    """torch.compile stand-ins: one that returns the module (the plumbing: compiled rows, compile time outside the
    timing) and one that raises (the row records the error, the rest of the run goes on)."""
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    assert model_bench.main([*TINY, "--precision", "fp32", "--variants", "eager,fused,compile,compile_fused",
                             "--no-memory", "--save", "--out", str(tmp_path / "ok")]) == 0
    rows, _ = _csv(tmp_path / "ok", "model")
    by = {r["variant"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert by["compile"]["code"] == "compiled eager ops" and by["compile_fused"]["code"] == "compiled eager ops"
    assert by["fused"]["vs_eager"] == "same code"  # reference backend: the eager ops, no ratio
    assert by["compile_fused"]["vs_compile"] == "same code" and float(by["compile"]["setup_s"]) >= 0

    def broken(model, **kw):
        raise RuntimeError("inductor failed (test stand-in)")
    monkeypatch.setattr(torch, "compile", broken)
    assert model_bench.main([*TINY, "--train-shape", "1,64,64", "--precision", "fp32", "--variants",
                             "eager,compile", "--no-memory"]) == 0
    text = capsys.readouterr().out
    assert text.count("error: RuntimeError: inductor failed (test stand-in)") >= 2  # infer and train rows
    assert "train-custom64x64-b1" in text


def test_training_step_rows(tmp_path):
    assert model_bench.main(["--cpu", "--models", "t", "--train-shape", "1,64,64", "--fuse-backend", "reference",
                             "--threads", "1", "--reps", "1", "--max-reps", "1", "--precision", "fp32",
                             "--variants", "eager,fused,ort", "--no-memory", "--save", "--out", str(tmp_path)]) == 0
    rows, _ = _csv(tmp_path, "model")
    by = {r["variant"]: r for r in rows}
    assert by["eager"]["mode"] == "train" and by["eager"]["status"] == "ok" and by["fused"]["status"] == "ok"
    assert by["ort"]["status"].startswith("n/a (forward only") or by["ort"]["status"].startswith("skipped")


# --------------------------------------------------------------------------------------------- memory
def test_peak_memory_subprocess():
    spec = dict(letter="t", mode="infer", B=1, H=64, W=64, precision="fp32", variant="eager", threads=1,
                fuse_backend="reference")
    res = model_cpu.measure_memory(spec, timeout_s=300)
    assert res["mem_status"] == "ok", res
    assert 5 < res["peak_rss_MiB"] < 2000 and 0 <= res["held_rss_MiB"] <= res["peak_rss_MiB"]
    assert res["base_rss_MiB"] > 50  # torch is imported before the base
    assert "clear_refs" in res["rss_method"] or "ru_maxrss" in res["rss_method"]
    bad = model_cpu.measure_memory(dict(spec, letter="zz"), timeout_s=300)
    assert bad["mem_status"].startswith("error: memory subprocess exit")


# --------------------------------------------------------------------------------------------- sweep
def test_sweep_writes_csv_and_one_plot(tmp_path, capsys):
    rc = model_bench.main(["--cpu", "--sweep", "--models", "t", "--sizes", "32,64", "--variants", "eager,fused",
                           "--fuse-backend", "reference", "--threads", "1", "--reps", "1", "--max-reps", "1",
                           "--save", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0 and "size sweep" in text and "ms/Mpx" in text
    rows, data = _csv(tmp_path, "model-sweep")
    assert sorted((int(r["size"]), r["variant"]) for r in rows) == [(32, "eager"), (32, "fused"), (64, "eager"),
                                                                   (64, "fused")]
    assert all(r["kind"] == "model_sweep" and r["precision"] == "fp32" and float(r["ms_per_Mpx"]) > 0 for r in rows)
    assert data["meta"]["kind"] == "model_sweep" and data["meta"]["subset"] == "sweep"


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not importable")
def test_sweep_plot_from_rows(tmp_path):
    rows = [dict(model=m, variant=v, size=s, H=s, W=s, batch=1, status="ok", median_ms=k * s * s / 1e4,
                 p20_ms=0.9 * k * s * s / 1e4, p80_ms=1.1 * k * s * s / 1e4)
            for m in ("SegNeXt-T", "SegNeXt-B") for v, k in (("eager", 3.0), ("fused", 1.0), ("ort", 1.5))
            for s in model_cpu.SWEEP_SIZES]
    path = tmp_path / "sweep.png"
    model_cpu.sweep_plot(rows, path, "title")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10000


# --------------------------------------------------------------------------------------------- goals, report
def _goal_rows(fused_b_bf16: bool = True) -> list[dict]:
    """Synthetic rows: T meets every goal; B misses the peer ratio and the speedup, and lacks bf16 unless asked."""
    spec = {("SegNeXt-T", "eager", "fp32"): (300.0, 400.0), ("SegNeXt-T", "fused", "fp32"): (90.0, 380.0),
            ("SegNeXt-T", "fused", "bf16"): (60.0, 300.0), ("SegNeXt-T", "ort", "fp32"): (150.0, 500.0),
            ("SegNeXt-T", "openvino", "fp32"): (120.0, 600.0),
            ("SegNeXt-B", "eager", "fp32"): (750.0, 900.0), ("SegNeXt-B", "fused", "fp32"): (430.0, 950.0),
            ("SegNeXt-B", "ort", "fp32"): (400.0, 1000.0), ("SegNeXt-B", "openvino", "fp32"): (380.0, 1100.0)}
    if fused_b_bf16:
        spec[("SegNeXt-B", "fused", "bf16")] = (500.0, 900.0)
    rows = []
    for (model, variant, prec), (ms, mem) in spec.items():
        rows.append(dict(model=model, case="ade512-b1", mode="infer", batch=1, H=512, W=512, precision=prec,
                         variant=variant, threads=2, status="ok", median_ms=ms, p20_ms=0.97 * ms, p80_ms=1.03 * ms,
                         img_per_s=1e3 / ms, peak_rss_MiB=mem, code=variant))
    return rows


def test_goals_summary():
    gs = {(g["model"], g["goal"]): g for g in model_cpu.goals(_goal_rows(fused_b_bf16=False))}
    t = {k[1]: g for k, g in gs.items() if k[0] == "SegNeXt-T"}
    b = {k[1]: g for k, g in gs.items() if k[0] == "SegNeXt-B"}
    assert all(g["verdict"] == "met" for g in t.values()), t
    assert t["fused <= 0.8x the faster peer"]["value"] == pytest.approx(90 / 120)
    assert "openvino 120.0 ms" in t["fused <= 0.8x the faster peer"]["text"]
    assert t["fused >= 3x faster than eager"]["value"] == pytest.approx(300 / 90)
    assert b["fused <= 0.8x the faster peer"]["verdict"] == "missed"
    assert b["fused >= 3x faster than eager"]["verdict"] == "missed"
    assert b["fused peak memory <= eager's"]["verdict"] == "missed" and "+50 MiB" in \
        b["fused peak memory <= eager's"]["text"]
    assert b["fused bf16 faster than fused fp32"]["verdict"] == "not measured"
    text = model_cpu.goals_text(list(gs.values()))
    assert "4 met, 3 missed, 1 not measured" in text and "MISSED" in text and "NOT MEASURED" in text
    # other thread counts do not count for the goals
    other = [dict(r, threads=1) for r in _goal_rows()]
    assert {g["verdict"] for g in model_cpu.goals(other)} == {"not measured"}


def _fake_cpu_model_files(res: Path) -> None:
    res.mkdir(parents=True, exist_ok=True)
    meta = dict(kind="model", device="CPU: Test CPU", device_kind="cpu", cpu_model="Test CPU", commit="abc1234",
                date="2099-01-01T00:00:00Z", subset="full", torch="2.x", onnxruntime="1.x", openvino="2026.x",
                fuse="segnext_kernels.fuse (MSCA + NMF2D)", complete=True, goals=[])
    (res / "model_cpu-test_abc1234_20990101T000000Z.json").write_text(json.dumps({"schema": 1, "meta": meta,
                                                                                  "rows": _goal_rows()}))
    sweep = [dict(r, kind="model_sweep", case=f"sq{s}", H=s, W=s, size=s) for s in (256, 512)
             for r in _goal_rows() if r["model"] == "SegNeXt-T" and r["precision"] == "fp32"]
    (res / "model-sweep_cpu-test_abc1234_20990101T000001Z.json").write_text(json.dumps(
        {"schema": 1, "meta": dict(meta, kind="model_sweep", subset="sweep"), "rows": sweep}))


def test_report_shows_cpu_model_results_and_goals(tmp_path):
    res = tmp_path / "results"
    _fake_cpu_model_files(res)
    # an old-format CPU model file (no goals) is left out
    (res / "model_cpu-old.json").write_text(json.dumps({"schema": 1, "meta": dict(kind="model", device_kind="cpu",
                                                                                   date="2100-01-01T00:00:00Z"),
                                                        "rows": [dict(model="x")]}))
    cpu = report.newest_cpu_results(res)
    assert set(cpu) == {"model", "model_sweep"} and cpu["model"]["files"][0].name.startswith("model_cpu-test")
    section = report.build_section({}, tmp_path, cpu_results=cpu)
    part = section.split("**Whole SegNeXt models on CPU**", 1)[1]
    assert "Test CPU" in part and "`abc1234`" in part and "2 thread(s)" in part
    assert "| model | case | precision | eager ms | fused ms | ONNX Runtime ms | OpenVINO ms |" in part
    assert "| SegNeXt-T | ade512-b1 | fp32 | 300 | 90 | 150 | 120 |" in part
    assert "- **met**: SegNeXt-T, fused >= 3x faster than eager: eager 300.0 ms / fused 90.0 ms = 3.33x" in part
    assert "- **missed**: SegNeXt-B, fused <= 0.8x the faster peer" in part
    assert "Goals of the CPU issue (4 met, 4 missed, 0 not measured" in part
    sweep = section.split("**Cost against input size on CPU**", 1)[1]
    assert "| H = W | T eager ms | T fused ms | T ort ms | T openvino ms |" in sweep and "| 512 |" in sweep
