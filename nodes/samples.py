"""Samples during training: the Sampling options node and the runner the train node calls between steps.

Samples are made with the host's own sampler (``comfy.sample.sample``) on a clone of the model
with the current LoRA attached as a patch, exactly as a downstream KSampler would see it, and
saved by the stock SaveImage node (same file naming, workflow in the PNG metadata).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

import comfy.sample
import comfy.samplers
import comfy.utils

from ..trainer.sample_prompts import SamplePrompt, check_size, parse_prompts
from . import checks, host
from .common import CATEGORY, SAMPLING
from .names import filename_prefix as checked_prefix

_D = SamplePrompt("")


@dataclass(frozen=True)
class SamplingOptions:
    """What the Sampling node configures: the prompts and when and how to sample."""

    prompts: Tuple[SamplePrompt, ...]
    every_n_steps: int      # 0: only at the end of a run that made no samples
    at_first: bool          # also before the first step of a session
    sampler_name: str
    scheduler: str
    filename_prefix: str

    def due(self, step: int) -> bool:
        """Whether the step just finished is a sampling step."""
        return self.every_n_steps > 0 and step % self.every_n_steps == 0


class SD3LoraSampling:
    """Sample prompts and schedule for previews during training (sd-scripts' --sample_* options)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sample_prompts": ("STRING", {"multiline": True, "default": "a photo of sks --w 0 --h 0 --s 20 --l 5 --d 1",
                               "tooltip": "One prompt per line, with sd-scripts' inline options: --w width, "
                                          "--h height (0 = training resolution), --s steps, --l CFG scale, "
                                          "--d seed, --n negative prompt. '#' starts a comment line."}),
            "sample_every_n_steps": ("INT", {"default": 100, "min": 0, "max": 1_000_000,
                                     "tooltip": "Sample after every N steps (--sample_every_n_steps); 0 = only "
                                                "at the end of a run."}),
            "sample_at_first": ("BOOLEAN", {"default": False, "tooltip": "Also sample before training starts "
                                            "(--sample_at_first)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler",
                             "tooltip": "The host's sampler (--sample_sampler)."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "sgm_uniform",
                          "tooltip": "The host's noise schedule; sgm_uniform suits SD3."}),
            "filename_prefix": ("STRING", {"default": "sd3_lora_samples/sample",
                                "tooltip": "Where in the output folder the sample PNGs go (folders inside it "
                                           "with '/'); the step is appended."}),
        }}

    RETURN_TYPES = (SAMPLING,)
    RETURN_NAMES = ("sampling",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Preview samples during training; connect to the train node's 'sampling' input."

    @classmethod
    def VALIDATE_INPUTS(cls, sample_prompts, filename_prefix):
        # At queue time: a bad prompt line must not surface only at the first sample of a run.
        return checks.report(cls, locals(), checks.given(sample_prompts, _prompts),
                             checks.given(filename_prefix, _filename_prefix))

    def build(self, sample_prompts, sample_every_n_steps, sample_at_first, sampler_name, scheduler, filename_prefix):
        return (SamplingOptions(tuple(_prompts(sample_prompts)), sample_every_n_steps, sample_at_first, sampler_name,
                                scheduler, _filename_prefix(filename_prefix)),)


def _filename_prefix(value: str) -> str:
    """The checked prefix of the sample PNGs inside ``output`` (empty: the default)."""
    return checked_prefix(value.strip() or "sd3_lora_samples/sample")


def _prompts(text: str) -> List[SamplePrompt]:
    """The parsed prompt lines (each size within the limits), or a ValueError naming the line."""
    prompts = parse_prompts(text, _D)
    if not prompts:
        raise ValueError("sample_prompts is empty: write at least one prompt line, e.g. 'a photo of sks --s 20'")
    return prompts


def check_sample_sizes(options: Optional[SamplingOptions], resolution: int, max_side: Optional[int]) -> None:
    """Before training: every sample, with 0 sizes filled in by ``resolution``, fits the model's
    position table (``max_side`` px) and the area limit."""
    for no, p in enumerate(options.prompts if options is not None else (), start=1):
        check_size(dataclasses.replace(p, width=p.width or resolution, height=p.height or resolution),
                   f"prompt {no}", max_side)


class SampleRunner:
    """Makes, saves and remembers samples for one queue run of the train node.

    Args:
        options: from the Sampling node. model, clip, vae: the train node's inputs.
        resolution: the training resolution (fills width/height 0).
        on_saved: ``on_saved(step, [file info])`` after each set is saved (the live view).
        prompt, extra_pnginfo: the host's hidden inputs, written into each PNG like SaveImage.
    """

    def __init__(self, options: SamplingOptions, model, clip, vae, resolution: int, on_saved=None,
                 prompt=None, extra_pnginfo=None):
        self.options, self.model, self.clip, self.vae = options, model, clip, vae
        self.prompts = [dataclasses.replace(p, width=p.width or resolution, height=p.height or resolution)
                        for p in options.prompts]
        self.on_saved = on_saved or (lambda step, files: None)
        self.png = (prompt, extra_pnginfo)
        self.newest: Optional[torch.Tensor] = None
        self._conds = {}

    def _encode(self, text: str):
        """The host's conditioning for ``text`` (cached: the text encoders are frozen)."""
        if text not in self._conds:
            self._conds[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self._conds[text]

    def _sample_one(self, patched, p: SamplePrompt) -> torch.Tensor:
        """One image [1, H, W, 3] for ``p`` from the LoRA-patched model."""
        latent = torch.zeros(1, 16, p.height // 8, p.width // 8)  # what EmptySD3LatentImage makes
        noise = comfy.sample.prepare_noise(latent, p.seed)
        out = comfy.sample.sample(patched, noise, p.steps, p.cfg, self.options.sampler_name, self.options.scheduler,
                                  self._encode(p.prompt), self._encode(p.negative), latent, disable_pbar=True,
                                  seed=p.seed)
        return self.vae.decode(out).float().clamp(0, 1)

    def make(self, step: int, lora_tensors) -> List[dict]:
        """Sample every prompt with ``lora_tensors`` (kohya layout) attached, save the PNGs; returns file infos."""
        import nodes as comfy_nodes  # the host's nodes.py (its SaveImage)

        with torch.no_grad():
            patched, _ = host.model_with_lora(self.model, lora_tensors)
            images = [self._sample_one(patched, p) for p in self.prompts]
        files = []
        prefix = f"{self.options.filename_prefix}_step{step:06d}"
        for p, image in zip(self.prompts, images):
            saved = comfy_nodes.SaveImage().save_images(image, prefix, *self.png)["ui"]["images"]
            files.extend(dict(info, prompt=p.prompt) for info in saved)
        self.newest = _same_size_batch(images)
        self.on_saved(step, files)
        return files


def _same_size_batch(images: List[torch.Tensor]) -> torch.Tensor:
    """Stack images [1, H, W, 3] into one IMAGE batch, resizing any of another size to the first's."""
    h, w = images[0].shape[1:3]
    fitted = [im if im.shape[1:3] == (h, w) else
              comfy.utils.common_upscale(im.movedim(-1, 1), w, h, "bilinear", "center").movedim(1, -1)
              for im in images]
    return torch.cat(fitted)
