"""Content-keyed store of encoder outputs (VAE latents, text-encoder outputs).

An entry's key is a digest of everything its tensors depend on (image bytes or caption, size,
crop, flip, the encoder's identity and settings), so a changed input rebuilds only that entry and
an unchanged one is found again, in memory within this process or on disk across processes.
Disk entries are safetensors files (never pickle), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional

import safetensors.torch
import torch

from .atomic_files import staged

log = logging.getLogger(__name__)

CACHE_FOLDER_NAME = ".sd3_lora_cache"  # default disk cache folder, inside each image folder
MEMORY_LIMIT_BYTES = 8 * 1024 ** 3    # the in-process store drops its least recently used entries past this
Entry = Dict[str, torch.Tensor]

_MEMORY: "OrderedDict[str, Entry]" = OrderedDict()
_memory_bytes = 0


def cache_key(kind: str, **parts) -> str:
    """A digest of ``kind`` and every part (JSON-able values), e.g. cache_key("latents", image=sha, size=[w, h])."""
    blob = json.dumps([kind, parts], sort_keys=True, default=str).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:40]}"


def _nbytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


def _remember(key: str, entry: Entry) -> None:
    global _memory_bytes
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return
    _MEMORY[key] = entry
    _memory_bytes += _nbytes(entry)
    while _memory_bytes > MEMORY_LIMIT_BYTES and len(_MEMORY) > 1:
        _, old = _MEMORY.popitem(last=False)
        _memory_bytes -= _nbytes(old)


def clear_memory() -> None:
    """Forget every in-memory entry (the disk entries stay)."""
    global _memory_bytes
    _MEMORY.clear()
    _memory_bytes = 0


class EncoderCache:
    """Lookup and store for one caching mode: "memory" (this process), "disk" (memory, and
    safetensors files in a folder given per entry) or "none" (nothing is kept)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.hits = 0
        self.misses = 0

    def get(self, key: str, folder: Optional[Path] = None) -> Optional[Entry]:
        """The stored tensors of ``key`` (CPU), or None. A damaged file is ignored and rebuilt."""
        entry = _MEMORY.get(key) if self.mode != "none" else None
        if entry is None and self.mode == "disk" and folder is not None:
            path = Path(folder) / f"{key}.safetensors"
            if path.is_file():
                try:
                    entry = safetensors.torch.load_file(str(path))
                except Exception as e:  # a truncated or foreign file: rebuild it
                    log.warning("cache file %s is unreadable (%s); encoding again", path, e)
                if entry is not None:
                    _remember(key, entry)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
            if key in _MEMORY:
                _MEMORY.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry, folder: Optional[Path] = None) -> Entry:
        """Store ``entry`` (moved to the CPU, contiguous) under ``key``; returns the stored tensors."""
        entry = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}
        if self.mode == "none":
            return entry
        _remember(key, entry)
        if self.mode == "disk" and folder is not None:
            # Atomic: a crash never leaves a half-written entry under the key.
            with staged([Path(folder) / f"{key}.safetensors"], durable=False) as (temp,):
                safetensors.torch.save_file(entry, str(temp))
        return entry
