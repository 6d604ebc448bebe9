"""Training sessions that outlive one queue run, looked up by the caller's key."""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from . import checkpoint
from .batches import EncodedData
from .state import TrainState, kohya_tensors

MAX_SESSIONS = 4  # each holds its LoRA, optimiser state and encoded data; keep memory bounded


@dataclass
class Session:
    """One training run: its state, its encoded inputs, and what identifies it."""

    key: str
    fingerprint: dict
    state: TrainState
    data: EncodedData
    info: dict  # facts for metadata: variant, dataset dirs, image count, started time...


_SESSIONS: "OrderedDict[str, Session]" = OrderedDict()


def describe_change(old: dict, new: dict) -> str:
    """Which identity entries differ, e.g. "network_dim 16 -> 8, dataset"."""
    changed = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            a, b = old.get(k), new.get(k)
            simple = isinstance(a, (int, float, str, bool)) and isinstance(b, (int, float, str, bool))
            changed.append(f"{k} {a} -> {b}" if simple and len(str(a)) < 40 else k)
    return ", ".join(changed)


def get_or_start(key: str, fingerprint: dict, start: Callable[[], Session]) -> Tuple[Session, str]:
    """The session under ``key`` if its fingerprint still matches, else a new one from ``start()``.

    Returns (session, note); the note says whether it continues or why it restarted.
    """
    old: Optional[Session] = _SESSIONS.get(key)
    if old is not None and json.dumps(old.fingerprint, sort_keys=True) == json.dumps(fingerprint, sort_keys=True):
        _SESSIONS.move_to_end(key)
        return old, f"continuing from step {old.state.step}"
    session = start()
    if old is not None:
        note = f"settings changed ({describe_change(old.fingerprint, fingerprint)}): started a new session at step 0"
    else:
        note = "started a new session"
    _SESSIONS[key] = session
    _SESSIONS.move_to_end(key)
    while len(_SESSIONS) > MAX_SESSIONS:
        _SESSIONS.popitem(last=False)
    return session, note


def current(key: str) -> Optional[Session]:
    """The session under ``key`` (None when there is none), without touching its recency."""
    return _SESSIONS.get(key)


def forget(key: str) -> None:
    """Drop the session under ``key`` (the next run starts fresh)."""
    _SESSIONS.pop(key, None)


@dataclass
class LoraSnapshot:
    """A frozen copy of a session's LoRA at one step: what the save node writes.

    A copy, because the host caches node outputs while the session trains on.
    """

    tensors: dict
    config: object
    info: dict
    step: int
    losses: list
    state: Optional[dict] = None  # trainer.checkpoint.state_dict(): what 'Save State' writes to disk


def snapshot(session: Session) -> LoraSnapshot:
    """Copy the session's LoRA tensors (kohya layout, float32), progress and full training state."""
    st = session.state
    return LoraSnapshot(tensors=kohya_tensors(st, torch.float32), config=st.config,
                        info=dict(session.info), step=st.step, losses=list(st.losses),
                        state=checkpoint.state_dict(st, session.info))
