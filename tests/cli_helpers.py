"""Running ``scripts/sd3_train_network.py`` from the tests, as a user runs it (a subprocess)."""
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "sd3_train_network.py"
# A tiny run: what every CLI test trains unless it says otherwise.
TINY = ["--resolution", "64", "--caption_extension", ".txt", "--network_dim", "4", "--learning_rate", "1e-3",
        "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs", "--seed", "3"]


def run_cli(args, cwd=None, timeout=600, launcher=(), env=None) -> subprocess.CompletedProcess:
    """Run the script (under ``launcher``, e.g. torchrun's module) with this interpreter."""
    command = [sys.executable, *launcher, str(SCRIPT), *[str(a) for a in args]]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result``, asserting it succeeded (its output tail in the message otherwise)."""
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def lora(path) -> dict:
    return load_file(str(path))
