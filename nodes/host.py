"""The one place that knows ComfyUI's MODEL / CLIP / VAE objects and turns them into trainer inputs."""
from __future__ import annotations

import contextlib
import json
import logging
from typing import Callable, List, Optional, Tuple

import torch

import comfy.model_base
import comfy.model_management
import comfy.sd
import comfy.utils

from ..trainer.batches import BucketedData
from ..trainer.encode import Encoders, EncodeStats, encode_training_data, total_items
from ..trainer.prepare import backward_safe_norms, freeze_base_model, model_signature
from ..trainer.training_data import TrainingData
from ..trainer.validation import validation_loss
from .text import encode_caption

log = logging.getLogger(__name__)


def require_sd3(model) -> torch.nn.Module:
    """The MMDiT of an SD3-family MODEL, or a ValueError that says what was passed instead."""
    inner = getattr(model, "model", None)
    mmdit = getattr(inner, "diffusion_model", None)
    if not isinstance(inner, comfy.model_base.SD3) or not hasattr(mmdit, "joint_blocks"):
        kind = type(inner).__name__ if inner is not None else type(model).__name__
        raise ValueError(
            f"this node trains SD3 / SD3.5 (MMDiT) models, but the MODEL input is a {kind} model. "
            f"Load an SD3 Medium, SD3.5 Medium or SD3.5 Large checkpoint with 'Load Checkpoint' "
            f"(or 'Load Diffusion Model' + 'TripleCLIPLoader' + 'Load VAE')")
    return mmdit


def sdpa_for_training(mixed_precision: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the MMDiT trains with PyTorch's SDPA attention in place of the host's choice: in fp32
    on the CPU (``mixed_precision`` no, fp32 compute), where the host picks its chunked attention.

    That is the precision diffusers trains in with SDPA too. Measured with ``bash scripts/bench.sh``
    on a 2-core AMD EPYC (depth 12, fp32): the step's peak memory 40 % lower (949 -> 526 MB at batch
    1, 1829 -> 1072 MB at batch 2), the time level in one run (1.89 s both at batch 1) and faster in
    another (4.73 -> 3.68 s at batch 2). In bf16 SDPA is slower on the CPU, and on NVIDIA GPUs the
    host picks SDPA itself.
    """
    return mixed_precision == "no" and torch.device(device).type == "cpu" and dtype == torch.float32


@contextlib.contextmanager
def attention_for_training(use_sdpa: bool):
    """While active, the MMDiT's attention is PyTorch's SDPA (``use_sdpa``) or the host's own choice,
    and q, k, v come out of the fused qkv projection through :func:`split_qkv_by_unbind`; the host's
    functions are restored afterwards."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module

    saved = mmdit_module.optimized_attention, getattr(mmdit_module, "split_qkv", None)
    if use_sdpa:
        mmdit_module.optimized_attention = attention.attention_pytorch
    if saved[1] is not None:
        mmdit_module.split_qkv = split_qkv_by_unbind
    try:
        yield
    finally:
        mmdit_module.optimized_attention = saved[0]
        if saved[1] is not None:
            mmdit_module.split_qkv = saved[1]


def split_qkv_by_unbind(qkv: torch.Tensor, head_dim: int):
    """q, k, v as [B, L, heads, head_dim] views of a fused [B, L, 3 * heads * head_dim] projection:
    the same views as the host MMDiT's ``split_qkv``, whose ``qkv[0], qkv[1], qkv[2]`` make autograd
    zero-fill a full qkv-sized gradient for each of the three; ``unbind`` backward is one ``stack``.
    The same gradients bitwise (adding zeros is exact); 1-3 % of an fp32 step at depth 12 on the CPU
    (README, fp32 levers)."""
    return qkv.unflatten(-1, (3, -1, head_dim)).movedim(-3, 0).unbind(0)


def _trains_with_sdpa(model, settings) -> bool:
    """:func:`sdpa_for_training` for this MODEL and these settings."""
    return sdpa_for_training(settings.mixed_precision, model.load_device, compute_dtype(model))


def training_attention(model, settings):
    """:func:`attention_for_training` as :func:`sdpa_for_training` picks it for this MODEL and these
    settings (samples and validation made during training included)."""
    return attention_for_training(_trains_with_sdpa(model, settings))


