"""Training-step benchmark: this pack's trainer vs the host's TrainLoraNode mechanism vs diffusers+PEFT.

Run through ``bash scripts/bench.sh`` (see the README's Performance section). Every contestant
trains a rank-16 LoRA on the same SD3-shaped random-weight model dimensions and the same cached
inputs; steps are interleaved round-robin in this one process and the median is reported.

Only the precisions this machine computes natively are measured: fp32 always, bf16 where a bf16
matmul is not slower than fp32 (``trainer.precision.is_native``: with AMX it is ~10x faster, on CPUs
without AVX-512 bf16 ~100x slower). The matmul peak is measured in the fastest of them. The last
lines are, per native precision, ``ratio_vs_native_<dtype>=<our s/step ÷ host mechanism s/step>``
(batch 1) and ``ratio_vs_best_peer_<dtype>=<our s/step ÷ the faster peer's>`` (the worst batch).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_env  # noqa: E402

host_env.setup(cpu=True)

import torch  # noqa: E402

import contestants as C  # noqa: E402
import measure  # noqa: E402
from models import Shape, count_params, diffusers_sd3, host_mmdit, host_model_patcher  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depth 8 and 3 measured rounds")
    p.add_argument("--depth", type=int, default=None, help="joint blocks (default 12; 8 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 5; 3 with --quick)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every contestant")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-levers", action="store_true", help="skip the 'ours + lever' contestants")
    p.add_argument("--lever-batches", type=int, nargs="+", default=[1], help="batches the levers run at")
    p.add_argument("--only", default=None, help="comma-separated name filter (substring match)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own). 1 avoids OpenMP spin-wait collapse when "
                        "other processes share the cores")
    p.add_argument("--profile", action="store_true",
                   help="profile one step (batch 1, in --profile-dtype) of ours and of diffusers+PEFT and exit")
    p.add_argument("--profile-dtype", choices=("fp32", "bf16"), default=None,
                   help="precision of --profile (default: the fastest native one)")
    a = p.parse_args(argv)
    a.depth = a.depth or (8 if a.quick else 12)
    a.rounds = a.rounds or (3 if a.quick else 5)
    return a


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compute_dtype(mp) -> torch.dtype:
    """The dtype the host runs this model's matmuls in, as the pack's ``nodes/host.py`` reads it."""
    return mp.model.manual_cast_dtype or mp.model.get_dtype()


def build_ours_model(shape: Shape):
    """Reference weights, loaded through the host like 'Load Diffusion Model'; returns (state_dict, patcher)."""
    from sd3_lora_trainer.trainer.prepare import freeze_base_model

    ref = host_mmdit(shape, torch.float32)
    sd = {k: v for k, v in ref.state_dict().items()}
    mp = host_model_patcher(sd, torch.float32)
    freeze_base_model(mp.model.diffusion_model)
    return sd, mp


def native_dtypes() -> list:
    """The precisions this machine runs natively, fastest last: ["fp32"] or ["fp32", "bf16"]."""
    from sd3_lora_trainer.trainer.precision import is_native
    return ["fp32", "bf16"] if is_native(torch.bfloat16) else ["fp32"]


def peak_key(dtypes) -> str:
    """The table key of the matmul-peak contestant, in the fastest native dtype."""
    return f"{dtypes[-1]} matmul 4096³ (peak)|-|{dtypes[-1]}"


def build_contestants(args, shape: Shape, inputs: C.Inputs, dtypes):
    """name -> contestant, with 'name|batch|dtype' keys so the table can be grouped.

    Levers run in the fastest native dtype; the bf16-only levers (cast once, bf16-stored
    weights) only where bf16 is native.
    """
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_mod
    from comfy.ldm.modules.attention import attention_pytorch
    from sd3_lora_trainer.trainer import cpu_linear
    from sd3_lora_trainer.trainer.config import TrainConfig
    log(f"building models: depth {shape.depth}")
    sd, mp = build_ours_model(shape)
    mmdit, cdt = mp.model.diffusion_model, compute_dtype(mp)
    log(f"host MMDiT: {count_params(mmdit) / 1e6:.0f} M params, compute dtype {cdt}")
    host_mps = {dt == "bf16": host_model_patcher(sd, torch.float32) for dt in dtypes}
    dif = diffusers_sd3(shape, inputs.latents.shape[-1])
    n_peft = C.add_peft_lora(dif, args.rank)
    log(f"diffusers SD3Transformer2DModel: {count_params(dif) / 1e6:.0f} M params incl. LoRA, {n_peft} PEFT LoRA Linears")
    host_attention = mmdit_mod.optimized_attention  # the host's choice for this device
    lever_dt = dtypes[-1]
    lever_bf16 = lever_dt == "bf16"
    bf16_mmdit = copy.deepcopy(mmdit).to(torch.bfloat16) if lever_bf16 and not args.no_levers else None
    del sd

    out = {}
    for b in args.batches:
        for dt in dtypes:
            bf16 = dt == "bf16"
            out[f"ours|{b}|{dt}"] = C.Ours(mmdit, inputs, b, bf16, args.rank, cdt)
            out[f"host TrainLoraNode mechanism|{b}|{dt}"] = C.HostWeightWrappers(host_mps[bf16], inputs, b, bf16, args.rank)
            out[f"diffusers+PEFT|{b}|{dt}"] = C.DiffusersPeft(dif, inputs, b, bf16, args.rank)
        if args.no_levers or b not in args.lever_batches:
            continue

        def lever(name, model=mmdit, dtype=cdt, **kw):
            out[f"{name}|{b}|{lever_dt}"] = C.Ours(model, inputs, b, lever_bf16, args.rank, dtype, **kw)

        if lever_bf16:  # in bf16 the trainer keeps the host's attention on the CPU
            lever("ours + SDPA attention", attention=attention_pytorch)
        # In fp32 it trains with SDPA there (nodes/host.py sdpa_for_training): the host's own, ablated.
        out[f"ours − SDPA attention (host's attention)|{b}|fp32"] = C.Ours(mmdit, inputs, b, False, args.rank, cdt,
                                                                           attention=host_attention)
        # fp32 frozen Linears + LoRA as one node (trainer/cpu_linear.py), ablated; and its frozen
        # products in the library the trainer does not pick on this CPU's make.
        out[f"ours − fused CPU Linear (F.linear + LoRA)|{b}|fp32"] = C.Ours(mmdit, inputs, b, False, args.rank, cdt,
                                                                           fused_cpu_linear=False)
        out[f"ours − qkv split by unbind (host's split_qkv)|{b}|fp32"] = C.Ours(mmdit, inputs, b, False, args.rank, cdt,
                                                                            host_split_qkv=True)
        if cpu_linear.onednn_linear_available():
            other = not cpu_linear.frozen_matmuls_in_onednn()
            out[f"ours, fused Linear in {'oneDNN' if other else 'MKL'} instead|{b}|fp32"] = C.Ours(
                mmdit, inputs, b, False, args.rank, cdt, cpu_linear_onednn=other)
        if lever_bf16:  # levers of bf16 autocast itself
            lever("ours, weights stored bf16", bf16_mmdit, torch.bfloat16)
            lever("ours − cast once (autocast casts per call)", cast_once=False)
        lever("ours − fused AdamW", optimizer_args="fused=False")
        lever("ours + torch_compile", torch_compile=True)
        # PyTorch attention, as the train node requires for this pair (nodes/host.py).
        lever("ours + torch_compile + grad checkpointing + SDPA", attention=attention_pytorch, torch_compile=True,
              gradient_checkpointing=True)
        lever("ours + grad checkpointing", gradient_checkpointing=True)
        if "split_qkv" in TrainConfig.__dataclass_fields__:  # shows what the fused-qkv LoRA saves
            lever("ours + split_qkv LoRA", split_qkv=True)
    if args.only:
        keep = args.only.split(",")
        out = {k: v for k, v in out.items() if any(s in k for s in keep)}
    out[peak_key(dtypes)] = C.Matmul(4096, torch.bfloat16 if dtypes[-1] == "bf16" else torch.float32)
    return out


def eager_flops(compiled) -> float:
    """FLOPs of one step of an eager twin of the ``compiled`` Ours contestant (same model and settings)."""
    cfg = compiled.config
    twin = C.Ours(compiled.mmdit, C.Inputs(compiled.data.latents, compiled.data.context, compiled.data.pooled),
                  cfg.train_batch_size, cfg.mixed_precision == "bf16", cfg.network_dim, compiled.compute_dtype,
                  attention=compiled.attention, gradient_checkpointing=cfg.gradient_checkpointing)
    with measure.run_of(twin):
        return measure.count_flops(twin.step)


PEERS = ("host TrainLoraNode mechanism", "diffusers+PEFT")  # the two peers ours is measured against


def print_table(args, contestants, flops, results, memory, dtypes):
    """The results table; ratios against the host mechanism at the same batch and dtype."""
    from sd3_lora_trainer.trainer.precision import matmul_slowdown
    peak = peak_key(dtypes)
    peak_gflops = contestants[peak].flops / measure.median([m["s"] for m in results[peak]]) / 1e9
    med = {k: measure.median([m["s"] for m in v]) for k, v in results.items()}
    print()
    print(f"depth {args.depth}, rank {args.rank}, latents 16x32x32, context 333x4096, pooled 2048, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    slow = matmul_slowdown(torch.bfloat16)
    print(f"native precisions: {', '.join(dtypes)} (a 256³ bf16 matmul takes {slow:.2f}x the fp32 time here"
          f"{'' if 'bf16' in dtypes else ': bf16 is not native, so it is not measured'})")
    print(f"{dtypes[-1]} matmul peak measured in this run: {peak_gflops:.0f} GFLOP/s")
    print("step ΔRSS = peak RSS during one step − RSS before it (kernel VmHWM; free heap trimmed first); "
          "resident = frozen weights + LoRA + optimiser state")
    hdr = ("contestant", "batch", "dtype", "s/step", "vs host", "step ΔRSS MB", "resident MB",
           "GFLOP/step", "GFLOP/s", f"% {dtypes[-1]} peak")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for key, c in contestants.items():
        if key == peak:
            continue
        name, b, dt = key.split("|")
        host = med.get(f"host TrainLoraNode mechanism|{b}|{dt}")
        gf = flops[key] / 1e9
        rate = gf / med[key]
        dmem = memory[key]
        print(f"| {name} | {b} | {dt} | {med[key]:.3f} | {med[key] / host:.2f} | {dmem:.0f} | "
              f"{c.resident_bytes() / 2**20:.0f} | {gf:.0f} | {rate:.0f} | {100 * rate / peak_gflops:.1f} |"
              if host else f"| {name} | {b} | {dt} | {med[key]:.3f} | - | {dmem:.0f} | "
              f"{c.resident_bytes() / 2**20:.0f} | {gf:.0f} | {rate:.0f} | {100 * rate / peak_gflops:.1f} |")
    if args.depth != 12 or args.rank != 16:
        print(f"(note: measured at depth {args.depth}, rank {args.rank}; the targets are defined at depth 12, rank 16)")
    for dt in dtypes:
        ours, host = med.get(f"ours|1|{dt}"), med.get(f"host TrainLoraNode mechanism|1|{dt}")
        if ours and host:
            print(f"ratio_vs_native_{dt}={ours / host:.3f}")
        best = best_peer_ratios(med, dt)
        if best:
            spread = round_ratio_spread(results, med, dt)
            print(f"ratio_vs_best_peer_{dt}={max(best.values()):.3f}  "
                  f"({', '.join(f'batch {b}: {r:.3f}' for b, r in sorted(best.items()))}; "
                  f"round by round: {', '.join(f'batch {b} {lo:.2f}-{hi:.2f}' for b, (lo, hi) in sorted(spread.items()))})")



def best_peer_ratios(med: dict, dt: str) -> dict:
    """batch -> our s/step ÷ the faster peer's (host mechanism or diffusers+PEFT), for each batch measured."""
    out = {}
    for key, ours in med.items():
        name, b, kdt = key.split("|")
        peers = [med.get(f"{p}|{b}|{dt}") for p in PEERS]
        if name == "ours" and kdt == dt and all(peers):
            out[int(b)] = ours / min(peers)
    return out


