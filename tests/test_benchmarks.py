"""The benchmark and GPU-check scripts still run, at toy sizes on the CPU.

Not benchmarks themselves (nothing here looks at a time): ``scripts/gpu_check.sh`` can only be
run where a GPU is lent, so a script that broke since would only show there, on borrowed time.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    text = _run("gpu_check.py", "--dry-run")
    rows = _table_rows(text)
    names = {"large: ours", "large: host TrainLoraNode mechanism", "large: ours, capped at 24 GB",
             "medium: ours", "medium: host TrainLoraNode mechanism"}
    assert names <= set(rows), text
    assert any("blocks_to_swap" in n for n in rows), text
    for name, cells in rows.items():
        assert cells[3] == "ok", f"{name}: {cells}"
        assert float(cells[1]) > 0


def test_step_benchmark_prints_its_table_and_ratio():
    only = "ours|1|bf16,host TrainLoraNode mechanism|1|bf16,diffusers+PEFT|1|bf16,cast once,fused AdamW,split_qkv"
    text = _run("bench_step.py", "--depth", "2", "--rounds", "1", "--batches", "1", "--only", only)
    rows = _table_rows(text)
    for name in ("ours|1|bf16", "host TrainLoraNode mechanism|1|bf16", "diffusers+PEFT|1|bf16",
                 "ours − cast once (autocast casts per call)|1|bf16"):
        cells = rows[name]
        seconds, flops = float(cells[3]), float(cells[7])
        assert seconds > 0 and flops > 0, cells
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio_vs_native_bf16=\d+\.\d+", last), last
    assert float(last.split("=")[1]) == pytest.approx(float(rows["ours|1|bf16"][4]), abs=0.006)  # "vs host"


def test_memory_benchmark_prints_its_ratio():
    text = _run("bench_memory.py", "--depth", "2", "--resolution", "128", "--steps", "1", "--tensor-peak",
                "--sdpa", "--set", "full_bf16=true")
    assert "full_bf16, SDPA" in text
    assert "live tensors at the step's peak" in text
    ratio = re.search(r"^peak_rss_vs_bf16_weights=(\d+\.\d+)$", text, re.M)
    assert ratio and float(ratio.group(1)) > 0, text
