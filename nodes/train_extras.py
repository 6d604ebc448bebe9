"""The side work of one train-node run around the step loop: live view and samples.

Kept out of ``SD3LoraTrain.run`` so the node stays a short recipe: it calls :meth:`RunExtras.before`,
passes :meth:`RunExtras.on_step` to the loop, then :meth:`RunExtras.after`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import host
from .live import LiveRun
from .samples import SampleRunner


class RunExtras:
    """Live events and samples for one queue run of a session.

    Args:
        node_id: the train node's unique id. session: the trainer Session. steps: steps this run.
        model: the train node's MODEL input (samples use a LoRA-patched clone of it).
        sampling: SamplingOptions or None. clip, vae, resolution: for the samples.
        prompt, extra_pnginfo: the host's hidden inputs, written into the sample PNGs.
        note: the session's note (continuing, or why a new session started), shown on the node.
    """

    def __init__(self, node_id, session, steps: int, model, sampling=None, clip=None, vae=None,
                 resolution: int = 512, prompt=None, extra_pnginfo=None, note: str = ""):
        self.session, self.model = session, model
        self.live = LiveRun(node_id, session.state, steps, note)
        self.sampler: Optional[SampleRunner] = None
        self.sampled_this_run = False
        if sampling is not None:
            self.sampler = SampleRunner(sampling, model, clip, vae, resolution, on_saved=self.live.on_samples,
                                        prompt=prompt, extra_pnginfo=extra_pnginfo)

    def _sample(self, step: int) -> None:
        self.sampler.make(step, self.session.state.network.kohya_state_dict(torch.float32))
        self.sampled_this_run = True

    def before(self) -> None:
        """Samples of the untrained LoRA when the session starts and sample_at_first is on."""
        if self.sampler is not None and self.sampler.options.at_first and self.session.state.step == 0:
            self._sample(0)

    def on_step(self, step: int, loss: float, mmdit: torch.nn.Module) -> None:
        """After each step: tell the editor; sample when due.

        The loop has the LoRA wrapped around ``mmdit``'s Linears. Samples go through the host's
        own LoRA patching instead, so the wrappers come off while sampling, and the training model
        is reloaded afterwards (sampling and VAE decoding may have swapped or offloaded it).
        """
        self.live.on_step(step, loss)
        if self.sampler is None or not self.sampler.options.due(step):
            return
        network = self.session.state.network
        network.detach()
        try:
            with torch.compiler.set_stance("force_eager"):  # torch_compile: no inference graphs to compile
                self._sample(step)
        finally:
            host.load_for_training(self.model)
            network.attach(mmdit)

    def after(self) -> torch.Tensor:
        """After a finished run: samples if this run made none; returns the newest samples as an IMAGE
        (a small black image when no Sampling node is connected)."""
        if self.sampler is None:
            return torch.zeros(1, 64, 64, 3)
        if not self.sampled_this_run:
            self._sample(self.session.state.step)
        return self.sampler.newest

    def finish(self) -> None:
        """Tell the editor the run ended (also after Cancel or an error)."""
        self.live.finish()

