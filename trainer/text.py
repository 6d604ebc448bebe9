"""SD3 text-encoder output layout and the sd-scripts text options that act on it.

The host's SD3 text stack returns context [B, 77 + T, 4096]: rows 0-76 hold CLIP-L in channels
0-767 and CLIP-G in 768-2047 (zero-padded to 4096), rows 77.. hold T5-XXL; pooled [B, 2048] is
CLIP-L (0-767) then CLIP-G (768-2047). CLIP is cut to one 77-token chunk, as sd-scripts does.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

CLIP_ROWS = 77
CLIP_L = slice(0, 768)
CLIP_G = slice(768, 2048)
END_TOKENS = {"l": 49407, "g": 49407, "t5xxl": 1}
T5_PAD = 0


def tokens_until_end(ids: Sequence[int], end_token: int) -> List[bool]:
    """Attention mask of one token row: True up to and including the first end token."""
    mask, seen_end = [], False
    for tok in ids:
        mask.append(not seen_end)
        seen_end = seen_end or tok == end_token
    return mask


def fit_t5_tokens(pairs: list, max_length: int) -> list:
    """T5 (token, weight) pairs cut or padded to exactly ``max_length`` (sd-scripts'
    ``t5xxl_max_token_length``); a cut keeps the end token last."""
    ids = [p[0] for p in pairs]
    end = ids.index(END_TOKENS["t5xxl"]) if END_TOKENS["t5xxl"] in ids else len(ids)
    content = list(pairs[:end])[:max_length - 1]
    fitted = content + [(END_TOKENS["t5xxl"], 1.0)]
    return fitted + [(T5_PAD, 1.0)] * (max_length - len(fitted))


def zero_padded_rows(context: torch.Tensor, masks: dict, apply_lg: bool, apply_t5: bool) -> torch.Tensor:
    """Zero the outputs at padded token positions (``apply_lg_attn_mask`` / ``apply_t5_attn_mask``).

    masks: {"l": [77 bools], "g": [77 bools], "t5xxl": [T bools]} for a one-sample context [1, R, 4096].
    """
    out = context.clone()
    if apply_lg:
        for key, channels in (("l", CLIP_L), ("g", CLIP_G)):
            if key in masks:
                keep = torch.tensor(masks[key][:CLIP_ROWS], dtype=out.dtype, device=out.device)
                out[:, :len(keep), channels] *= keep[:, None]
    if apply_t5 and "t5xxl" in masks and out.shape[1] > CLIP_ROWS:
        keep = torch.tensor(masks["t5xxl"], dtype=out.dtype, device=out.device)[: out.shape[1] - CLIP_ROWS]
        out[:, CLIP_ROWS:CLIP_ROWS + len(keep)] *= keep[:, None]
    return out


def drop_encoders(context: torch.Tensor, pooled: torch.Tensor, rates: Sequence[float],
                  generator: Optional[torch.Generator], share=None) -> tuple:
    """Per sample, drop each encoder's output with its rate (clip_l, clip_g, t5 dropout), as
    sd-scripts does for cached outputs: the encoder's channels/rows and pooled part become zero.

    ``share`` (a batches.Share): the draws are made for the whole multi-GPU batch and this
    process keeps its rows, so a sample is dropped alike however the batch is split.
    Returns new (context, pooled); the inputs are not modified.
    """
    if not any(rates):
        return context, pooled
    context, pooled = context.clone(), pooled.clone()
    draws = torch.rand((share.total if share else context.shape[0], 3), generator=generator)
    draws = share.take(draws) if share else draws
    for i in range(context.shape[0]):
        if draws[i, 0] < rates[0]:
            context[i, :CLIP_ROWS, CLIP_L] = 0
            pooled[i, CLIP_L] = 0
        if draws[i, 1] < rates[1]:
            context[i, :CLIP_ROWS, CLIP_G] = 0
            pooled[i, CLIP_G] = 0
        if draws[i, 2] < rates[2]:
            context[i, CLIP_ROWS:] = 0
    return context, pooled
