"""The command line trains what the nodes train: a CLI run, its --write_workflow run through
scripts/run_workflow.py on a real server, and the Save node's <name>.toml run again from the
command line give the same LoRA, bitwise (CPU, fp32); and sd-scripts' SD3 guide command runs."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sd3_fixtures
from cli_helpers import REPO_ROOT, TINY, checked, lora, run_cli

GUIDE_DATASET = '[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 64\nbatch_size = 1\n\n' \
                '[[datasets.subsets]]\nimage_dir = "images"\nnum_repeats = 1\n'


def _same_lora(a: Path, b: Path) -> None:
    ta, tb = lora(a), lora(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.slow
def test_cli_workflow_and_save_toml_train_the_same_lora(comfy_server, pack, base_dir, sd35m_checkpoint, tmp_path):
    ckpt = base_dir / "models" / "checkpoints" / sd35m_checkpoint
    dataset_dir = sd3_fixtures.write_dataset(tmp_path / "data", n=4, seed=2)
    (tmp_path / "prompts.txt").write_text("a red circle --s 2 --d 5\n")
    argv = ["--pretrained_model_name_or_path", ckpt, "--train_data_dir", dataset_dir, *TINY, "--max_train_steps", "3",
            "--output_name", "cli_eq", "--sample_prompts", tmp_path / "prompts.txt", "--sample_every_n_steps", "2"]
    # --write_workflow through the entry point in-process (it loads no model; a script start less).
    main = importlib.import_module(f"{pack.__name__}.cli.main").main
    assert main([*map(str, argv), "--output_dir", str(tmp_path / "cli"), "--write_workflow", str(tmp_path / "wf.json")]) == 0
    checked(run_cli([*argv, "--output_dir", tmp_path / "cli", "--log_with", "tensorboard",
                     "--logging_dir", tmp_path / "logs"]))
    out = tmp_path / "cli"
    assert {"cli_eq.safetensors", "cli_eq.loss.json", "cli_eq.workflow.json", "cli_eq.toml"} <= {p.name for p in out.iterdir()}

    # The workflow runs on a real server (the pack in its custom_nodes) to the same LoRA.
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "run_workflow.py"), str(tmp_path / "wf.json"),
                             "--url", comfy_server.url], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    served = base_dir / "output"
    _same_lora(out / "cli_eq.safetensors", served / "cli_eq.safetensors")
    assert json.loads((out / "cli_eq.loss.json").read_text()) == json.loads((served / "cli_eq.loss.json").read_text())

    # The Save node's <name>.toml reproduces the run from the command line.
    checked(run_cli(["--config_file", served / "cli_eq.toml", "--output_dir", tmp_path / "again"]))
    _same_lora(out / "cli_eq.safetensors", tmp_path / "again" / "cli_eq.safetensors")

    # Samples as the nodes make them (with the workflow in the PNG), and TensorBoard's loss curve.
    samples = sorted((out / "sample").glob("cli_eq_step000002_*.png"))
    assert samples and "workflow" in Image.open(samples[0]).info
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").glob("*/network_train")))).Reload()
    logged = [e.value for e in events.Scalars("loss/current")]
    assert logged == pytest.approx(json.loads((out / "cli_eq.loss.json").read_text())["loss"], rel=1e-6)


@pytest.mark.slow
def test_the_sd3_guide_command_runs(sd35m_checkpoint, base_dir, dataset_dir, tmp_path):
    """sd-scripts' docs/sd3_train_network.md example, under accelerate launch, with only the script's
    path changed and its placeholders filled (the text encoders "": the checkpoint's own, as there).
    blocks_to_swap 32 is turned off on the CPU; 10 epochs of 1 image save 9 epoch files."""
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(dataset_dir.glob("img_000.*")):
        (images / p.name).write_bytes(p.read_bytes())
    (tmp_path / "my_sd3_dataset_config.toml").write_text(GUIDE_DATASET)
    ckpt = base_dir / "models" / "checkpoints" / sd35m_checkpoint
    command = [
        f'--pretrained_model_name_or_path={ckpt}', '--clip_l=', '--clip_g=', '--t5xxl=',
        '--dataset_config=my_sd3_dataset_config.toml', '--output_dir=out', '--output_name=my_sd3_lora',
        '--save_model_as=safetensors', '--network_module=networks.lora', '--network_dim=16', '--network_alpha=1',
        '--learning_rate=1e-4', '--optimizer_type=AdamW8bit', '--lr_scheduler=constant', '--sdpa',
        '--max_train_epochs=10', '--save_every_n_epochs=1', '--mixed_precision=fp16', '--gradient_checkpointing',
        '--weighting_scheme=sigma_sqrt', '--blocks_to_swap=32']
    checked(run_cli(command, cwd=tmp_path, timeout=900,
                    launcher=("-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1")))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("my_sd3_lora-*.safetensors")) == \
        [f"my_sd3_lora-{e:06d}.safetensors" for e in range(1, 10)]
    tensors = lora(out / "my_sd3_lora.safetensors")
    assert any(k.startswith("lora_te1_") for k in tensors)  # sd-scripts trains the text encoders by default
    assert json.loads((out / "my_sd3_lora.loss.json").read_text())["step"] == 10
