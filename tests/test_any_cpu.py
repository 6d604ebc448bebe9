"""CPUs without native bf16: the trainer measures it, warns on the node and in the log, and trains.

Some machines are Intel Xeons with AMX (a bf16 matmul ~10x faster than fp32), others AMD EPYCs
without AVX-512 bf16 (~100x slower). On any machine, limiting oneDNN to AVX2 gives the second
kind's bf16 matmuls (``FORCED_AVX2``), so both paths run wherever the suite runs.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headless

REPO_ROOT = Path(__file__).resolve().parents[1]
# oneDNN (which runs bf16 and fp16 matmuls on the CPU) limited to AVX2, as on those AMD CPUs.
FORCED_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}

PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("precision", sys.argv[1])
precision = importlib.util.module_from_spec(spec)
spec.loader.exec_module(precision)
import torch
print(json.dumps({"slowdown": precision.matmul_slowdown(torch.bfloat16),
                  "native": precision.is_native(torch.bfloat16),
                  "bf16": precision.precision_warning("bf16", "cpu"),
                  "fp16": precision.precision_warning("fp16", "cpu"),
                  "no": precision.precision_warning("no", "cpu")}))
"""


def _probe(env: dict) -> dict:
    import os
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO_ROOT / "trainer" / "precision.py")],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_finds_no_native_bf16_on_an_avx2_cpu():
    found = _probe(FORCED_AVX2)
    assert found["slowdown"] > 5 and not found["native"], found
    for mixed in ("bf16", "fp16"):
        warning = found[mixed]
        assert warning.startswith(f"mixed_precision {mixed}: this CPU has no native {mixed} matmul"), warning
        assert "x slower than in fp32" in warning and "set mixed_precision to no" in warning, warning
    assert found["no"] is None


def test_probe_agrees_with_onednn_here(pack):
    """Where oneDNN has no bf16 kernels torch falls back to a scalar loop: the probe must see it slow."""
    from sd3_lora_trainer.trainer.precision import is_native, precision_warning
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not is_native(torch.bfloat16)
    assert (precision_warning("bf16", "cpu") is None) == is_native(torch.bfloat16)
    assert precision_warning("no", "cpu") is None


@pytest.mark.slow
def test_bf16_without_native_support_warns_on_the_node_and_in_the_log_and_trains(
        base_dir, sd35m_checkpoint, dataset_dir, tmp_path):
    """A server on an AVX2-only CPU: a bf16 run trains, and says why it is slow and what to set."""
    workflow = json.loads((REPO_ROOT / "example_workflows" / "train_and_preview.json").read_text())
    log_path = tmp_path / "avx2_server.log"
    with headless.start_server(base_dir, log_path=log_path, timeout=180, env=FORCED_AVX2) as server:
        info = headless.get_object_info(server.url)
        prompt = headless.apply_overrides(
            headless.editor_to_api(workflow, info),
            [f"CheckpointLoaderSimple.ckpt_name={sd35m_checkpoint}", "SD3LoraImageFolder.folder=tiny_dataset",
             "SD3LoraSettings.mixed_precision=bf16", "SD3LoraTrain.steps=2", "SD3LoraSave.output_name=avx2_bf16",
             "KSampler.steps=1", "SD3LoraImageFolder.resolution=256", "EmptySD3LatentImage.width=256",
             "EmptySD3LatentImage.height=256"], info)  # small: bf16 is ~100x slower on such a CPU
        entry = headless.run_prompt(server.url, prompt, timeout=600)
    assert entry["status"]["status_str"] == "success"
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "SD3LoraTrain")
    summary = entry["outputs"][train_id]["text"][0]
    assert summary.startswith("warning: mixed_precision bf16: this CPU has no native bf16 matmul"), summary
    assert "set mixed_precision to no" in summary and "trained steps 1-2" in summary, summary
    log = log_path.read_text()
    assert "SD3 LoRA train: mixed_precision bf16: this CPU has no native bf16 matmul" in log, log[-3000:]
    assert (base_dir / "models" / "loras" / "avx2_bf16.safetensors").exists()
