"""The training steps being compared. Each contestant is an object whose ``step()`` runs one whole
training step (forward, backward, optimiser step) on the shared cached inputs.

- :class:`Ours`: this pack's trainer (``trainer.loop.training_step`` with the LoRANetwork attached).
- :class:`HostWeightWrappers`: the mechanism of the host's own ``TrainLoraNode``
  (``comfy_extras/nodes_train.py``): a weight adapter on every weight of every host op (LoRA on
  ≥2-D weights, a full-size trainable diff on 1-D weights and on every bias), applied by the
  ModelPatcher as "weight wrappers" that rebuild each weight on every call.
- :class:`DiffusersPeft`: diffusers' SD3Transformer2DModel with a PEFT LoRA on the Linear layers
  sd-scripts' lora_sd3 targets (qkv split into to_q/to_k/to_v and add_*_proj).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# sd-scripts lora_sd3's targets, in diffusers' module names: qkv is split into to_q/to_k/to_v (x)
# and add_q/k/v_proj (context); attn.proj is to_out.0 / to_add_out; mlp is ff / ff_context;
# adaLN_modulation.1 is norm1.linear / norm1_context.linear; attn2 is SD3.5 Medium's extra attention.
PEFT_TARGETS = (r"transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0"
                r"|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)")


@dataclass
class Inputs:
    """Cached training inputs shared by every contestant: latents [N,16,h,w], context [N,L,4096], pooled [N,2048]."""

    latents: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor


def make_inputs(n: int = 2, latent_size: int = 32, tokens: int = 333, seed: int = 0, device="cpu") -> Inputs:
    """Seeded stand-ins for VAE latents and text-encoder outputs (what a session caches once)."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 16, latent_size, latent_size, generator=g)
    ctx = torch.randn(n, tokens, 4096, generator=g)
    pooled = torch.randn(n, 2048, generator=g)
    return Inputs(lat.to(device), ctx.to(device), pooled.to(device))


