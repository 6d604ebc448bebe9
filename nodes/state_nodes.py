"""Stop and continue across ComfyUI restarts: save a session's full training state, resume from it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from ..trainer import checkpoint
from ..trainer import session as sessions
from ..trainer.periodic_save import newest_step_state
from . import checks
from .common import CATEGORY, LORA, TRAIN_STATE
from .names import check_folder_writable, state_stem, states_folder
from .provenance import write_workflow_json

log = logging.getLogger(__name__)
MISSING_CHOICES = ("error", "start new session")


def resume_stem(state_name: str) -> str:
    """The state Resume reads for ``state_name``: of ``<name>`` and the periodic states
    ``<name>-stepNNNNNNNN`` (Save Every with save_state), the one furthest on; on a tie ``<name>``.
    So after a crash the same name continues from the newest periodic state."""
    stem = state_stem(state_name)
    newest = newest_step_state(states_folder(), os.path.basename(stem))
    if newest is None:
        return stem
    if os.path.exists(stem + ".json") and checkpoint.read_state_json(stem)[checkpoint.PROGRESS]["step"] >= newest[0]:
        return stem
    return str(newest[1])


class SD3LoraSaveState:
    """Write the whole training state (LoRA, optimizer, RNG, data order, losses, settings) to disk."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": (LORA, {"tooltip": "The 'lora' output of 'SD3 LoRA Train'."}),
            "state_name": ("STRING", {"default": "sd3_lora_state", "tooltip": "Name under output/sd3_lora_states "
                           "(no folders); writes <name>.safetensors + <name>.json (--save_state)."}),
        }, "hidden": {"extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves the training state so 'SD3 LoRA Resume' can continue it exactly, even after a restart."

    @classmethod
    def VALIDATE_INPUTS(cls, state_name):
        return checks.report(cls, locals(), checks.given(state_name, state_stem),
                             lambda: check_folder_writable(states_folder()))

    def save(self, lora, state_name, extra_pnginfo=None):
        if lora.state is None:
            raise ValueError("this LoRA carries no training state: connect the 'lora' output of 'SD3 LoRA Train'")
        stem = state_stem(state_name)
        path = str(checkpoint.save_state(stem, lora.state))
        write_workflow_json(stem, extra_pnginfo)
        return {"ui": {"text": [path]}, "result": (path,)}


@dataclass(frozen=True)
class ResumeState:
    """What the Resume node hands the train node: where the state is, and its content (None if missing)."""

    path: str
    state: Optional[dict]


class SD3LoraResume:
    """Load a saved training state; connect it to the train node's 'resume' input."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "state_name": ("STRING", {"default": "sd3_lora_state", "tooltip": "A state written by 'SD3 LoRA Save "
                           "State', or Save Every's output_name with save_state: its name under "
                           "output/sd3_lora_states. Of <name> and the periodic <name>-stepNNNNNNNN states the one "
                           "furthest on is read (--resume)."}),
            "if_missing": (list(MISSING_CHOICES), {"default": "error", "tooltip": "'start new session' lets one "
                           "workflow both start and continue a run: the first queue finds no state yet."}),
        }}

    RETURN_TYPES = (TRAIN_STATE,)
    RETURN_NAMES = ("resume",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Continues training from a saved state (architecture values come from the state)."

    @classmethod
    def VALIDATE_INPUTS(cls, state_name, if_missing):
        # At queue time: a missing or damaged state is named before anything runs.
        def state_files():
            stem = resume_stem(state_name)
            if if_missing != MISSING_CHOICES[1] or os.path.exists(stem + ".json"):
                checkpoint.check_state_files(stem)
        return checks.report(cls, locals(), lambda: state_name is None or state_files())

    @classmethod
    def IS_CHANGED(cls, state_name, if_missing):
        # Re-read when the state on disk was rewritten (e.g. by Save State in the same workflow).
        try:
            stem = resume_stem(state_name)
            return f"{stem}:{os.path.getmtime(stem + '.json')}"
        except (OSError, ValueError):
            return float("nan")

    def load(self, state_name, if_missing):
        stem = resume_stem(state_name)
        if if_missing == MISSING_CHOICES[1] and not os.path.exists(stem + ".json"):
            return (ResumeState(stem, None),)
        return (ResumeState(stem, checkpoint.load_state(stem)),)


def get_or_resume(key: str, fingerprint: dict, start: Callable[[], sessions.Session], resume: Optional[ResumeState],
                  mmdit, config, text_encoders: Optional[dict] = None) -> Tuple[sessions.Session, str]:
    """Like ``sessions.get_or_start``, but start from ``resume``'s saved state unless the session in
    memory already descends from it (same session id, at or past its step): then it continues.

    Returns (session, note for the node).
    """
    if resume is None or resume.state is None:
        session, note = sessions.get_or_start(key, fingerprint, start)
        return session, note + (f"; no saved state at {resume.path} yet" if resume is not None else "")
    saved = resume.state
    saved_id, saved_step = saved[checkpoint.INFO].get("session_id"), saved[checkpoint.PROGRESS]["step"]
    live = sessions.current(key)
    if (live is not None and live.fingerprint == fingerprint and live.info.get("session_id") == saved_id
            and live.state.step >= saved_step):
        return sessions.get_or_start(key, fingerprint, start)
    sessions.forget(key)
    warnings = []

    def start_from_state():
        session = start()
        session.state, found = checkpoint.restore(saved, mmdit, config, text_encoders)
        warnings.extend(found)
        # The LoRA metadata describes the whole run, not only this process's part of it.
        session.info.update({k: saved[checkpoint.INFO][k] for k in ("session_id", "started_at")
                             if k in saved[checkpoint.INFO]})
        return session

    session, _ = sessions.get_or_start(key, fingerprint, start_from_state)
    return session, "; ".join([f"resumed from {resume.path} at step {saved_step}"] + warnings)
