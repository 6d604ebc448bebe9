"""Names shared by the nodes of this pack."""

CATEGORY = "SD3 LoRA Trainer"
# Custom socket types passed between this pack's nodes.
DATASET = "SD3_LORA_DATASET"
SETTINGS = "SD3_LORA_SETTINGS"
LORA = "SD3_LORA"
SAMPLING = "SD3_LORA_SAMPLING"    # sample-during-training options (SD3 LoRA Sampling node)
TRAIN_STATE = "SD3_LORA_STATE"    # a training state loaded from disk (SD3 LoRA Resume node)
LOSS_MAP = "LOSS_MAP"             # {"loss": [floats]}: the host's own type, so its loss graph node reads it too
NETWORK_ARGS = "SD3_LORA_NETWORK_ARGS"
OPTIMIZER = "SD3_LORA_OPTIMIZER"
ADVANCED = "SD3_LORA_ADVANCED"
SAVE_EVERY = "SD3_LORA_SAVE_EVERY"  # save_every_n_steps options (SD3 LoRA Save Every node)
