"""Memory benchmark: an SD3.5-Medium-shaped model (depth 24, qk_norm, attn2 in blocks 0-12, about
2.5 B parameters) trains a rank-16 LoRA at 512 px with gradient checkpointing; prints peak RSS
against the bf16 size of the frozen weights.

The frozen weights are stored in bf16 (built that way through the host's MMDiT class; a user gets
this by loading a bf16 checkpoint with a bf16 weight dtype). Peak RSS is the kernel's VmHWM of this
whole process (Python, torch, the host's modules included), reset after the model is built, so it
covers the training steps only. Run in its own process: ``bash scripts/bench.sh --memory``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_env  # noqa: E402

host_env.setup(cpu=True)

import torch  # noqa: E402

import measure  # noqa: E402
from contestants import make_inputs  # noqa: E402
from models import Shape, count_params, host_mmdit, to_fp8_base  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=24, help="joint blocks (24 = SD3.5 Medium)")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (latent side = /8)")
    p.add_argument("--steps", type=int, default=2, help="training steps measured (the second has the "
                   "optimiser state of the first resident)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--fp8-base", action="store_true", help="joint-block Linear weights stored in float8 "
                   "(fp8_base); the ratio stays against the bf16 size")
    p.add_argument("--sdpa", action="store_true", help="PyTorch SDPA attention instead of the host's CPU default")
    p.add_argument("--tensor-peak", action="store_true", help="profile one more step: live torch tensors at "
                   "its peak, by category (what the trainer holds, without allocator and library overhead)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further TrainConfig setting, e.g. --set optimizer_type=AdamW8bit --set full_bf16=true")
    return p.parse_args(argv)


def config_overrides(pairs):
    """``KEY=VALUE`` strings as TrainConfig keyword arguments, converted to each field's type."""
    from sd3_lora_trainer.trainer.config import TrainConfig

    defaults, out = TrainConfig(), {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in TrainConfig.__dataclass_fields__:
            raise SystemExit(f"--set {pair}: TrainConfig has no setting {key!r}")
        kind = type(getattr(defaults, key))
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value) if kind in (int, float) else value
    return out


def main(argv=None) -> None:
    from sd3_lora_trainer.trainer.batches import EncodedData
    from sd3_lora_trainer.trainer.config import TrainConfig
    from sd3_lora_trainer.trainer.loop import train
    from sd3_lora_trainer.trainer.state import build_network, new_train_state

    args = parse_args(argv)
    latent = args.resolution // 8
    base = Shape.sd35_medium(pos_max=max(32, latent // 2))
    shape = Shape(args.depth, base.qk_norm, tuple(i for i in base.attn2_layers if i < args.depth), base.pos_max)
    rss_imports, file_imports = measure.rss_mb(), measure.rss_file_mb()
    t0 = time.perf_counter()
    mmdit = host_mmdit(shape, torch.bfloat16, manual_cast=args.fp8_base)
    n_params = count_params(mmdit)
    weights_mb = sum(p.numel() * 2 for p in mmdit.state_dict().values()) / 2**20  # their bf16 size
    if args.fp8_base:
        to_fp8_base(mmdit)
        measure.trim_heap()
    print(f"built depth {args.depth} SD3.5-Medium-shaped MMDiT: {n_params / 1e9:.2f} B params, "
          f"{weights_mb:.0f} MB in bf16 ({time.perf_counter() - t0:.0f} s)", flush=True)

    ckpt = not args.no_checkpointing
    fields = TrainConfig.__dataclass_fields__
    extra = {"gradient_checkpointing": ckpt} if "gradient_checkpointing" in fields else {}
    extra.update(config_overrides(args.set))
    if args.fp8_base:
        extra["fp8_base"] = True
    cfg = TrainConfig(network_dim=args.rank, network_alpha=float(args.rank), mixed_precision="bf16", **extra).validate()
    if args.sdpa:
        import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_mod
        from comfy.ldm.modules.attention import attention_pytorch

        mmdit_mod.optimized_attention = attention_pytorch
    if not extra:  # a trainer without the switch: use the host MMDiT's own checkpointing directly
        mmdit.use_checkpoint = ckpt
    inputs = make_inputs(n=1, latent_size=latent)
    data = EncodedData(inputs.latents, inputs.context, inputs.pooled)
    state = new_train_state(cfg, build_network(mmdit, cfg))
    measure.trim_heap()  # free heap left from building the model is not the training's memory
    rss_built = measure.rss_mb()
    measure.reset_peak_rss()
    t0 = time.perf_counter()
    train(mmdit, data, state, args.steps, compute_dtype=torch.bfloat16)
    seconds = (time.perf_counter() - t0) / args.steps
    peak = measure.peak_rss_mb()
    print(f"resolution {args.resolution} px ({(latent // 2) ** 2} image + 333 text tokens), rank {args.rank}, "
          f"gradient checkpointing {'on' if ckpt else 'off'}, bf16 autocast, "
          f"frozen weights {'float8 (joint blocks)' if args.fp8_base else 'bf16'}, "
          f"{cfg.optimizer_type}{', full_bf16' if cfg.full_bf16 else ''}{', SDPA' if args.sdpa else ''}, "
          f"{seconds:.1f} s/step, loss {state.losses[-1]:.4f}")
    print(f"RSS after imports {rss_imports:.0f} MB ({file_imports:.0f} MB of it file-backed library pages, "
          f"more when the page cache holds the libraries whole), after building model + LoRA {rss_built:.0f} MB")
    print(f"peak RSS while training {peak:.0f} MB = {peak / weights_mb:.2f} x the bf16 frozen weights "
          f"({weights_mb:.0f} MB); without the process's import baseline: "
          f"{(peak - rss_imports) / weights_mb:.2f} x")
    if args.tensor_peak:
        from sd3_lora_trainer.trainer.loop import training_step
        from sd3_lora_trainer.trainer.run import attached

        with attached(mmdit, state, data):
            by_cat = measure.tensor_peak_by_category(lambda: training_step(mmdit, data, state, torch.bfloat16))
        rest = sum(v for k, v in by_cat.items() if k != "parameters")
        print("live tensors at the step's peak, MB: " + ", ".join(f"{k} {v:.0f}" for k, v in by_cat.items()))
        print(f"tensors beyond the parameters: {rest:.0f} MB; parameters + them = "
              f"{(by_cat['parameters'] + rest) / weights_mb:.2f} x the bf16 frozen weights")
    print(f"peak_rss_vs_bf16_weights={peak / weights_mb:.3f}")


if __name__ == "__main__":
    main()