def check_compile_attention(settings, model) -> None:
    """torch_compile with gradient checkpointing needs PyTorch (SDPA) attention.

    The host's other attentions size their chunks from the free memory at each call; a compiled,
    checkpointed block then recomputes with a different graph than its forward and backward
    fails. The host picks SDPA on NVIDIA GPUs by itself, the trainer in fp32 on the CPU
    (:func:`sdpa_for_training`); elsewhere a launch flag selects it.
    """
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module

    if settings.torch_compile and settings.gradient_checkpointing and not _trains_with_sdpa(model, settings) and \
            mmdit_module.optimized_attention is not attention.attention_pytorch:
        raise ValueError(f"torch_compile with gradient_checkpointing needs PyTorch attention, but this ComfyUI "
                         f"uses {mmdit_module.optimized_attention.__name__}: start ComfyUI with "
                         f"--use-pytorch-cross-attention, or turn torch_compile or gradient_checkpointing off")


def max_image_side(mmdit: torch.nn.Module) -> Optional[int]:
    """The longest image side (px) the model's position table covers (None: no table limit)."""
    max_patches = getattr(mmdit, "pos_embed_max_size", None)
    return None if max_patches is None else max_patches * getattr(mmdit, "patch_size", 2) * 8


def check_resolution(mmdit: torch.nn.Module, resolution: int) -> None:
    """Refuse a resolution the model's position embedding cannot cover."""
    limit = max_image_side(mmdit)
    if limit is not None and resolution > limit:
        raise ValueError(f"resolution {resolution} is larger than this model supports "
                         f"({limit} px); lower the dataset's resolution")


def compute_dtype(model) -> torch.dtype:
    """The dtype the host runs this model's matmuls in (its manual-cast dtype when it has one)."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


def load_for_training(model) -> torch.nn.Module:
    """Load the model fully onto its device (other nodes may have offloaded it) and return the MMDiT."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return model.model.diffusion_model


def _pad_tokens(conds: List[torch.Tensor]) -> List[torch.Tensor]:
    """Zero-pad text contexts to one length so they stack (only long captions differ)."""
    longest = max(c.shape[1] for c in conds)
    if any(c.shape[1] != longest for c in conds):
        log.warning("captions encode to different lengths; padding contexts to %d tokens", longest)
    return [torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in conds]


def vae_identity(model, vae) -> str:
    """What a cached latent depends on besides its image: the VAE's weights and dtype and the
    model's latent scaling (``process_in``)."""
    fmt = model.model.latent_format
    return (f"{model_signature(vae.first_stage_model)}:{getattr(vae, 'vae_dtype', '')}:"
            f"{type(fmt).__name__}:{getattr(fmt, 'scale_factor', '')}:{getattr(fmt, 'shift_factor', '')}")


def clip_identity(clip, settings: str = "") -> str:
    """What a cached text-encoder output depends on besides its caption: the encoders' weights,
    the CLIP layer, and the caller's encoder ``settings`` (e.g. token lengths)."""
    return f"{model_signature(clip.cond_stage_model)}:{getattr(clip, 'layer_idx', None)}:{settings}"


# Settings that change what the text encoders return for a caption (part of the cache key).
TEXT_OPTIONS = ("t5xxl_max_token_length", "apply_lg_attn_mask", "apply_t5_attn_mask")


def text_options(settings) -> dict:
    """The caption-encoding options of ``settings`` (those it has)."""
    return {k: getattr(settings, k) for k in TEXT_OPTIONS if hasattr(settings, k)}


