"""Train node: runs N steps on a session that persists across queue runs."""
from __future__ import annotations

import logging
import time
import uuid

import torch

import comfy.model_management
import comfy.utils

from ..trainer import session as sessions
from ..trainer.lora_file import detect_variant
from ..trainer.loop import train
from ..trainer.prepare import freeze_base_model, model_signature
from ..trainer.state import build_network, new_train_state
from . import host
from .common import CATEGORY, DATASET, LORA, SETTINGS

log = logging.getLogger(__name__)


class SD3LoraTrain:
    """Train the LoRA for ``steps`` more steps each time the workflow is queued."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD3 / SD3.5 model from 'Load Checkpoint' or 'Load Diffusion Model'."}),
                "clip": ("CLIP", {"tooltip": "The SD3 text encoders (CLIP-L/G, T5) used to encode the captions."}),
                "vae": ("VAE", {"tooltip": "The SD3 VAE used to encode the images."}),
                "dataset": (DATASET, {"tooltip": "Images and captions from a dataset node."}),
                "settings": (SETTINGS, {"tooltip": "LoRA and optimiser settings."}),
                "steps": ("INT", {"default": 100, "min": 1, "max": 1_000_000,
                                  "tooltip": "Steps to train on each queue; queue again to continue the same session."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL", LORA, "STRING")
    RETURN_NAMES = ("model", "lora", "summary")
    OUTPUT_TOOLTIPS = ("A copy of the model with the trained LoRA attached, for KSampler.",
                       "The trained LoRA, for the save node.", "What this run did.")
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = "Trains an SD3 LoRA; queue again to continue from the last step."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # Training has to run on every queue even when no input changed.
        return float("nan")

    def run(self, model, clip, vae, dataset, settings, steps, unique_id=None):
        mmdit = host.require_sd3(model)
        host.check_resolution(mmdit, dataset.resolution)
        key = f"node:{unique_id}"
        with torch.inference_mode(False):
            mmdit = host.load_for_training(model)
            freeze_base_model(mmdit)
            fingerprint = dict(settings.to_dict(), dataset=dataset.fingerprint, model=model_signature(mmdit))
            session, note = sessions.get_or_start(key, fingerprint,
                                                  lambda: self._start(key, fingerprint, model, clip, vae, dataset,
                                                                      settings, mmdit))
            log.info("SD3 LoRA train (%s): %s", key, note)
            start_step = session.state.step
            bar = comfy.utils.ProgressBar(steps)
            t0 = time.perf_counter()
            done = train(mmdit, session.data, session.state, steps, host.compute_dtype(model),
                         on_step=lambda step, loss: bar.update(1),
                         should_stop=comfy.model_management.processing_interrupted,
                         encode_text=lambda captions: host.encode_captions(clip, captions))
            elapsed = time.perf_counter() - t0
        # Cancel: every finished step stays in the session; the next queue continues from it.
        comfy.model_management.throw_exception_if_processing_interrupted()
        snap = sessions.snapshot(session)
        patched, _ = host.model_with_lora(model, snap.tensors)
        summary = (f"{note}; trained steps {start_step + 1}-{session.state.step} ({done} steps, "
                   f"{elapsed / max(done, 1):.2f} s/step); last loss {snap.losses[-1]:.4f}")
        return {"ui": {"text": [summary]}, "result": (patched, snap, summary)}

    @staticmethod
    def _start(key, fingerprint, model, clip, vae, dataset, settings, mmdit):
        """Encode the dataset once and build a fresh LoRA network and optimiser."""
        data = host.encode_dataset(model, clip, vae, dataset.samples)
        network = build_network(mmdit, settings)
        info = {
            "variant": detect_variant(mmdit),
            "resolution": dataset.resolution,
            "num_images": len(dataset.samples),
            "dataset_dirs": {dataset.folder: {"n_repeats": 1, "img_count": len(dataset.samples)}},
            "tag_frequency": dataset.tag_frequency(),
            "started_at": time.time(),
            "session_id": uuid.uuid4().int % 2**31,
        }
        return sessions.Session(key=key, fingerprint=fingerprint, state=new_train_state(settings, network),
                                data=data, info=info)
