"""sd-scripts' sample prompt lines: ``a cat --w 512 --h 768 --s 28 --l 4.5 --d 7 --n blurry``."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import List, Optional

# Inline option -> (field, type). The same letters as sd-scripts' sample_images.
OPTIONS = {"w": ("width", int), "h": ("height", int), "s": ("steps", int), "l": ("cfg", float),
           "d": ("seed", int), "n": ("negative", str)}
_OPTION_RE = re.compile(r"\s--(\w+)\b")
# Bounds before the model is known (the train node then checks its position table): the largest
# training resolution's area, and the largest bucket side. A 100000 x 100000 sample would need a
# 10 GB latent and far more for attention: the server would be killed for memory.
MAX_SAMPLE_PIXELS = 4096 * 4096
MAX_SAMPLE_SIDE = 8192
MAX_SAMPLE_STEPS = 1000


@dataclass(frozen=True)
class SamplePrompt:
    """One sample to make: the prompt and its sampler settings."""

    prompt: str
    negative: str = ""
    width: int = 0     # 0: the training resolution
    height: int = 0
    steps: int = 20
    cfg: float = 5.0
    seed: int = 0


def parse_line(line: str, defaults: SamplePrompt, line_no: int = 1) -> SamplePrompt:
    """Read one prompt line; options after ``--x`` override ``defaults``.

    Raises:
        ValueError: naming the line and option for an unknown option, a bad number, or a size
            that is not a multiple of 16.

    Example:
        >>> parse_line("a cat --w 512 --s 8", SamplePrompt("")).width
        512
    """
    parts = _OPTION_RE.split(" " + line.strip())
    values = {"prompt": parts[0].strip()}
    for name, raw in zip(parts[1::2], parts[2::2]):
        if name not in OPTIONS:
            raise ValueError(f"sample_prompts line {line_no}: unknown option --{name}; use "
                             + ", ".join(f"--{k} ({v[0]})" for k, v in OPTIONS.items()))
        field, kind = OPTIONS[name]
        try:
            values[field] = kind(raw.strip())
        except ValueError:
            raise ValueError(f"sample_prompts line {line_no}: --{name} needs a {kind.__name__}, got {raw.strip()!r}") from None
    sample = dataclasses.replace(defaults, **values)
    check_size(sample, f"line {line_no}")
    if not 1 <= sample.steps <= MAX_SAMPLE_STEPS:
        raise ValueError(f"sample_prompts line {line_no}: --s (steps) must be 1 to {MAX_SAMPLE_STEPS} "
                         f"(got {sample.steps})")
    if not math.isfinite(sample.cfg):
        raise ValueError(f"sample_prompts line {line_no}: --l (CFG scale) must be a finite number (got {sample.cfg})")
    if not 0 <= sample.seed < 2 ** 64:
        raise ValueError(f"sample_prompts line {line_no}: --d (seed) must be 0 to 2^64 - 1 (got {sample.seed})")
    return sample


def check_size(sample: SamplePrompt, where: str = "line 1", max_side: Optional[int] = None) -> None:
    """Refuse a sample size that is not a multiple of 16 (0 = the training resolution), a side
    above ``max_side`` (the model's position table; MAX_SAMPLE_SIDE when unknown) or an area
    above MAX_SAMPLE_PIXELS, with the limit in the message (``where``: "line 3", "prompt 2")."""
    limit = min(max_side or MAX_SAMPLE_SIDE, MAX_SAMPLE_SIDE)
    for field, flag in (("width", "--w"), ("height", "--h")):
        size = getattr(sample, field)
        if size != 0 and (size < 16 or size % 16):
            raise ValueError(f"sample_prompts {where}: {field} {size} must be a multiple of 16 ({flag}; "
                             f"or 0 for the training resolution)")
        if size > limit:
            whose = "this model's position table covers" if max_side and max_side <= MAX_SAMPLE_SIDE else "the limit is"
            raise ValueError(f"sample_prompts {where}: {field} {size} ({flag}) is too large: {whose} "
                             f"{limit} px; lower {flag}")
    area = sample.width * sample.height
    if area > MAX_SAMPLE_PIXELS:
        raise ValueError(f"sample_prompts {where}: {sample.width}x{sample.height} is {area / 2 ** 20:.1f} "
                         f"Mpx, above the {MAX_SAMPLE_PIXELS // 2 ** 20} Mpx limit for samples (4096x4096, the "
                         f"largest training resolution); lower --w and --h")


def parse_prompts(text: str, defaults: SamplePrompt) -> List[SamplePrompt]:
    """Every non-empty line of ``text`` that is not a ``#`` comment, parsed with :func:`parse_line`."""
    samples = []
    for no, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            samples.append(parse_line(line, defaults, no))
    return samples
