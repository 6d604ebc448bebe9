"""Names shared by the nodes of this pack."""

CATEGORY = "SD3 LoRA Trainer"
# Custom socket types passed between this pack's nodes.
DATASET = "SD3_LORA_DATASET"
SETTINGS = "SD3_LORA_SETTINGS"
LORA = "SD3_LORA"
