"""Test set-up: the real ComfyUI host (installed by scripts/setup.sh) and this pack.

The host is ``$COMFYUI_DIR`` when set (``scripts/test.sh`` sets it), else the ComfyUI 0.3.75 tree
that set-up unpacks into ``.host/`` (``headless/hosts.py``).

The pack is imported as a package named ``sd3_lora_trainer`` from a temporary ComfyUI
base directory whose ``custom_nodes/`` holds a symlink to the repository, exactly as a
user installs it. Nothing of the host is faked.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the repository's nodes/ package must not shadow the host's nodes.py.
sys.path.append(str(REPO_ROOT))
from headless import hosts  # noqa: E402

HOST_DIR = hosts.host_dir()
PACK_NAME = "sd3_lora_trainer"
hosts.check_host_dir(HOST_DIR)

# The host must be importable, and must run on the CPU (a CPU torch asserts otherwise).
sys.path.insert(0, str(HOST_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# A stable package name for the repository (its folder name varies between clones).
_PKG_DIR = REPO_ROOT / ".cache" / "pkg"
_PKG_DIR.mkdir(parents=True, exist_ok=True)
if not (_PKG_DIR / PACK_NAME).exists():
    (_PKG_DIR / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
sys.path.insert(0, str(_PKG_DIR))
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True


def pytest_report_header(config):
    """The host and torch this run tests, first thing in the output."""
    return (f"ComfyUI {hosts.host_version(HOST_DIR)} at {HOST_DIR}; torch {torch.__version__} "
            f"({sys.executable}); CPU capability {torch.backends.cpu.get_cpu_capability()}")


def make_base_dir(base: Path) -> Path:
    """A ComfyUI base directory (models/, input/, output/, custom_nodes/) with this pack linked in."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "models/vae", "models/text_encoders",
                "models/diffusion_models", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return base


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """One ComfyUI base directory shared by the whole test session."""
    return make_base_dir(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def host(base_dir):
    """The real host, imported in-process, with folder_paths pointed at ``base_dir``.

    Returns the host's ``nodes`` module (stock node classes in NODE_CLASS_MAPPINGS,
    this pack's registered beside them by the host's own custom-node loader).
    """
    import asyncio

    import folder_paths

    folder_paths.set_output_directory(str(base_dir / "output"))
    folder_paths.set_input_directory(str(base_dir / "input"))
    folder_paths.set_temp_directory(str(base_dir / "temp"))
    for kind in ("checkpoints", "loras", "vae", "text_encoders", "diffusion_models"):
        folder_paths.add_model_folder_path(kind, str(base_dir / "models" / kind), is_default=True)
    sys.path.insert(0, str(base_dir / "custom_nodes"))
    import nodes

    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(base_dir / "custom_nodes")], set())
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes


@pytest.fixture(scope="session")
def pack(host):
    """This pack's package module, as the host's custom-node loader imported it."""
    train_module = host.NODE_CLASS_MAPPINGS["SD3LoraTrain"].__module__
    return sys.modules[train_module.rsplit(".nodes.", 1)[0]]


from server_fixture import comfy_server  # noqa: E402,F401  (session fixture: a real headless server)

import sd3_fixtures  # noqa: E402

FIXTURE_CACHE = REPO_ROOT / ".cache" / "fixtures"


def install_checkpoint(base_dir: Path, name: str, **kwargs) -> str:
    """Generate (once, cached) an SD3-family checkpoint and link it into base_dir/models/checkpoints."""
    src = sd3_fixtures.cached_checkpoint(FIXTURE_CACHE, **kwargs)
    dst = base_dir / "models" / "checkpoints" / name
    if not dst.exists():
        dst.symlink_to(src)
    return name


@pytest.fixture(scope="session")
def N(host):
    """The host's node classes (stock and this pack's) by name."""
    return host.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def loaded(N, sd35m_checkpoint):
    """(MODEL, CLIP, VAE) of the SD3.5-Medium-shaped fixture through the stock CheckpointLoaderSimple."""
    with torch.inference_mode():
        return N["CheckpointLoaderSimple"]().load_checkpoint(sd35m_checkpoint)[:3]


@pytest.fixture(scope="session")
def sd35m_checkpoint(base_dir) -> str:
    """SD3.5-Medium-shaped (qk_norm, attn2 in block 0), full CLIP-L, TAESD VAE: stock-loader ready."""
    return install_checkpoint(base_dir, "tiny_sd35m.safetensors", variant="3.5-medium", depth=2, seed=0,
                              clip="full", vae="taesd")


@pytest.fixture(scope="session")
def sd3m_checkpoint(base_dir) -> str:
    """SD3-Medium-shaped (no qk_norm, no attn2), full CLIP-L, TAESD VAE."""
    return install_checkpoint(base_dir, "tiny_sd3m.safetensors", variant="medium", depth=2, seed=1,
                              clip="full", vae="taesd")


@pytest.fixture(scope="session")
def dataset_dir(base_dir) -> Path:
    """Eight generated captioned images of mixed sizes, in base_dir/input/tiny_dataset."""
    path = base_dir / "input" / "tiny_dataset"
    if not path.exists():
        sd3_fixtures.write_dataset(path, n=8, seed=0)
    return path
