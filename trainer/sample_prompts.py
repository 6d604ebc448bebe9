"""sd-scripts' sample prompt lines: ``a cat --w 512 --h 768 --s 28 --l 4.5 --d 7 --n blurry``."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import List

# Inline option -> (field, type). The same letters as sd-scripts' sample_images.
OPTIONS = {"w": ("width", int), "h": ("height", int), "s": ("steps", int), "l": ("cfg", float),
           "d": ("seed", int), "n": ("negative", str)}
_OPTION_RE = re.compile(r"\s--(\w+)\b")


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
    for field in ("width", "height"):
        size = getattr(sample, field)
        if size != 0 and (size < 16 or size % 16):  # 0 = the training resolution
            raise ValueError(f"sample_prompts line {line_no}: {field} {size} must be a multiple of 16 "
                             f"(or 0 for the training resolution)")
    if sample.steps < 1:
        raise ValueError(f"sample_prompts line {line_no}: --s (steps) must be at least 1")
    return sample


def parse_prompts(text: str, defaults: SamplePrompt) -> List[SamplePrompt]:
    """Every non-empty line of ``text`` that is not a ``#`` comment, parsed with :func:`parse_line`."""
    samples = []
    for no, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            samples.append(parse_line(line, defaults, no))
    return samples
