"""The benchmark and GPU-check scripts still run, at toy sizes on the CPU.

Not benchmarks themselves (nothing here looks at a time): ``scripts/gpu_check.sh`` can only be
run where a GPU is lent, so a script that broke since would only show there, on borrowed time.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, timeout: int = 300) -> str:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         cwd=BENCH.parent, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _table_rows(text: str) -> dict:
    """First column -> the other cells, for every markdown table row that is not a header."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= set("-") and cells[0] not in ("run", "contestant"):
            rows[cells[0] + (f"|{cells[1]}|{cells[2]}" if len(cells) > 3 and cells[1].isdigit() else "")] = cells
    return rows


def test_gpu_check_dry_run_runs_every_case():
    # 256 px, not the GPU run's 1024: the dry run is bf16 like the GPU run, and on a CPU without
    # native bf16 (about 1 GFLOP/s) 4096-token attention alone would take minutes.
    text = _run("gpu_check.py", "--dry-run", "--resolution", "256")
    rows = _table_rows(text)
    names = {"large: ours", "large: host TrainLoraNode mechanism", "large: ours, capped at 24 GB",
             "medium: ours", "medium: host TrainLoraNode mechanism"}
    assert names <= set(rows), text
    assert any("blocks_to_swap" in n for n in rows), text
    for name, cells in rows.items():
        assert cells[3] == "ok", f"{name}: {cells}"
        assert float(cells[1]) > 0


def test_step_benchmark_prints_its_table_and_ratio():
    """The table and ratio lines cover exactly the precisions the benchmark found native here."""
    only = "ours|1|,host TrainLoraNode mechanism|1|,diffusers+PEFT|1|,cast once,fused AdamW,split_qkv"
    text = _run("bench_step.py", "--depth", "2", "--rounds", "1", "--batches", "1", "--only", only)
    native = re.search(r"^native precisions: ([a-z0-9, ]+) \(", text, re.M)
    assert native, text
    dtypes = native.group(1).split(", ")
    assert dtypes[0] == "fp32" and set(dtypes) <= {"fp32", "bf16"}, dtypes
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert dtypes == ["fp32"], "oneDNN has no bf16 kernels on this CPU, yet bf16 was measured as native"
    assert re.search(rf"^{dtypes[-1]} matmul peak measured in this run: \d+ GFLOP/s$", text, re.M), text
    rows = _table_rows(text)
    assert {k.split("|")[2] for k in rows} == set(dtypes), rows.keys()
    levers = ["ours − fused AdamW"] + (["ours − cast once (autocast casts per call)"] if "bf16" in dtypes else [])
    for dt in dtypes:
        for name in ["ours", "host TrainLoraNode mechanism", "diffusers+PEFT"] + (levers if dt == dtypes[-1] else []):
            cells = rows[f"{name}|1|{dt}"]
            seconds, flops = float(cells[3]), float(cells[7])
            assert seconds > 0 and flops > 0, cells
    lines = text.strip().splitlines()
    for dt in dtypes:
        host = [line for line in lines if line.startswith(f"ratio_vs_native_{dt}=")]
        assert len(host) == 1 and re.fullmatch(rf"ratio_vs_native_{dt}=\d+\.\d+", host[0]), lines[-6:]
        assert float(host[0].split("=")[1]) == pytest.approx(float(rows[f"ours|1|{dt}"][4]), abs=0.006)  # "vs host"
        best = [line for line in lines if line.startswith(f"ratio_vs_best_peer_{dt}=")]
        assert len(best) == 1, lines[-6:]
        peers = min(float(rows[f"{p}|1|{dt}"][3]) for p in ("host TrainLoraNode mechanism", "diffusers+PEFT"))
        expected = float(rows[f"ours|1|{dt}"][3]) / peers
        assert float(best[0].split("=")[1].split()[0]) == pytest.approx(expected, rel=0.05)  # s/step has 3 decimals
        # One round: its own ratio is the whole round-by-round range.
        spread = re.search(r"round by round: batch 1 (\d+\.\d+)-(\d+\.\d+)\)$", best[0])
        assert spread, best[0]
        assert float(spread.group(1)) == float(spread.group(2)) == pytest.approx(expected, abs=0.006 + 0.05 * expected)
    assert lines[-1].startswith(f"ratio_vs_best_peer_{dtypes[-1]}="), lines[-1]


def test_round_ratio_spread_pairs_each_round_with_the_faster_peer():
    """The range is ours ÷ the faster peer (by median) round by round, lowest first; the one-round
    benchmark run above cannot tell a wrong peer or a swapped range apart."""
    code = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bench_step import round_ratio_spread
steps = {"ours|1|fp32": [1.0, 3.0, 2.0], "diffusers+PEFT|1|fp32": [2.0, 2.0, 2.0],
         "host TrainLoraNode mechanism|1|fp32": [5.0, 4.0, 6.0]}
results = {k: [{"s": s} for s in v] for k, v in steps.items()}
med = {k: sorted(v)[1] for k, v in steps.items()}
print(json.dumps(round_ratio_spread(results, med, "fp32")))
"""
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True,
                         cwd=BENCH.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"1": [0.5, 1.5]}


def test_memory_benchmark_prints_its_ratio():
    text = _run("bench_memory.py", "--depth", "2", "--resolution", "128", "--steps", "1", "--tensor-peak",
                "--sdpa", "--set", "full_bf16=true")
    assert "full_bf16, SDPA" in text
    assert "live tensors at the step's peak" in text
    ratio = re.search(r"^peak_rss_vs_bf16_weights=(\d+\.\d+)$", text, re.M)
    assert ratio and float(ratio.group(1)) > 0, text
    imports = re.search(r"^RSS after imports (\d+) MB \((\d+) MB of it file-backed library pages", text, re.M)
    assert imports and 0 < int(imports.group(2)) < int(imports.group(1)), text
