"""Write the demo's tiny SD3 checkpoint and captioned dataset, if they are absent.

    python scripts/make_demo_assets.py --checkpoint OUT.safetensors --dataset OUTDIR [--variant 3.5-medium]

The checkpoint is a depth-2 SD3-family model with random weights, a full-size random CLIP-L
(what the stock CheckpointLoaderSimple needs) and a small 16-channel TAESD VAE: it loads and
trains in seconds on a CPU, and its samples are noise-like until a LoRA has learned something.
The generators live in tests/sd3_fixtures.py (shared with the test suite).
"""
import argparse
import sys
import time
from pathlib import Path

# The generators are in the repository's tests/ folder; import them by path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sd3_fixtures  # noqa: E402

DEMO_IMAGES = 8


def make_checkpoint(path: Path, variant: str, seed: int) -> bool:
    """Write the demo checkpoint unless ``path`` exists. Returns whether it wrote one."""
    if path.exists():
        return False
    sd3_fixtures.write_sd3_checkpoint(path, variant=variant, depth=2, seed=seed, clip="full", vae="taesd")
    return True


def make_dataset(dirpath: Path, seed: int) -> bool:
    """Write the demo dataset unless ``dirpath`` already holds files. Returns whether it wrote one."""
    if dirpath.is_dir() and any(dirpath.iterdir()):
        return False
    sd3_fixtures.write_dataset(dirpath, n=DEMO_IMAGES, seed=seed)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="output .safetensors checkpoint path")
    parser.add_argument("--dataset", type=Path, required=True, help="output folder of images + .txt captions")
    parser.add_argument("--variant", default="3.5-medium", choices=sd3_fixtures.VARIANTS,
                        help="SD3 family member to imitate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and images (default: %(default)s)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    wrote = make_checkpoint(args.checkpoint, args.variant, args.seed)
    print(f"checkpoint {'written' if wrote else 'already present'}: {args.checkpoint}")
    wrote = make_dataset(args.dataset, args.seed)
    print(f"dataset {'written' if wrote else 'already present'}: {args.dataset}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