def round_ratio_spread(results: dict, med: dict, dt: str) -> dict:
    """batch -> (lowest, highest) of our step ÷ the faster peer's step in the same round.

    Why: on a shared 2-core machine single steps moved by ±15 % within minutes, so one run's
    ratio of medians can land on either side of a target; the round-by-round range shows how far.
    """
    out = {}
    for b in best_peer_ratios(med, dt):
        peer = min(PEERS, key=lambda p: med[f"{p}|{b}|{dt}"])
        pairs = zip(results[f"ours|{b}|{dt}"], results[f"{peer}|{b}|{dt}"])
        ratios = [o["s"] / p["s"] for o, p in pairs]
        out[b] = (min(ratios), max(ratios))
    return out


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear",
              "mkldnn::_linear_pointwise",  # the fp32 CPU frozen products of trainer/cpu_linear.py (oneDNN)
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _profiled_step(contestant):
    """Self CPU time (µs) and calls per op of one step of ``contestant`` after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    with measure.run_of(contestant):
        for _ in range(2):
            contestant.step()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            contestant.step()
    return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}


def profile(args, shape: Shape, inputs: C.Inputs) -> None:
    """torch.profiler over one step (batch 1) of ours and of diffusers+PEFT: the ops by self CPU
    time side by side, so the difference shows where it is."""
    dt = args.profile_dtype or native_dtypes()[-1]
    log(f"profiling one step of ours and of diffusers+PEFT in {dt}")
    _, mp = build_ours_model(shape)
    dif = diffusers_sd3(shape, inputs.latents.shape[-1])
    C.add_peft_lora(dif, args.rank)
    runs = {"ours": C.Ours(mp.model.diffusion_model, inputs, 1, dt == "bf16", args.rank, compute_dtype(mp)),
            "diffusers+PEFT": C.DiffusersPeft(dif, inputs, 1, dt == "bf16", args.rank)}
    ops = {name: _profiled_step(c) for name, c in runs.items()}
    keys = sorted(set().union(*ops.values()), key=lambda k: -max(o.get(k, (0, 0))[0] for o in ops.values()))
    print(f"| op | {' | '.join(f'{n} ms | {n} calls' for n in ops)} |")
    print("|---|" + "---|---|" * len(ops))
    for k in keys[:25]:
        cells = " | ".join(f"{o.get(k, (0, 0))[0] / 1e3:.1f} | {o.get(k, (0, 0))[1]}" for o in ops.values())
        print(f"| {k} | {cells} |")
    for name, o in ops.items():
        total = sum(t for t, _ in o.values())
        in_mm = sum(o[k][0] for k in MATMUL_OPS if k in o)
        print(f"{name}: {total / 1e6:.2f} s self CPU time, {100 * in_mm / total:.0f}% in matmul/attention kernels "
              f"({in_mm / 1e6:.2f} s), the rest {(total - in_mm) / 1e6:.2f} s")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(depth=args.depth, pos_max=32)
    inputs = C.make_inputs(n=max(2, max(args.batches)))
    if args.profile:
        profile(args, shape, inputs)
        return
    dtypes = native_dtypes()
    log(f"native precisions here: {', '.join(dtypes)}")
    contestants = build_contestants(args, shape, inputs, dtypes)
    log(f"{len(contestants)} contestants; counting FLOPs (this round is also the warm-up)")
    flops = {}
    for k, c in contestants.items():
        if getattr(c, "compiled", False):
            continue
        with measure.run_of(c):
            flops[k] = c.flops if isinstance(c, C.Matmul) else measure.count_flops(c.step)
    for k, c in contestants.items():
        if getattr(c, "compiled", False):  # same math as the eager twin; compiled here, untimed
            name, b, dt = k.split("|")
            twin = f"ours + grad checkpointing|{b}|{dt}" if c.config.gradient_checkpointing else f"ours|{b}|{dt}"
            # checkpointing recomputes the forward; a twin left out by --only is counted on an eager copy
            flops[k] = flops.get(twin) or flops.get(f"ours|{b}|{dt}") or eager_flops(c)
            t0 = time.perf_counter()
            with measure.run_of(c):
                c.step()
                c.step()
            log(f"{name}: compiled in the first two steps, {time.perf_counter() - t0:.0f} s")
    results = measure.interleaved(contestants, rounds=args.rounds, warmup=0,
                                  log=lambda m: log(m if len(m) < 200 else m[:200] + "..."))
    log("memory round (untimed)")
    memory = {}
    for k, c in contestants.items():
        with measure.run_of(c):
            memory[k] = measure.memory_step(c.step)
    print_table(args, contestants, flops, results, memory, dtypes)


if __name__ == "__main__":
    main()
