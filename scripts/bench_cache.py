"""Caching benchmark (not a test): encode N small generated images with the real host's VAE and
CLIP of a tiny SD3 checkpoint, then run again over the unchanged data, and print images/s of
both runs (the second one only hashes files and reads the cache).

    .venv/bin/python scripts/bench_cache.py [--images 1000] [--captions 20] [--cache disk|memory]

Captions cycle through ``--captions`` distinct texts: a CPU runs the full-size CLIP-L for seconds
per caption, and this measures the cache, not CLIP.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# The host ($COMFYUI_DIR or .host/) on sys.path in CPU mode, the repository as sd3_lora_trainer.
import conftest  # noqa: E402,F401
import torch  # noqa: E402

import comfy.sd  # noqa: E402
import sd3_fixtures  # noqa: E402
from sd3_lora_trainer.trainer import latent_cache  # noqa: E402
from sd3_lora_trainer.trainer.data import Subset  # noqa: E402
from sd3_lora_trainer.trainer.dataset import DatasetOptions, build_group, folder_subsets  # noqa: E402
from sd3_lora_trainer.trainer.encode import Encoders, encode_training_data  # noqa: E402
from sd3_lora_trainer.trainer.training_data import CacheOptions, TrainingData  # noqa: E402


def encoders(model, clip, vae) -> Encoders:
    """The host's VAE and CLIP as the trainer calls them (what nodes/host.py passes)."""
    def encode_image(image):
        return model.model.latent_format.process_in(vae.encode(image.clone()).float())

    def encode_text(caption):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        return cond.float(), pooled.float()
    return Encoders(encode_image, encode_text, "bench-vae", "bench-te")


def run(folder: Path, cache: str, resolution: int, enc: Encoders):
    """One pass: scan the folder, build buckets, encode or read every image; returns (seconds, stats)."""
    t0 = time.perf_counter()
    subsets, warnings = folder_subsets(str(folder), Subset())
    group = build_group(DatasetOptions(resolution=(resolution, resolution)), subsets, warnings)
    data = TrainingData([group], str(folder), CacheOptions(cache, cache), warnings=warnings)
    with torch.inference_mode(False), torch.no_grad():
        _, stats = encode_training_data(data, enc)
    return time.perf_counter() - t0, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--cache", choices=("disk", "memory"), default="disk")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--captions", type=int, default=20, help="distinct captions")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        ckpt = sd3_fixtures.cached_checkpoint(ROOT / ".cache" / "fixtures", variant="3.5-medium", depth=2, seed=0,
                                              clip="full", vae="taesd")
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
        sd3_fixtures.write_dataset(work / "images", n=args.images, seed=0, sizes=[(64, 48), (48, 64), (56, 56)])
        for i, caption in enumerate(sorted((work / "images").glob("*.txt"))):
            caption.write_text(f"a generated picture, variant {i % args.captions}")
        enc = encoders(model, clip, vae)
        first, s1 = run(work / "images", args.cache, args.resolution, enc)
        if args.cache == "disk":
            latent_cache.clear_memory()  # as after a restart: only the files remain
        second, s2 = run(work / "images", args.cache, args.resolution, enc)
        n = args.images
        print(f"{n} images, cache={args.cache}, resolution={args.resolution}")
        print(f"first run : {n / first:8.1f} images/s  ({first:.1f} s; {s1})")
        print(f"second run: {n / second:8.1f} images/s  ({second:.1f} s; {s2})")
        print(f"speed-up  : {first / second:8.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
