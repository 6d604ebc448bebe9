"""Provenance: the editor workflow that made a file, written next to it."""
from __future__ import annotations

import json
from typing import Optional

from ..trainer.atomic_files import write_text


def write_workflow_json(stem: str, extra_pnginfo: Optional[dict]) -> Optional[str]:
    """Write ``<stem>.workflow.json`` with the editor workflow the host passes as ``extra_pnginfo``
    (what SaveImage embeds in PNGs), so the file can be opened in the editor to see or re-run the
    training. Returns the path, or None when the run carried no workflow (an API-format queue)."""
    workflow = (extra_pnginfo or {}).get("workflow")
    if workflow is None:
        return None
    return str(write_text(stem + ".workflow.json", json.dumps(workflow)))
