"""A real ComfyUI server for the test session (fixture ``comfy_server``).

Import the fixture into conftest.py (``from server_fixture import comfy_server``) so every test
module shares one server; it needs conftest's ``base_dir`` fixture.
"""
from pathlib import Path

import pytest

import headless  # conftest puts the repository on sys.path


@pytest.fixture(scope="session")
def comfy_server(base_dir):
    """One ComfyUI server (``headless.ServerHandle``) on a free loopback port, serving ``base_dir``.

    Its log is ``base_dir/comfyui_server.log``; a failed start shows the log's tail.
    """
    with headless.start_server(base_dir, log_path=Path(base_dir) / "comfyui_server.log", timeout=180) as server:
        yield server
