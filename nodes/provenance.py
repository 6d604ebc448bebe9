"""Provenance: the editor workflow that made a file, written next to it."""
from __future__ import annotations

import json
import os
from typing import Optional


def write_workflow_json(stem: str, extra_pnginfo: Optional[dict]) -> Optional[str]:
    """Write ``<stem>.workflow.json`` with the editor workflow the host passes as ``extra_pnginfo``
    (what SaveImage embeds in PNGs), so the file can be opened in the editor to see or re-run the
    training. Returns the path, or None when the run carried no workflow (an API-format queue)."""
    workflow = (extra_pnginfo or {}).get("workflow")
    if workflow is None:
        return None
    path = stem + ".workflow.json"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(workflow, f)
    os.replace(tmp, path)
    return path