def autocast_or_not(device_type: str, bf16: bool):
    """bf16 autocast (the trainer's mixed_precision='bf16'), or nothing for fp32."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def tensor_bytes(tensors) -> int:
    """Bytes held by distinct tensors (shared storages counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class Ours:
    """This pack's trainer: ``training_step`` on an EncodedData inside ``trainer.run.attached``
    (the LoRA attached, frozen weights in the autocast dtype), exactly as ``train()`` runs it.

    Args:
        mmdit: the (frozen) host MMDiT; shared with other ``Ours`` contestants, so the network is
            attached only inside this contestant's :meth:`run`.
        compute_dtype: the dtype the inputs are cast to (the host's compute dtype of the model).
        attention: the MMDiT's attention function for a lever; None: what the train node uses
            (PyTorch SDPA in fp32 on the CPU, the host's own choice otherwise; ``nodes/host.py``).
        cast_once: False is an ablation: frozen weights stay as stored and autocast casts them in
            every layer call (what the trainer did before it cast them once per run).
        fused_cpu_linear: False is an ablation: fp32 frozen Linears on the CPU run as PyTorch's
            ``F.linear`` plus the separate LoRA update (``trainer/cpu_linear.py`` off).
        host_split_qkv: True is an ablation: q, k, v split by the host's ``split_qkv`` (indexing)
            instead of the trainer's ``unbind`` (``nodes/host.py`` split_qkv_by_unbind).
        cpu_linear_onednn: True/False runs that node's frozen products in oneDNN/MKL whatever the
            CPU's make (the lever of the library choice); None: the trainer's choice.
        config_overrides: further TrainConfig settings (e.g. ``split_qkv=True``).
    """

    def __init__(self, mmdit, inputs: Inputs, batch: int, bf16: bool, rank: int = 16,
                 compute_dtype=torch.float32, attention=None, cast_once: bool = True,
                 fused_cpu_linear: bool = True, cpu_linear_onednn=None, host_split_qkv: bool = False,
                 **config_overrides):
        from sd3_lora_trainer.trainer.batches import EncodedData
        from sd3_lora_trainer.trainer.config import TrainConfig
        from sd3_lora_trainer.trainer.state import build_network, new_train_state

        self.mmdit, self.compute_dtype = mmdit, compute_dtype
        self.attention, self.cast_once = attention, cast_once
        self.cpu_linear_onednn, self.host_split_qkv = cpu_linear_onednn, host_split_qkv
        self.config = TrainConfig(network_dim=rank, network_alpha=float(rank), train_batch_size=batch,
                                  mixed_precision="bf16" if bf16 else "no", **config_overrides).validate()
        self.data = EncodedData(inputs.latents, inputs.context, inputs.pooled)
        self.network = build_network(mmdit, self.config)
        self.network.set_fused_cpu_linear(fused_cpu_linear)
        self.state = new_train_state(self.config, self.network)

    @contextlib.contextmanager
    def run(self):
        """The trainer's once-per-run set-up (plus any lever), entered untimed around the measured
        steps; the shared model is left as it was afterwards."""
        import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_mod
        from sd3_lora_trainer.nodes.host import attention_for_training, sdpa_for_training
        from sd3_lora_trainer.trainer import cpu_linear
        from sd3_lora_trainer.trainer.run import attached

        sdpa = sdpa_for_training(self.config.mixed_precision, next(self.mmdit.parameters()).device, self.compute_dtype)
        hosts_split = mmdit_mod.split_qkv  # outside attention_for_training: the host's own
        # attention_for_training restores the host's attention on exit, a lever's included.
        with attention_for_training(sdpa and self.attention is None):
            if self.attention is not None:
                mmdit_mod.optimized_attention = self.attention
            if self.host_split_qkv:
                mmdit_mod.split_qkv = hosts_split
            library = (contextlib.nullcontext() if self.cpu_linear_onednn is None
                       else cpu_linear.forced_library(self.cpu_linear_onednn))
            with attached(self.mmdit, self.state, self.data), library:
                if not self.cast_once:
                    self.network.uncast()
                yield

    @property
    def compiled(self) -> bool:
        """torch_compile is on: the first step compiles (the benchmark runs it untimed)."""
        return self.config.torch_compile

    def step(self) -> float:
        """One training step; call it inside :meth:`run`."""
        from sd3_lora_trainer.trainer.loop import training_step

        return training_step(self.mmdit, self.data, self.state, self.compute_dtype)

    def resident_bytes(self) -> int:
        """Frozen weights (and their cast copies while attached) + LoRA + optimiser state."""
        opt = [t for s in self.state.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        with self.run():
            weights = list(self.mmdit.state_dict().values()) + self.network.stored_weights
        return tensor_bytes(weights + list(self.network.parameters()) + opt)


class HostWeightWrappers:
    """The host TrainLoraNode's mechanism, built with the host's own classes as its ``execute`` does.

    The adapter set-up below follows ``TrainLoraNode.execute`` line by line (new LoRA, no
    existing one, alpha 1.0 as the node hard-codes); the step follows ``TrainSampler.fwd_bwd``
    without the guider's cond plumbing: sigma from ``percent_to_sigma``, ``noise_scaling``,
    ``apply_model`` under autocast of the training dtype, MSE on x0, AdamW.
    """

    def __init__(self, model_patcher, inputs: Inputs, batch: int, bf16: bool, rank: int = 16,
                 lora_dtype=torch.float32, checkpointing: bool = False, device="cpu"):
        from comfy.weight_adapter import adapter_maps
        from comfy_extras.nodes_train import BiasDiff, find_all_highest_child_module_with_forward, patch

        self.inputs, self.batch, self.bf16, self.device = inputs, batch, bf16, torch.device(device)
        mp = model_patcher.clone()
        mp.set_model_compute_dtype(torch.bfloat16 if bf16 else torch.float32)
        lora_sd, adapters = {}, []
        for n, m in mp.model.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            if m.weight is not None:
                key = f"{n}.weight"
                if m.weight.dim() >= 2:
                    adapter = adapter_maps["LoRA"].create_train(m.weight, rank=rank, alpha=1.0).to(lora_dtype)
                    for name, p in adapter.named_parameters():
                        lora_sd[f"{n}.{name}"] = p
                else:  # norms' 1-D weights get a full-size trainable diff
                    diff = torch.nn.Parameter(torch.zeros(m.weight.shape, dtype=lora_dtype, requires_grad=True))
                    adapter = BiasDiff(diff)
                    lora_sd[f"{n}.diff"] = diff
                mp.add_weight_wrapper(key, adapter)
                adapters.append(adapter)
            if getattr(m, "bias", None) is not None:
                bias = torch.nn.Parameter(torch.zeros(m.bias.shape, dtype=lora_dtype, requires_grad=True))
                lora_sd[f"{n}.diff_b"] = bias
                mp.add_weight_wrapper(f"{n}.bias", BiasDiff(bias))
                adapters.append(BiasDiff(bias))
        self.optimizer = torch.optim.AdamW(lora_sd.values(), lr=1e-4)
        if checkpointing:  # the node's gradient_checkpointing switch (its default: on)
            for m in find_all_highest_child_module_with_forward(mp.model.diffusion_model):
                patch(m)
        mp.model.requires_grad_(False)
        self.lora_sd, self.adapters, self.mp = lora_sd, adapters, mp
        self.loaded = False
        self.generator = torch.Generator().manual_seed(0)

    def load(self) -> None:
        """Apply the weight wrappers to the model's modules, as ``load_models_gpu`` would on the CPU.

        Called directly on the patcher (not through model management) so that loading one host
        contestant cannot unload another one's wrappers in this shared process.
        """
        if not self.loaded:
            self.mp.patch_model(device_to=self.mp.load_device, load_weights=True)
            wrapped = sum(1 for m in self.mp.model.modules() if len(getattr(m, "weight_function", [])) > 0)
            if wrapped == 0:
                raise RuntimeError("host weight wrappers were not applied")
            self.loaded = True

    def step(self) -> float:
        self.load()
        ms = self.mp.model.model_sampling
        idx = torch.randperm(self.inputs.latents.shape[0], generator=self.generator)[: self.batch].to(self.device)
        latent = self.inputs.latents[idx]
        sigmas = torch.tensor([ms.percent_to_sigma(torch.rand((1,), generator=self.generator).item())
                               for _ in range(self.batch)]).to(self.device)
        noise = torch.randn(latent.shape, generator=self.generator).to(self.device)
        xt = ms.noise_scaling(sigmas, noise, latent, False)
        x0 = ms.noise_scaling(torch.zeros_like(sigmas), torch.zeros_like(noise), latent, False)
        with autocast_or_not(self.device.type, self.bf16):
            x0_pred = self.mp.model.apply_model(xt.requires_grad_(True), sigmas.requires_grad_(True),
                                                c_crossattn=self.inputs.context[idx], y=self.inputs.pooled[idx])
            loss = torch.nn.functional.mse_loss(x0_pred, x0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    def resident_bytes(self) -> int:
        opt = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return tensor_bytes(list(self.mp.model.diffusion_model.state_dict().values())
                            + list(self.lora_sd.values()) + opt)


class DiffusersPeft:
    """diffusers' SD3Transformer2DModel + PEFT LoRA (as diffusers' train_dreambooth_lora_sd3 adds it),
    with the same flow objective, AdamW settings and gradient clipping as ours."""

    def __init__(self, transformer, inputs: Inputs, batch: int, bf16: bool, rank: int = 16):
        from sd3_lora_trainer.trainer import flow

        self.flow, self.model, self.inputs, self.batch, self.bf16 = flow, transformer, inputs, batch, bf16
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        if not self.params:
            raise RuntimeError("add_peft_lora(transformer) first")
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> float:
        idx = torch.randperm(self.inputs.latents.shape[0], generator=self.generator)[: self.batch]
        x0 = self.inputs.latents[idx]
        noise = torch.randn(x0.shape, generator=self.generator)
        sigmas = self.flow.sample_sigmas("uniform", self.batch, generator=self.generator)
        x_sigma = self.flow.add_noise(x0, noise, sigmas)
        with autocast_or_not("cpu", self.bf16):
            v = self.model(hidden_states=x_sigma, encoder_hidden_states=self.inputs.context[idx],
                           pooled_projections=self.inputs.pooled[idx], timestep=sigmas * 1000,
                           return_dict=False)[0]
        loss = self.flow.flow_loss(v, x_sigma, x0, sigmas)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def resident_bytes(self) -> int:
        opt = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return tensor_bytes(list(self.model.state_dict().values()) + opt)


def add_peft_lora(transformer, rank: int = 16) -> int:
    """Add a PEFT LoRA (rank = alpha, B zero-initialised) on PEFT_TARGETS; returns the number of wrapped Linears."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=PEFT_TARGETS))
    return sum(1 for n, _ in transformer.named_modules() if n.endswith(".lora_A"))


class Matmul:
    """This machine's matmul peak in ``dtype``: one n×n×n matmul per ``step``."""

    def __init__(self, n: int = 4096, dtype: torch.dtype = torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(dtype)
        self.b = torch.randn(n, n, generator=g).to(dtype)
        self.flops = 2 * n ** 3

    def step(self) -> float:
        return float((self.a @ self.b)[0, 0])

    def resident_bytes(self) -> int:
        return tensor_bytes([self.a, self.b])
