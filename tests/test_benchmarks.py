"""benchmarks/: the layout (thin command, one file per op, no private ppml imports), the GPU rows' code path run on the
CPU with small shapes (issue 19's tables: bounds, matching precision, targets, no crash when a backend is absent or
wrong), the fixed-count timers and the result files. The benchmark itself is run by hand and by gpu_check.sh."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# The benchmark modules import each other by bare name, as they do when throughput.py runs as a script.
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402
import _report  # noqa: E402
import _timing  # noqa: E402
import bench_anchor  # noqa: E402
import bench_mix  # noqa: E402
import bench_shuffle  # noqa: E402
import throughput  # noqa: E402

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _cfg(device: torch.device = CPU) -> _harness.Config:
    return _harness.Config(device=device, quick=True, env=_timing.environment(device))


def test_layout_thin_command_and_no_file_over_800_lines():
    lines = {p.relative_to(BENCH).as_posix(): len(p.read_text().splitlines()) for p in BENCH.rglob("*.py")}
    assert lines["throughput.py"] < 300, lines["throughput.py"]
    assert {"bench_shuffle.py", "bench_mix.py", "bench_anchor.py", "_harness.py", "_report.py"} <= set(lines)
    too_long = {name: n for name, n in lines.items() if n > 800}
    assert not too_long, too_long
    # The one-off studies live in experiments/, the commands stay at the top.
    assert {"experiments/encrypt_throughput.py", "experiments/anchor_digits.py"} <= set(lines)
    assert "encrypt_throughput.py" not in lines


def test_benchmarks_use_only_public_ppml_api():
    offenders = []
    for path in BENCH.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bppml\._dispatch\b|from ppml\._dispatch|unavailable_reason", line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_readme_paths_to_benchmarks_exist():
    missing = sorted(
        {m for m in re.findall(r"benchmarks/[\w/]+\.(?:py|sh|md)", (ROOT / "README.md").read_text())}
        - {p.relative_to(ROOT).as_posix() for p in BENCH.rglob("*") if p.is_file()}
    )
    assert not missing, missing


def test_cli_sections_and_errors(capsys):
    assert list(throughput.SECTIONS) == ["shuffle", "mix", "anchor", "tokens"]
    assert throughput.parse_args(["--sections", "mix,anchor"]).sections == ["mix", "anchor"]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--sections", "shuffle,nope"])
    assert "unknown nope" in capsys.readouterr().err
    # Each section has a GPU companion with its own name in the results and its own targets, all for CUDA only.
    for name, section in throughput.SECTIONS.items():
        assert section.gpu is not None and section.gpu.name == f"{name}_gpu"
        assert section.gpu.targets and all(t.devices == ("cuda",) for t in section.gpu.targets)


def test_run_sections_adds_the_gpu_table_only_when_asked(monkeypatch, capsys):
    small = dict(batches=(2,), dtypes=(torch.uint8,), size=32, patch_size=8)
    gpu = dataclasses.replace(bench_mix.GPU_SECTION, run=lambda cfg: bench_mix.gpu_rows(cfg, **small))
    cpu = dataclasses.replace(
        bench_mix.SECTION,
        run=lambda cfg: bench_mix._mix_rows(cfg, bench_mix._mix_providers(), (2,), (torch.uint8,), 32, 8, 2, "mix"),
        gpu=gpu,
    )
    monkeypatch.setitem(throughput.SECTIONS, "mix", cpu)
    cfg = _cfg()
    rows, targets = throughput.run_sections(cfg, ["mix"], gpu_rows=False)
    assert list(targets) == ["mix"] and capsys.readouterr().out.count("\n## ") == 1
    rows, targets = throughput.run_sections(cfg, ["mix"], gpu_rows=True)
    out = capsys.readouterr().out
    assert out.count("\n## ") == 2 and "## mix_subpatches GPU rows [B, 3, 32, 32] p=8 g=2" in out
    assert list(targets) == ["mix", "mix_gpu"] and targets["mix_gpu"] == []  # CUDA targets do not apply on a CPU
    assert {r["section"] for r in rows} == {"mix", "mix_subpatches_gpu"}
    assert "skipped mix_subpatches/triton_weighted" in out and not cfg.notes  # notes printed under their table


def test_reps_within_budget_and_time_wall():
    assert _timing._reps_within(30, 0.001, 1.5, 5) == 30
    assert _timing._reps_within(30, 0.1, 1.5, 5) == 15
    assert _timing._reps_within(30, 0.8, 1.5, 5) == 5  # never below min_reps
    assert _timing._reps_within(30, 10.0, None, 5) == 30
    calls = []
    res = _timing.time_wall(lambda: calls.append(1), reps=7, warmup=2, inner=3)
    assert res["reps"] == 7 and len(calls) == 2 + 7 * 3
    assert 0 <= res["min_ms"] <= res["ms"]


def test_shuffle_gpu_rows_on_cpu():
    cfg = _cfg()
    rows = bench_shuffle.gpu_rows(cfg, batches=(2,), dtypes=(torch.uint8, torch.float32), size=32, patch_size=8)
    got = {(r["provider"], r["dtype"], r["B"]) for r in rows}
    for dname in ("uint8", "float32"):
        for B in (1, 2):  # B = 1 is the back-to-back latency row
            assert {(p, dname, B) for p in ("copy", "clone", "native", "native_out")} <= got
    assert not any(r["provider"] == "triton" for r in rows)
    assert any("shuffle_patches/triton" in n and "GPU only" in n for n in cfg.notes)
    by = {(r["provider"], r["dtype"], r["B"]): r for r in rows}
    for dname in ("uint8", "float32"):
        out, fresh = by[("native_out", dname, 2)], by[("native", dname, 2)]
        copy, clone = by[("copy", dname, 2)], by[("clone", dname, 2)]
        assert out["bound_provider"] == "copy" and fresh["bound_provider"] == "clone"
        assert out["share_of_bound"] == pytest.approx(copy["ms"] / out["ms"])
        assert fresh["us_above_bound"] == pytest.approx((fresh["ms"] - clone["ms"]) * 1e3)
        assert by[("native", dname, 1)]["timing"].startswith(f"events, {bench_shuffle.LATENCY_INNER} calls")
    table = _report.markdown_table(rows, bench_shuffle.GPU_SECTION)
    assert table.splitlines()[0].startswith("| provider | dtype | B | median ms | µs | bound | share of bound |")


def test_shuffle_gpu_targets_verdicts():
    # Synthetic rows (what an H200 might give): the verdicts follow the bound of each provider.
    rows = []
    for prov, ms in (("copy", 1.0), ("clone", 1.2), ("native_out", 1.1), ("native", 1.6), ("triton", 1.3)):
        rows.append({"provider": prov, "dtype": "float32", "B": 256, "ms": ms})
    bench_shuffle.derive_bound(rows, nbytes=10**9)
    lines = _harness.check_targets(bench_shuffle.GPU_SECTION.targets, rows, CUDA)
    line = {ln.split(":")[0]: ln for ln in lines}
    assert line["- native_out float32 B=256 share of copy"].endswith("(target >= 0.85) met")  # 1/1.1 = 0.91
    assert line["- native float32 B=256 share of clone"].endswith("NOT met")  # 1.2/1.6 = 0.75
    assert line["- triton float32 B=256 share of clone"].endswith("met")  # 1.2/1.3 = 0.92
    assert "n/a" in line["- native_out float32 B=1024 share of copy"]
    # On a CPU the GPU targets do not apply at all.
    assert _harness.check_targets(bench_shuffle.GPU_SECTION.targets, rows, CPU) == []


def test_mix_gpu_rows_on_cpu():
    cfg = _cfg()
    rows = bench_mix.gpu_rows(cfg, batches=(2,), dtypes=(torch.float32,), size=32, patch_size=8)
    by = {r["provider"]: r for r in rows}
    assert {"bound", "torch", "native", "native_weighted"} <= set(by)
    assert "triton_weighted" not in by and any("triton_weighted" in n for n in cfg.notes)
    for r in rows:
        assert r["share_of_bound"] == pytest.approx(by["bound"]["ms"] / r["ms"])
        assert r["speedup_vs_torch"] == pytest.approx(by["torch"]["ms"] / r["ms"])
    # The bound is the bytes moved (input + float32 output a quarter the size) at the copy's bandwidth.
    assert by["bound"]["ms"] == pytest.approx(by["bound"]["copy_ms"] * (1 + 0.25) / 2)


def test_measure_shape_wrong_result_noted_or_raised():
    cfg = _cfg()
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    wrong = _harness.Provider("wrong", lambda x: x + 1)
    kwargs = dict(
        op="shuffle_patches",
        tag="t",
        args=(x,),
        expected={"default": x}.__getitem__,
        bound=lambda: {"ms": 1.0, "min_ms": 1.0, "reps": 1},
        base_row={"section": "s", "dtype": "float32", "B": 1, "C": 1, "H": 4, "W": 4, "patch_size": 2},
    )
    with pytest.raises(_harness.BenchmarkMismatch, match="wrong differs"):
        _harness.measure_shape(cfg, runnable=[wrong], **kwargs)
    rows = _harness.measure_shape(cfg, runnable=[wrong], on_mismatch="skip", **kwargs)
    assert rows == [] and any(n.startswith("WRONG RESULT: shuffle_patches/wrong") for n in cfg.notes)


def test_anchor_gpu_rows_on_cpu_matching_precision():
    cfg = _cfg()
    rows = bench_anchor.gpu_rows(cfg, sizes=((8, 16, 5),))
    by = {(r["provider"], r["dtype"]): r for r in rows}
    assert {("eager", "float32"), ("eager", "bfloat16"), ("native", "float32"), ("native", "bfloat16")} <= set(by)
    for dname in ("float32", "bfloat16"):
        native, eager = by[("native", dname)], by[("eager", dname)]
        assert native["speedup_vs_eager"] == pytest.approx(eager["ms"] / native["ms"])
        assert eager["speedup_vs_native"] is None
    assert by[("native", "float32")]["check_rel_grad"] <= bench_anchor.ANCHOR_RTOL
    assert by[("native", "bfloat16")]["check_rel_grad"] <= bench_anchor.GPU_BF16_RTOL
    assert any("anchor_loss/triton" in n for n in cfg.notes)  # absent here: a note, not a crash


def test_anchor_gpu_rows_failing_or_wrong_backend_is_a_note(monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel in progress")

    def off(features, anchors, weight, bias, labels):
        return bench_anchor.anchor_eager(features, anchors, weight, bias, labels) * 1.5

    providers = bench_anchor._gpu_providers("cpu")[:1] + [
        bench_anchor.GpuAnchorProvider("native", torch.float32, broken),
        bench_anchor.GpuAnchorProvider("triton", torch.float32, off),
    ]
    monkeypatch.setattr(bench_anchor, "_gpu_providers", lambda device_type: providers)
    cfg = _cfg()
    rows = bench_anchor.gpu_rows(cfg, sizes=((8, 16, 5),))
    assert [r["provider"] for r in rows] == ["eager"]
    assert any("native float32" in n and "kernel in progress" in n for n in cfg.notes)
    assert any(n.startswith("WRONG RESULT: anchor_loss/triton float32") for n in cfg.notes)
    lines = _harness.check_targets(bench_anchor.GPU_SECTION.targets, rows, CUDA)
    assert lines and all("n/a" in ln for ln in lines)


def test_write_results_keeps_cpu_header(tmp_path):
    env = _timing.environment(CPU)
    cpu_row = {"section": "shuffle_patches", "provider": "copy", "dtype": "uint8", "B": 1, "ms": 1.0}
    csv_path, json_path = _report.write_results(tmp_path / "a", env, [cpu_row], {"shuffle": []}, {})
    with open(csv_path) as f:
        assert next(csv.reader(f)) == _report.CSV_FIELDS
    gpu_row = {**cpu_row, "section": "shuffle_patches_gpu", "us": 1000.0, "us_above_bound": None}
    csv_path, json_path = _report.write_results(tmp_path / "b", env, [cpu_row, gpu_row], {"shuffle_gpu": []}, {})
    with open(csv_path) as f:
        header = next(csv.reader(f))
    assert header[: len(_report.CSV_FIELDS)] == _report.CSV_FIELDS and header[len(_report.CSV_FIELDS) :] == [
        "us",
        "us_above_bound",
    ]
    assert json.loads(json_path.read_text())["targets"] == {"shuffle_gpu": []}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_rows_on_cuda_small():
    """The real path on a GPU (events, L2 flush, every backend the machine has), small shapes."""
    cfg = _cfg(CUDA)
    rows = bench_shuffle.gpu_rows(cfg, batches=(4,), dtypes=(torch.float32,), size=64, patch_size=16)
    assert {"copy", "clone", "native", "native_out"} <= {r["provider"] for r in rows}
    assert all(r["reps"] == cfg.gpu_reps and r["ms"] > 0 for r in rows)
    rows = bench_mix.gpu_rows(cfg, batches=(4,), dtypes=(torch.uint8,), size=64, patch_size=16)
    assert {"bound", "torch", "native"} <= {r["provider"] for r in rows}
    rows = bench_anchor.gpu_rows(cfg, sizes=((64, 32, 100),))
    assert {("eager", "float32"), ("eager", "bfloat16")} <= {(r["provider"], r["dtype"]) for r in rows}
    assert not [n for n in cfg.notes if n.startswith("WRONG RESULT")], cfg.notes
