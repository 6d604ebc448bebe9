"""Encoding the dataset once in a multi-process run: rank 0 encodes (and caches) every image and
caption, the other processes receive its tensors and touch no encoder.

The other processes build the same batch source with caching off (no encoder call: every entry
stays empty), then fill its entries with rank 0's tensors, in rank 0's order; an image rank 0
could not decode is left out everywhere. Tensors travel one collective each, not pickled.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

import torch

from . import distributed
from .batches import BucketedData, Record
from .encode import EncodeStats
from .training_data import CacheOptions, TrainingData

Encode = Callable[[TrainingData], Tuple[BucketedData, object]]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensors(record: Record) -> Dict[str, torch.Tensor]:
    """A record's cached tensors under flat names ("view0.latents", "context", ...)."""
    out = {f"view{int(flip)}.{k}": v for flip, view in record.views.items() for k, v in view.items()}
    if record.context is not None:
        out.update(context=record.context, pooled=record.pooled)
    return out


def _parts(source: BucketedData) -> List[Tuple[str, List[Record]]]:
    parts = [("train", source.records)]
    if source.validation is not None:
        parts.append(("validation", source.validation.records))
    return parts


def _manifest(source: BucketedData, samples: list) -> List[dict]:
    """What rank 0 sends: per record, its sample's index and its tensors' names, shapes, dtypes."""
    index = {id(s): i for i, s in enumerate(samples)}
    return [{"part": part, "sample": index[id(r.sample)],
             "tensors": [[k, list(v.shape), _dtype_name(v.dtype)] for k, v in _tensors(r).items()]}
            for part, records in _parts(source) for r in records]


def _fill(record: Record, received: Dict[str, torch.Tensor]) -> Record:
    views: Dict[bool, Dict[str, torch.Tensor]] = {}
    for name, tensor in received.items():
        if name.startswith("view"):
            views.setdefault(name[4] == "1", {})[name.split(".", 1)[1]] = tensor
    return dataclasses.replace(record, views=views, context=received.get("context"), pooled=received.get("pooled"))


def _all_samples(dataset: TrainingData) -> list:
    """Every image of the dataset, training and held-out, in one fixed order (the same in every process)."""
    return [s for g in dataset.groups for s in g.samples + g.validation]


def encode_once(encode: Encode, dataset: TrainingData) -> Tuple[BucketedData, EncodeStats]:
    """``encode(dataset)`` on rank 0 and the same batch source on every process; the stats are
    rank 0's (empty elsewhere). In a single process this is ``encode(dataset)``."""
    if not distributed.active():
        return encode(dataset)
    samples = _all_samples(dataset)
    if distributed.is_main():
        source, stats = encode(dataset)
        manifest = distributed.broadcast_json(_manifest(source, samples))
        for entry, record in zip(manifest, [r for _, records in _parts(source) for r in records]):
            tensors = _tensors(record)
            for name, _, _ in entry["tensors"]:
                distributed.broadcast_tensor(tensors[name].contiguous())
        return source, stats
    uncached = dataclasses.replace(dataset, cache=CacheOptions("none", "none", dataset.cache.folder))
    source, _ = encode(uncached)
    manifest = distributed.broadcast_json()
    by_sample = {(part, id(r.sample)): r for part, records in _parts(source) for r in records}
    filled: Dict[str, List[Record]] = {"train": [], "validation": []}
    for entry in manifest:
        received = {name: distributed.broadcast_tensor(None, shape, getattr(torch, dtype))
                    for name, shape, dtype in entry["tensors"]}
        record = by_sample[(entry["part"], id(samples[entry["sample"]]))]
        filled[entry["part"]].append(_fill(record, received))
    source.records = filled["train"]
    if source.validation is not None:
        source.validation.records = filled["validation"]
    return source, EncodeStats()
