"""Pure-PyTorch SD3/SD3.5 MMDiT LoRA training core.

Nothing here imports ComfyUI: the host adapters in ``nodes/`` hand this package a
``torch.nn.Module`` (the MMDiT), pre-computed latents and text-encoder outputs and a
:class:`~.config.TrainConfig`.
"""
