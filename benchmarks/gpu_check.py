"""GPU check: SD3.5-Large- and SD3.5-Medium-shaped random models at 1024 px on one CUDA device.

Ours (frozen weights bf16, bf16 autocast, LoRA rank 16, gradient checkpointing) vs the host's
TrainLoraNode mechanism (weight-wrapper adapters on every weight, bf16 training dtype, its own
gradient checkpointing, its default), s/it and peak VRAM (torch.cuda.max_memory_allocated);
ours again with blocks_to_swap (and, with --with-compile, Medium with torch_compile), and the Large model capped at 24 GB
(torch.cuda.set_per_process_memory_fraction). Needs nothing from the internet; sized for < 8 min
on one H200. ``--dry-run`` checks arguments and builds the tiny-depth models on the CPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_env  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU: parse, build depth-2 models, one step each")
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (after one warm-up step)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--models", default="large,medium", help="comma-separated: large, medium")
    p.add_argument("--blocks-to-swap", type=int, default=16, help="N for the blocks_to_swap runs (Large; half for Medium)")
    p.add_argument("--cap-gb", type=float, default=24.0, help="per-process VRAM cap of the capped run")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--with-compile", action="store_true", help="also Medium with torch_compile (compiling "
                   "adds a minute or two, beyond the 8-minute budget of the default runs)")
    return p.parse_args(argv)


def runs(args):
    """(label, shape name, contestant, blocks_to_swap, cap GB or None) of every run, cheapest first."""
    out = []
    for name in args.models.split(","):
        swap = args.blocks_to_swap if name == "large" else args.blocks_to_swap // 2
        out += [(f"{name}: ours", name, "ours", 0, None),
                (f"{name}: ours + blocks_to_swap {swap}", name, "ours", swap, None),
                (f"{name}: host TrainLoraNode mechanism", name, "host", 0, None)]
        if name == "medium" and args.with_compile:  # compiled in the untimed warm-up step
            out.append(("medium: ours + torch_compile", name, "ours_compiled", 0, None))
        if name == "large":
            out += [(f"large: ours, capped at {args.cap_gb:g} GB", name, "ours", 0, args.cap_gb),
                    (f"large: ours + blocks_to_swap {swap}, capped at {args.cap_gb:g} GB", name, "ours", swap, args.cap_gb)]
    return out


def build(name: str, contestant: str, swap: int, args, device, dry: bool):
    """A runnable step for one run: the model in bf16 on ``device`` and the contestant around it."""
    import torch

    import contestants as C
    from models import Shape, host_mmdit, host_model_patcher

    latent = args.resolution // 8
    shape = Shape.sd35_large(pos_max=latent // 2) if name == "large" else Shape.sd35_medium(pos_max=latent // 2)
    if dry:
        shape = Shape(2, shape.qk_norm, (0,) if shape.attn2_layers else (), shape.pos_max)
    inputs = C.make_inputs(n=1, latent_size=latent, device=device)
    if contestant.startswith("ours"):
        mmdit = host_mmdit(shape, torch.bfloat16, device=device)
        # The trainer's own blocks_to_swap and gradient checkpointing, as a user sets them.
        return C.Ours(mmdit, inputs, 1, True, args.rank, torch.bfloat16, gradient_checkpointing=True,
                      blocks_to_swap=min(swap, len(mmdit.joint_blocks) - 2),
                      torch_compile=contestant == "ours_compiled"), mmdit
    ref = host_mmdit(shape, torch.bfloat16, device=device)
    mp = host_model_patcher(ref.state_dict(), torch.bfloat16)
    del ref
    # The node's defaults: lora_dtype bf16, gradient_checkpointing on.
    return C.HostWeightWrappers(mp, inputs, 1, True, args.rank, lora_dtype=torch.bfloat16, checkpointing=True,
                                device=device), mp.model.diffusion_model


def measure_run(label, name, contestant, swap, cap, args, device, dry):
    """Build, warm up, time ``args.steps`` steps; returns a result row (or the error it hit)."""
    import torch

    import measure
    from sd3_lora_trainer.trainer.offload import BlockSwapper, Mover

    cuda = device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total) if cap else 1.0, device)
    swapper = None
    try:
        c, mmdit = build(name, contestant, swap, args, device, dry)
        if swap and contestant == "host":  # the joint blocks' frozen weights go to (pinned) CPU memory
            swapper = BlockSwapper(mmdit.joint_blocks, min(swap, len(mmdit.joint_blocks) - 2), Mover(device)).install()
        if cuda:  # the peak of the training steps, not of building the model
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with measure.run_of(c):  # ours: the LoRA attached and blocks_to_swap installed for the run
            c.step()  # warm-up (allocations, kernels, optimiser state)
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(1 if dry else args.steps):
                c.step()
            if cuda:
                torch.cuda.synchronize(device)
            s_it = (time.perf_counter() - t0) / (1 if dry else args.steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        return f"| {label} | {s_it:.2f} | {peak:.1f} | ok |"
    except torch.OutOfMemoryError as e:
        return f"| {label} | - | - | out of memory ({str(e).splitlines()[0][:80]}) |"
    finally:
        if swapper is not None:
            swapper.remove()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    host_env.setup(cpu=args.dry_run)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:  # PyTorch attention, as the host picks on NVIDIA GPUs (its CPU default cannot be
        import comfy.ldm.modules.attention as attention  # compiled with checkpointing: nodes/host.py)
        import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module

        mmdit_module.optimized_attention = attention.attention_pytorch
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (dry run, depth 2)'}, "
          f"torch {torch.__version__}, {args.resolution} px, rank {args.rank}, bf16", flush=True)
    print("| run | s/it | peak VRAM GiB (max_memory_allocated) | status |")
    print("|---|---|---|---|")
    for run in runs(args):
        t0 = time.perf_counter()
        print(measure_run(*run, args, device, args.dry_run), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
