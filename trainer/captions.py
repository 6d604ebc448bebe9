"""Caption processing per step, as sd-scripts' ``BaseDataset.process_caption`` does it: prefix and
suffix, caption dropout, wildcards, tag shuffle with kept leading tokens, tag dropout."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    """The caption keys of an sd-scripts subset (defaults as sd-scripts')."""

    class_tokens: str = ""                   # caption of images without a caption file
    caption_prefix: str = ""                 # text put before every caption
    caption_suffix: str = ""                 # text put after every caption
    caption_separator: str = ","             # separates tags
    shuffle_caption: bool = False            # shuffle the tags each step
    keep_tokens: int = 0                     # leading tags kept in place when shuffling
    keep_tokens_separator: str = ""          # or: tags before this separator are kept
    caption_dropout_rate: float = 0.0        # chance of an empty caption
    caption_dropout_every_n_epochs: int = 0  # empty captions every n-th epoch
    caption_tag_dropout_rate: float = 0.0    # chance of dropping each tag
    enable_wildcard: bool = False            # {a|b|c} choices and one random line of a multi-line caption

    def varies_per_step(self) -> bool:
        """Whether the processed caption can change between steps (then its encoding cannot be cached)."""
        return (self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0
                or self.caption_tag_dropout_rate > 0 or self.enable_wildcard)


def fixed_caption(caption: str, opts: CaptionOptions) -> str:
    """The caption without random processing: prefix + first line (or all lines) + suffix.
    Used for cached text-encoder outputs and for validation."""
    if not opts.enable_wildcard:
        caption = caption.split("\n")[0]
    return _affix(caption, opts)


def _affix(caption: str, opts: CaptionOptions) -> str:
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix
    return caption


def _wildcards(caption: str, rng: random.Random) -> str:
    """One random line of a multi-line caption, then each ``{a|b|c}`` replaced by one choice;
    ``{{`` and ``}}`` stand for literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_, close = "\x00<", ">\x00"  # placeholders that cannot occur in a text file's caption
    caption = caption.replace("{{", open_).replace("}}", close)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_, "{").replace(close, "}")


def _split(text: str, sep: str) -> list:
    return [t.strip() for t in text.split(sep) if t.strip()]


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int = 1) -> str:
    """The caption for one step (``epoch`` counts from 1, as sd-scripts' ``current_epoch``)."""
    caption = _affix(caption, opts)
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    if opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0:
        dropped = True
    if dropped:
        return ""
    caption = _wildcards(caption, rng) if opts.enable_wildcard else caption.split("\n")[0]
    if not (opts.shuffle_caption or opts.caption_tag_dropout_rate > 0):
        return caption
    sep, keep_sep = opts.caption_separator, opts.keep_tokens_separator
    fixed, suffix = [], []
    if keep_sep and keep_sep in caption:
        fixed_part, flex_part = caption.split(keep_sep, 1)
        if keep_sep in flex_part:
            flex_part, suffix_part = flex_part.split(keep_sep, 1)
            suffix = _split(suffix_part, sep)
        fixed, flex = _split(fixed_part, sep), _split(flex_part, sep)
    else:
        tokens = [t.strip() for t in caption.strip().split(sep)]
        fixed, flex = tokens[:opts.keep_tokens], tokens[opts.keep_tokens:]
    if opts.shuffle_caption:
        rng.shuffle(flex)
    if opts.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)
