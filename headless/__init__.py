"""Run ComfyUI workflows without the browser.

This package talks to a ComfyUI server over HTTP and its websocket only; it never imports
ComfyUI itself, so it works against a local server it starts (:func:`start_server`) as well as
against any running one.

- :mod:`headless.server`: start and stop a local ComfyUI server as a subprocess.
- :mod:`headless.convert`: turn an editor (UI) workflow into the API prompt format, and apply
  ``NODE.input=value`` overrides.
- :mod:`headless.client`: queue a prompt, follow its execution, fetch its history entry.
"""
from .client import WorkflowError, get_history, get_object_info, interrupt, output_files, run_prompt
from .convert import ConversionError, apply_overrides, editor_to_api, is_api_prompt, is_editor_workflow
from .server import ServerHandle, ServerStartError, start_server

__all__ = [
    "ConversionError",
    "ServerHandle",
    "ServerStartError",
    "WorkflowError",
    "apply_overrides",
    "editor_to_api",
    "get_history",
    "get_object_info",
    "interrupt",
    "is_api_prompt",
    "is_editor_workflow",
    "output_files",
    "run_prompt",
    "start_server",
]
