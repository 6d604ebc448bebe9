"""SD3.5 position-embedding options of sd-scripts, applied to an MMDiT without editing its code:
``pos_emb_random_crop_rate`` (crop the table at a random place instead of the centre) and
``enable_scaled_pos_embed`` (per-resolution sin-cos tables scaled so that every training size
sees the same relative positions)."""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch

MAX_RATIO = 1.5  # a scaled table covers 1.5 x the patched size, so other aspect ratios fit


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[len(pos), dim] sin/cos features with frequencies 1 / 10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double().reshape(-1, 1) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def scaled_sincos_table(dim: int, grid: int, sample_size: int, base_size: int = 16) -> torch.Tensor:
    """[1, grid², dim] sin-cos table whose centre sample_size² region spans positions 0..base_size
    (the spacing of the base grid), so each resolution keeps the same relative positions."""
    coords = (torch.arange(grid, dtype=torch.float64) - (grid - sample_size) / 2) * base_size / sample_size
    rows = coords.view(-1, 1).expand(grid, grid).reshape(-1)
    cols = coords.view(1, -1).expand(grid, grid).reshape(-1)
    # The MMDiT's own tables put the column (width) features first, then the row features.
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float().unsqueeze(0)


def crop_table(table: torch.Tensor, size: int, h: int, w: int, top: int, left: int) -> torch.Tensor:
    """The [1, h·w, D] window at (top, left) of a [1, size², D] table."""
    grid = table.view(1, size, size, table.shape[-1])
    return grid[:, top:top + h, left:left + w].reshape(1, h * w, table.shape[-1])


class PositionEmbedder:
    """Replaces ``mmdit.cropped_pos_embed(hw, device)`` while active.

    Args:
        mmdit: the MMDiT (reads pos_embed, pos_embed_max_size, patch size, hidden size).
        random_crop_rate: probability per forward of a random instead of a centred crop.
        latent_sizes: square-root latent sizes of the training buckets for scaled tables (None = off).
        generator: where the crop decisions and offsets are drawn from.
    """

    def __init__(self, mmdit, random_crop_rate: float = 0.0, latent_sizes: Optional[List[int]] = None,
                 generator: Optional[torch.Generator] = None):
        self.mmdit, self.rate, self.generator = mmdit, random_crop_rate, generator
        self.patch = getattr(mmdit, "patch_size", 2)
        self.tables: Dict[int, Tuple[int, torch.Tensor]] = {}  # max area -> (table size, table)
        if latent_sizes:
            hidden = mmdit.pos_embed.shape[-1]
            patched = sorted({s // self.patch for s in latent_sizes})
            for i, p in enumerate(patched):
                # each table serves areas up to halfway to the next size (the last: up to its own size)
                limit = (p * p + patched[i + 1] ** 2) // 2 if i + 1 < len(patched) else int((p * MAX_RATIO) ** 2)
                size = int(p * MAX_RATIO)
                self.tables[limit] = (size, scaled_sincos_table(hidden, size, p))

    def _table(self, h: int, w: int) -> Tuple[int, torch.Tensor]:
        for limit in sorted(self.tables):
            if h * w <= limit:
                return self.tables[limit]
        if self.tables:
            return self.tables[max(self.tables)]
        return self.mmdit.pos_embed_max_size, self.mmdit.pos_embed

    def __call__(self, hw, device=None) -> torch.Tensor:
        h, w = ((d + 1) // self.patch for d in hw)
        size, table = self._table(h, w)
        if h > size or w > size:
            raise ValueError(f"a {h}x{w}-patch latent does not fit the {size}x{size} position table; "
                             f"lower the resolution")
        top, left = (size - h) // 2, (size - w) // 2
        if self.rate and torch.rand(1, generator=self.generator).item() < self.rate:
            top = int(torch.randint(0, size - h + 1, (1,), generator=self.generator))
            left = int(torch.randint(0, size - w + 1, (1,), generator=self.generator))
        return crop_table(table.to(device), size, h, w, top, left)

    @contextlib.contextmanager
    def active(self):
        """Install on the MMDiT instance for the block's duration (its class is untouched)."""
        if not self.rate and not self.tables:
            yield
            return
        self.mmdit.cropped_pos_embed = self
        try:
            yield
        finally:
            del self.mmdit.cropped_pos_embed


def latent_sizes_for(resolutions) -> List[int]:
    """sd-scripts' latent sizes for scaled tables: round(sqrt(w·h)) / 8 per training resolution."""
    return sorted({round(math.sqrt(w * h)) // 8 for w, h in resolutions})
