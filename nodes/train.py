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
from ..trainer.precision import precision_warning
from ..trainer.prepare import check_fp8_base, freeze_base_model, model_signature
from ..trainer.state import build_network, build_text_networks, new_train_state
from . import checks, host, live
from .common import CATEGORY, DATASET, LORA, LOSS_MAP, SAMPLING, SAVE_EVERY, SETTINGS, TRAIN_STATE
from .samples import check_sample_sizes
from .save_every import save_if_due
from .state_nodes import get_or_resume
from .train_extras import RunExtras

log = logging.getLogger(__name__)


def refuse_if_followers_cannot_run(prompt, unique_id) -> None:
    """Refuse to train when a node of this pack after the train node would refuse its inputs.

    The host runs a prompt's valid outputs even when another output node is invalid, so a bad
    Save name next to a preview would train (for the preview) and never save: the steps would be
    lost, and a re-queue with a fixed name would train further instead of saving this run.
    """
    from . import NODE_CLASS_MAPPINGS  # the package's, complete once a node runs

    problems = checks.downstream_problems(prompt, unique_id, NODE_CLASS_MAPPINGS)
    if problems:
        raise ValueError("not training, because a node after this one would not run: " + "; ".join(problems)
                         + ". Fix it and queue again")


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
            "optional": {
                "sampling": (SAMPLING, {"tooltip": "Preview samples during training ('SD3 LoRA Sampling')."}),
                "resume": (TRAIN_STATE, {"tooltip": "Continue from a saved state ('SD3 LoRA Resume')."}),
                "save_every": (SAVE_EVERY, {"tooltip": "Write LoRA files during the run ('SD3 LoRA Save Every')."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ("MODEL", LORA, "STRING", LOSS_MAP, "IMAGE", "CLIP")
    RETURN_NAMES = ("model", "lora", "summary", "loss", "samples", "clip")
    OUTPUT_TOOLTIPS = ("A copy of the model with the trained LoRA attached, for KSampler.",
                       "The trained LoRA, for the save node.", "What this run did.",
                       "The session's loss per step ({'loss': [...]}), for 'SD3 LoRA Loss Plot'.",
                       "The newest samples (with a Sampling node connected; else a black 64x64 image).",
                       "The CLIP with the text-encoder LoRA attached (the input CLIP when only the MMDiT is trained).")
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = "Trains an SD3 LoRA; queue again to continue from the last step."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        # Training has to run on every queue even when no input changed.
        return float("nan")

    def run(self, model, clip, vae, dataset, settings, steps, sampling=None, resume=None, save_every=None,
            unique_id=None, prompt=None, extra_pnginfo=None):
        refuse_if_followers_cannot_run(prompt, unique_id)
        mmdit = host.require_sd3(model)
        host.check_resolution(mmdit, dataset.resolution)
        check_sample_sizes(sampling, dataset.resolution, host.max_image_side(mmdit))
        check_fp8_base(mmdit, settings.fp8_base)
        host.check_compile_attention(settings, model)
        key = f"node:{unique_id}"
        slow_dtype = precision_warning(settings.mixed_precision, model.load_device)
        if slow_dtype:
            log.warning("SD3 LoRA train: %s", slow_dtype)
        with torch.inference_mode(False):
            mmdit = host.load_for_training(model)
            freeze_base_model(mmdit)
            fingerprint = dict(settings.to_dict(), dataset=dataset.fingerprint, model=model_signature(mmdit))
            try:
                session, note = get_or_resume(key, fingerprint,
                                              lambda: self._start(key, fingerprint, model, clip, vae, dataset,
                                                                  settings, mmdit, unique_id), resume, mmdit,
                                              settings, host.text_encoder_modules(clip))
            except BaseException:
                live.phase_stopped(unique_id)  # e.g. Cancel while caching: the node says so
                raise
            log.info("SD3 LoRA train (%s): %s", key, note)
            start_step = session.state.step
            bar = comfy.utils.ProgressBar(steps)
            extras = RunExtras(unique_id, session, steps, model, sampling, clip, vae, dataset.resolution,
                               prompt, extra_pnginfo, note=note)
            text_options = host.text_options(settings)
            text_networks = session.state.text_networks
            dtype = host.compute_dtype(model)

            def after_step(step, loss):
                """Live view and samples, validation, step saves, then the progress bar, after each step.

                The bar comes last: the host's progress hook raises when Cancel was pressed, and
                the finished step must still reach the chart and its due save."""
                extras.on_step(step, loss, mmdit)
                host.maybe_validate(session, mmdit, step, dtype, clip, dataset, settings)
                save_if_due(save_every, session, step)
                bar.update(1)

            def encode_text(captions):
                return host.encode_captions(clip, captions, text_options, grad=bool(text_networks))

            t0 = time.perf_counter()
            try:
                extras.before()
                with host.text_loras_attached(clip, text_networks), host.training_attention(model, settings):
                    done = train(mmdit, session.data, session.state, steps, dtype, on_step=after_step,
                                 should_stop=comfy.model_management.processing_interrupted, encode_text=encode_text)
                elapsed = time.perf_counter() - t0
                # Cancel: every finished step stays in the session; the next queue continues from it.
                comfy.model_management.throw_exception_if_processing_interrupted()
                samples = extras.after()
            finally:
                extras.finish()
        snap = sessions.snapshot(session)
        patched, patched_clip = host.model_with_lora(model, snap.tensors, clip)
        summary = (f"{note}; trained steps {start_step + 1}-{session.state.step} ({done} steps, "
                   f"{elapsed / max(done, 1):.2f} s/step); last loss {snap.losses[-1]:.4f}")
        if slow_dtype:
            summary = f"warning: {slow_dtype}\n{summary}"
        # Files that stopped decoding since the dataset node scanned them: on the node, not only in the log.
        summary += "".join(f"\nwarning: skipped when encoding: {s}" for s in session.info.get("skipped_when_encoding", ()))
        validation = session.info.get("validation_loss")
        if validation:
            summary += f"; validation loss {validation[-1][1]:.4f} at step {validation[-1][0]}"
        if settings.verbose:
            summary += "\ntrained modules:\n" + "\n".join(
                f"{name:60} rank {m.rank}" for net in [session.state.network, *text_networks.values()]
                for name, m in net.loras.items())
        return {"ui": {"text": [summary]},
                "result": (patched, snap, summary, {"loss": list(snap.losses)}, samples, patched_clip)}

    @staticmethod
    def _start(key, fingerprint, model, clip, vae, dataset, settings, mmdit, node_id=None, encode=None):
        """Encode the dataset (or find it in the cache) and build a fresh LoRA network and optimiser;
        the editor shows the caching's progress on the node. ``encode``: host.encode_dataset's
        signature (the command line's multi-process runs encode once)."""
        host.check_resolution(mmdit, dataset.max_side)  # buckets may be longer than the resolution
        text_networks = build_text_networks(host.text_encoder_modules(clip), settings)
        if text_networks and dataset.cache.text != "none":
            raise ValueError("network_train_unet_only is off, so the text encoders are trained and their outputs "
                             "change every step: set the dataset's cache_text_encoder_outputs to none")
        network = build_network(mmdit, settings)  # before encoding: a network_weights misfit costs nothing
        what = caching_label(dataset.cache)
        shown = (lambda done, total: live.phase(node_id, f"{what} {done}/{total}")) if node_id is not None else None
        data, stats = (encode or host.encode_dataset)(model, clip, vae, dataset, settings, shown)
        info = dict(dataset.metadata_info(),
                    variant=detect_variant(mmdit),
                    num_batches_per_epoch=data.num_batches(settings.train_batch_size),
                    data_note=f"{stats}" + "".join(f"; skipped {s}" for s in stats.skipped),
                    skipped_when_encoding=list(stats.skipped),
                    # files that could not be decoded now count with those the dataset node skipped
                    num_skipped_images=len(dataset.skipped) + len(stats.skipped),
                    started_at=time.time(),
                    session_id=uuid.uuid4().int % 2**31)
        return sessions.Session(key=key, fingerprint=fingerprint, state=new_train_state(settings, network, text_networks),
                                data=data, info=info)


def caching_label(cache) -> str:
    """What the caching pass before the first step does, for the node: "caching latents 3/8"."""
    parts = [name for name, mode in (("latents", cache.latents), ("text-encoder outputs", cache.text))
             if mode != "none"]
    return f"caching {' and '.join(parts)}" if parts else "reading images"