def _encode_text(clip, caption: str, options: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    cond, pooled = encode_caption(clip, caption, **options)
    return cond.float().clone(), pooled.float().clone()


def encode_dataset(model, clip, vae, dataset: TrainingData, settings=None,
                   on_progress: Optional[Callable[[int, int], None]] = None) -> Tuple[BucketedData, EncodeStats]:
    """The batch source of ``dataset``: VAE latents (in the model's latent space) and CLIP/T5
    outputs (with the text options of ``settings``), taken from the cache where an entry for the
    same content, encoders and options exists and encoded otherwise. Shows a progress bar and
    calls ``on_progress(done, total)`` (from 0, before the encoders load); Cancel stops it (what
    was cached so far stays)."""
    if clip is None:
        raise ValueError("the CLIP input is empty: this checkpoint has no text encoders. "
                         "Load them with 'TripleCLIPLoader' and connect its CLIP output")
    if vae is None:
        raise ValueError("the VAE input is empty: this checkpoint has no VAE. Load one with 'Load VAE'")

    def encode_image(image: torch.Tensor) -> torch.Tensor:
        z = vae.encode(image.clone())
        return model.model.latent_format.process_in(z.float()).clone()

    options = text_options(settings)
    enc = Encoders(encode_image, lambda caption: _encode_text(clip, caption, options), vae_identity(model, vae),
                   clip_identity(clip, json.dumps(options, sort_keys=True)))
    total = total_items(dataset)
    bar = comfy.utils.ProgressBar(total)
    done = [0]
    if on_progress is not None:
        on_progress(0, total)

    def progress():
        done[0] += 1
        if on_progress is not None:
            on_progress(done[0], total)
        bar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()

    with torch.inference_mode(False), torch.no_grad():
        source, stats = encode_training_data(dataset, enc, model.load_device, progress)
    log.info("SD3 LoRA dataset %s: %s", dataset.source, stats)
    if dataset.cache.text != "none":
        release_text_encoders(clip)
    return source, stats


def release_text_encoders(clip) -> None:
    """Unload the text encoders from the GPU once every caption is cached (they are not trained);
    a no-op when they run on the CPU. They load again by themselves if something encodes later."""
    mm, patcher = comfy.model_management, clip.patcher
    if patcher.load_device == patcher.offload_device:
        return  # on the CPU there is no separate memory to free
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        if mm.current_loaded_models[i].model is patcher and mm.current_loaded_models[i].model_unload():
            mm.current_loaded_models.pop(i)


def encode_captions(clip, captions: List[str], options: Optional[dict] = None,
                    grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder outputs (context [B, L, D], pooled [B, P]) for captions encoded per step, with
    the settings' text options; ``grad`` keeps the graph when text-encoder LoRAs are trained."""
    conds, pooled = [], []
    with torch.enable_grad() if grad else torch.no_grad():
        for caption in captions:
            cond, pool = encode_caption(clip, caption, **(options or {}))
            conds.append(cond.float() if grad else cond.float().clone())
            pooled.append(pool.float() if grad else pool.float().clone())
    return torch.cat(_pad_tokens(conds)), torch.cat(pooled)


def text_encoder_modules(clip) -> dict:
    """The host CLIP's SD3 text encoders by sd-scripts' order: {"clip_l", "clip_g", "t5xxl": module or None}."""
    stack = getattr(clip, "cond_stage_model", None)
    return {name: getattr(getattr(stack, name, None), "transformer", None) for name in ("clip_l", "clip_g", "t5xxl")}


@contextlib.contextmanager
def text_loras_attached(clip, text_networks: dict):
    """While active, the host's text encoders carry the text-encoder LoRAs and can be backpropagated
    through (frozen base, inference tensors replaced, norms fed copies); restored afterwards."""
    if not text_networks:
        yield
        return
    clip.load_model()
    modules = text_encoder_modules(clip)
    with contextlib.ExitStack() as stack:
        for name, net in text_networks.items():
            freeze_base_model(modules[name])
            stack.enter_context(backward_safe_norms(modules[name]))
            net.attach(modules[name])
            stack.callback(net.detach)
            net.train()
        yield


def model_with_lora(model, kohya_tensors, clip=None) -> Tuple[object, object]:
    """Clones of ``model`` (and ``clip`` when the LoRA has text-encoder parts) with the LoRA attached
    as weight patches, through the host's own loader; the inputs are left untouched."""
    has_text = clip is not None and any(k.startswith("lora_te") for k in kohya_tensors)
    patched, patched_clip = comfy.sd.load_lora_for_models(model, clip if has_text else None, kohya_tensors,
                                                          1.0, 1.0 if has_text else 0.0)
    return patched, (patched_clip if has_text else clip)


def maybe_validate(session, mmdit: torch.nn.Module, step: int, compute_dtype: torch.dtype, clip, dataset,
                   settings=None) -> Optional[float]:
    """The validation loss at ``step`` when it is due (every ``validate_every_n_steps``, from the
    settings if they carry it, else from the dataset node) and the dataset holds images out.

    Called from the loop's ``on_step``, so the LoRA is attached; it is switched to eval mode
    (no LoRA dropout) for the measurement. Values are kept in ``session.info["validation_loss"]``
    as [[step, loss], ...] and logged.
    """
    every = getattr(settings, "validate_every_n_steps", 0) or getattr(dataset, "validate_every_n_steps", 0)
    held_out = getattr(session.data, "validation", None)
    if held_out is None or not every or step % every:
        return None
    network = session.state.network
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode(False):
            loss = validation_loss(mmdit, held_out, compute_dtype,
                                   lambda captions: encode_captions(clip, captions, text_options(settings)),
                                   mixed_precision=session.state.config.mixed_precision)
    finally:
        network.train(was_training)
    session.info.setdefault("validation_loss", []).append([step, loss])
    log.info("SD3 LoRA validation loss at step %d: %.5f", step, loss)
    return loss
