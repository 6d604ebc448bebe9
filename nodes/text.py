"""Caption encoding through the host's SD3 text encoders, with sd-scripts' text options."""
from __future__ import annotations

from typing import Tuple

import torch

from ..trainer.text import CLIP_ROWS, END_TOKENS, fit_t5_tokens, tokens_until_end, zero_padded_rows


def encode_caption(clip, caption: str, t5xxl_max_token_length: int = 256, apply_lg_attn_mask: bool = False,
                   apply_t5_attn_mask: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77 + T, 4096], pooled [1, 2048]) for one caption.

    CLIP-L/G keep their first 77-token chunk and T5 is cut or padded to t5xxl_max_token_length,
    as sd-scripts tokenizes for SD3; padded positions are zeroed when the masks are applied.
    """
    tokens = clip.tokenize(caption)
    for key in ("l", "g"):
        if key in tokens:
            tokens[key] = tokens[key][:1]
    if "t5xxl" in tokens and tokens["t5xxl"]:
        tokens["t5xxl"] = [fit_t5_tokens(tokens["t5xxl"][0], t5xxl_max_token_length)]
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    if apply_lg_attn_mask or apply_t5_attn_mask:
        masks = {k: tokens_until_end([t[0] for t in chunks[0]], END_TOKENS[k])
                 for k, chunks in tokens.items() if chunks and k in END_TOKENS}
        cond = zero_padded_rows(cond, masks, apply_lg_attn_mask, apply_t5_attn_mask and cond.shape[1] > CLIP_ROWS)
    return cond, pooled
