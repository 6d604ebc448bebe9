"""The command line's training run: the train node's recipe (``nodes/train.py``) for a whole run,
with sd-scripts' epochs, step/epoch saves, states, samples and logs, in one process or several.

The same calls as the node, in the same order (``host.load_for_training``, ``freeze_base_model``,
the node's session start, ``trainer.loop.train`` with the node's text encoding), so a command
line and its workflow (``--write_workflow``) train the same LoRA.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..nodes import host
from ..nodes.dataset import SD3LoraDatasetConfig, SD3LoraImageFolder
from ..nodes.samples import SamplingOptions, SD3LoraSampling
from ..nodes.state_nodes import ResumeState, get_or_resume
from ..nodes.train import SD3LoraTrain
from ..nodes.train_extras import RunExtras
from ..trainer import checkpoint, distributed
from ..trainer.batches import BucketedData, Record
from ..trainer.config import TrainConfig
from ..trainer.loop import train
from ..trainer.precision import precision_warning
from ..trainer.prepare import check_fp8_base, freeze_base_model, model_signature
from ..trainer.shared_encoding import encode_once
from ..trainer.training_data import TrainingData
from .progress import StepBar, open_log
from .saving import Saver, resume_stem
from .translate import DatasetSpec, Plan, Sampling

log = logging.getLogger("sd3_train_network")
KEY = "cli"  # the session key (one run per process)
DATASET_NODES = {"SD3LoraImageFolder": SD3LoraImageFolder, "SD3LoraDatasetConfig": SD3LoraDatasetConfig}


def build_dataset(spec: DatasetSpec) -> Tuple[TrainingData, str]:
    """The dataset node's outputs (TrainingData, summary) for its inputs, as the workflow runs it.

    Its unwrapped function: the nodes raise the pack's errors as builtin types for the editor
    (``nodes/errors.py``), and the command line needs a ``DatasetError`` to name its argument."""
    load = DATASET_NODES[spec.node].load
    return getattr(load, "__wrapped__", load)(DATASET_NODES[spec.node](), **spec.inputs)


def batches_per_epoch(dataset: TrainingData, batch_size: int, world: int = 1) -> int:
    """Batches (of ``batch_size`` x processes) in one epoch: each image times its repeats,
    batched within buckets, as the batch source counts them."""
    records = [Record(s, (k, *s.bucket), r, 1.0) for k, g in enumerate(dataset.groups)
               for s, r in zip(g.samples, dataset.repeats(g)) if r > 0]
    data = BucketedData(records, {k: g.options.batch_size for k, g in enumerate(dataset.groups)})
    return (distributed.RankShard(data, 0, world) if world > 1 else data).num_batches(batch_size)


@dataclass(frozen=True)
class Length:
    """How long the run is: optimiser steps per epoch and the step it stops at."""

    steps_per_epoch: int
    total_steps: int


def run_length(plan: Plan, dataset: TrainingData, world: int = 1) -> Tuple[TrainConfig, Length]:
    """The config with sd-scripts' epoch arithmetic applied (--max_train_epochs sets
    max_train_steps to epochs x steps per epoch), and where the run stops (--steps, else max_train_steps)."""
    config = plan.config
    per_epoch = max(1, -(-batches_per_epoch(dataset, config.train_batch_size, world)
                         // config.gradient_accumulation_steps))
    if plan.max_train_epochs:
        config = dataclasses.replace(config, max_train_steps=plan.max_train_epochs * per_epoch)
    return config, Length(per_epoch, plan.steps or config.max_train_steps)


@dataclass(frozen=True)
class EpochSampling(SamplingOptions):
    """The Sampling node's options, also due at the end of every N-th epoch (--sample_every_n_epochs)."""

    every_n_epochs: int = 0
    steps_per_epoch: int = 1

    def due(self, step: int) -> bool:
        every = self.every_n_epochs * self.steps_per_epoch
        return super().due(step) or (every > 0 and step % every == 0)


def sampling_options(sampling: Optional[Sampling], output_name: str, steps_per_epoch: int) -> Optional[EpochSampling]:
    """The Sampling node's options for the --sample_* arguments (PNGs under <output_dir>/sample/)."""
    if sampling is None:
        return None
    node = SD3LoraSampling().build(sampling.prompts, sampling.every_n_steps, sampling.at_first, "euler",
                                   "sgm_uniform", f"sample/{output_name}")[0]
    fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    return EpochSampling(**fields, every_n_epochs=sampling.every_n_epochs, steps_per_epoch=steps_per_epoch)


