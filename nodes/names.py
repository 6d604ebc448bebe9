"""Where the nodes write: ComfyUI's own folders (``models/loras``, ``output``), under plain names.

Every node that writes a file takes a name, never a path: a name with a folder, a leading dot,
``..`` or an absolute path is refused (at queue time, by the nodes' ``VALIDATE_INPUTS``, and again
when they run), so no input can make the server write outside those folders. Reading inputs
(image folders, ``network_weights``) may be absolute paths; relative ones start in the host's
folders too.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

import folder_paths

STATES_SUBFOLDER = "sd3_lora_states"  # under ComfyUI's output folder
SAVE_TO = ("loras", "output")
# The longest suffix the pack appends is "-step00000000.safetensors" (25 bytes); file systems
# allow 255 bytes per name, so this leaves room for it and more.
MAX_NAME_BYTES = 200
_PLAIN = re.compile(r"[\w.\- ]+")
_PREFIX_PART = re.compile(r"[\w.\-% ]+")  # SaveImage's filename_prefix may hold %date% style fields


def _name_problem(value: str, setting: str, example: str) -> Optional[str]:
    """Why ``value`` is not a plain file name (None when it is one)."""
    if not value:
        return f"{setting} is empty: name the file, e.g. {example}"
    if os.path.isabs(value) or value.startswith("~") or "/" in value or "\\" in value:
        return (f"{setting} {value!r} is a path: give a plain name (no folders), e.g. {example}; the file goes "
                f"into ComfyUI's own folder for it")
    if value.startswith(".") or not _PLAIN.fullmatch(value):
        return (f"{setting} {value!r} is not a plain file name: use letters, digits, '_', '-', '.' and spaces, "
                f"not starting with '.', e.g. {example}")
    if len(value.encode("utf-8")) > MAX_NAME_BYTES:
        return (f"{setting} is {len(value.encode('utf-8'))} bytes long; file names here may have at most "
                f"{MAX_NAME_BYTES}: shorten it")
    return None


def plain_name(value: str, setting: str, example: str, extensions: Tuple[str, ...] = (".safetensors",)) -> str:
    """``value`` stripped of spaces and of one of ``extensions`` (``my.safetensors`` names ``my``),
    if it is a plain file name.

    Raises:
        ValueError: naming ``setting`` and the fix otherwise.

    Example:
        >>> plain_name(" my_lora.safetensors ", "output_name", "my_lora")
        'my_lora'
    """
    name = value.strip()
    for ext in extensions:
        if name.lower().endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    problem = _name_problem(name, setting, example)
    if problem:
        raise ValueError(problem)
    return name


def filename_prefix(value: str, setting: str = "filename_prefix") -> str:
    """A SaveImage-style prefix inside the output folder: plain names joined by '/'.

    Raises:
        ValueError: for an absolute prefix, '..', or a part that is not a plain name.
    """
    prefix = value.strip()
    if os.path.isabs(prefix) or prefix.startswith("~") or "\\" in prefix:
        raise ValueError(f"{setting} {value!r} is an absolute path: give a name inside ComfyUI's output folder, "
                         f"e.g. sd3_lora_samples/sample")
    for part in prefix.split("/"):
        if part.startswith(".") or not _PREFIX_PART.fullmatch(part):
            raise ValueError(f"{setting} {value!r}: {part!r} is not a plain name (letters, digits, '_', '-', '.', "
                             f"spaces, not starting with '.'; '/' between folders), e.g. sd3_lora_samples/sample")
    return prefix


def save_folder(save_to: str) -> str:
    """ComfyUI's folder for ``save_to``: the first ``models/loras`` folder, or ``output``."""
    if save_to not in SAVE_TO:
        raise ValueError(f"save_to {save_to!r} is not one of {', '.join(SAVE_TO)}")
    return folder_paths.get_folder_paths("loras")[0] if save_to == "loras" else folder_paths.get_output_directory()


def states_folder() -> str:
    """Where training states go: ``output/sd3_lora_states``."""
    return os.path.join(folder_paths.get_output_directory(), STATES_SUBFOLDER)


def state_stem(state_name: str, setting: str = "state_name") -> str:
    """The path stem of a named state: ``output/sd3_lora_states/<name>`` (a .json or .safetensors
    ending is dropped)."""
    return os.path.join(states_folder(), plain_name(state_name, setting, "my_lora_state", (".json", ".safetensors")))


def writable_problem(folder: str) -> Optional[str]:
    """Why files cannot be created in ``folder`` (or the nearest folder above it that exists)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is a file, not a folder: remove or rename it"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by the ComfyUI process: fix its permissions or choose another folder"
    return None


def lora_path(value: str) -> str:
    """``network_weights``: an absolute path as given, else a file in ComfyUI's ``models/loras``
    (with or without its .safetensors ending)."""
    name = os.path.expanduser(value.strip())
    if not name or os.path.isabs(name):
        return name
    for candidate in (name, name + ".safetensors"):
        found = folder_paths.get_full_path("loras", candidate)
        if found:
            return found
    return os.path.join(folder_paths.get_folder_paths("loras")[0], name)


def check_folder_writable(folder: str) -> None:
    """Refuse a ``folder`` that cannot take new files, naming it and the fix."""
    problem = writable_problem(folder)
    if problem:
        raise ValueError(f"cannot save into {folder}: {problem}")


def check_output(output_name: Optional[str], save_to: Optional[str]) -> None:
    """Queue-time check of a LoRA writer's ``output_name`` and ``save_to`` folder (None: a linked
    input, checked when the node runs)."""
    if output_name is not None:
        plain_name(output_name, "output_name", "my_sd3_lora")
    if save_to is not None:
        check_folder_writable(save_folder(save_to))