def _start_session(plan, config, dataset, model, clip, vae, mmdit):
    """The node's session start (encoding once over all processes), or the --resume state restored."""
    fingerprint = dict(config.to_dict(), dataset=dataset.fingerprint, model=model_signature(mmdit))

    def encode(m, c, v, data, settings, on_progress=None):
        return encode_once(lambda d: host.encode_dataset(m, c, v, d, settings), data)

    resume = None
    if plan.resume:
        stem = resume_stem(plan.resume)
        resume = ResumeState(str(stem), checkpoint.load_state(stem))
    start = lambda: SD3LoraTrain._start(KEY, fingerprint, model, clip, vae, dataset, config, mmdit, encode=encode)  # noqa: E731
    return get_or_resume(KEY, fingerprint, start, resume, mmdit, config, host.text_encoder_modules(clip))


def train_run(plan: Plan, dataset: TrainingData, model, clip, vae, workflow: Optional[dict] = None) -> Optional[str]:
    """Train until the run's last step; rank 0 writes the files. Returns the LoRA's path (rank 0)."""
    main, world = distributed.is_main(), distributed.world_size()
    config, length = run_length(plan, dataset, world)
    mmdit = host.require_sd3(model)
    host.check_resolution(mmdit, dataset.resolution)
    check_fp8_base(mmdit, config.fp8_base)
    host.check_compile_attention(config, model)
    slow = precision_warning(config.mixed_precision, model.load_device)
    if slow:
        log.warning("%s", slow)
    with torch.inference_mode(False):
        mmdit = host.load_for_training(model)
        freeze_base_model(mmdit)
        session, note = _start_session(plan, config, dataset, model, clip, vae, mmdit)
        log.info("%s; steps %d-%d of %d (%d per epoch)", note, session.state.step + 1, length.total_steps,
                 config.max_train_steps, length.steps_per_epoch)
        if world > 1:
            session.data = distributed.RankShard(session.data, distributed.rank(), world)
        steps = max(0, length.total_steps - session.state.step)
        extras = RunExtras(KEY, session, steps, model,
                           sampling_options(plan.sampling, plan.outputs.output_name, length.steps_per_epoch)
                           if main else None, clip, vae, dataset.resolution, None, workflow and {"workflow": workflow})
        saver = Saver(plan.outputs, session, length.steps_per_epoch, length.total_steps,
                      workflow and {"workflow": workflow}) if main else None
        _steps(session, mmdit, model, clip, dataset, config, steps, length, extras, saver, plan)
    if not distributed.same_on_all_ranks(session.state.network.parameters()):
        raise RuntimeError("the processes hold different LoRAs after training: a collective went wrong")
    if world > 1:
        log.info("all %d processes hold the same LoRA", world)
    return saver.final() if main else None


def _steps(session, mmdit, model, clip, dataset, config, steps, length, extras, saver, plan) -> None:
    """The step loop of the run, with what follows each step: bar, log, samples, validation, saves."""
    main = saver is not None
    state = session.state
    bar = StepBar(state.step, length.total_steps, enabled=main)
    tb = open_log(**plan.log) if main else None
    text_networks, text_options, dtype = state.text_networks, host.text_options(config), host.compute_dtype(model)

    def after_step(step, loss):
        lr = state.optimizer.param_groups[0]["lr"]
        bar.update(loss, lr)
        if not main:
            return
        if tb is not None:
            tb.step(step, loss, lr)
        extras.on_step(step, loss, mmdit)
        host.maybe_validate(session, mmdit, step, dtype, clip, dataset, config)
        saver.after_step(step)

    def encode_text(captions):
        return host.encode_captions(clip, captions, text_options, grad=bool(text_networks))

    try:
        extras.before()
        with host.text_loras_attached(clip, text_networks), host.training_attention(model, config):
            train(mmdit, session.data, state, steps, dtype, on_step=after_step, encode_text=encode_text)
        extras.after()
    finally:
        extras.finish()
        bar.close()
        if tb is not None:
            tb.close()
