"""The editor in a real browser: the real ComfyUI frontend (comfyui-frontend-package, the version the
host's requirements pin) served by the real host, driven by Playwright on the system's Chromium.

Each example workflow loads with every node type known and no node in error; a tiny run draws
points on the train node's loss chart, which comes back after a page reload. Screenshots go to
tests/artifacts/ (git-ignored; tests/artifacts/comfyui-<version>/ for a COMFYUI_DIR host):
train_node.png (the README's docs/train_node.png is a copy) and a thumbnail per example workflow
(copied to example_workflows/<name>.jpg for the template browser).

Nothing here is skipped: a missing frontend package or browser fails the test with the fix.
"""
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (below); under pytest conftest has put it there
    sys.path.append(str(REPO))
from headless import hosts  # noqa: E402

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
_HOST = hosts.host_dir()
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / (
    "" if hosts.is_default(_HOST) else f"comfyui-{hosts.host_version(_HOST)}")
CHROMIUM = os.environ.get("SD3LORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
# First-run tours and the template browser would cover the canvas.
EDITOR_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingNodesWarning": True}
APP = "(window.app ?? window.comfyAPI?.app?.app)"


def _require_tools():
    """Fail (never skip) with the fix when the frontend or the browser is missing."""
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        pytest.fail("comfyui-frontend-package is not installed: run `bash scripts/setup.sh` (requirements-dev.txt)")
    if importlib.util.find_spec("playwright") is None:
        pytest.fail("the playwright Python package is not installed: run `bash scripts/setup.sh`")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: run `bash scripts/setup_browser.sh` (apt-get install chromium)")


def _provide_named_models(base_dir):
    """The checkpoint the example workflows name, as a link to the tiny fixture: newer frontends mark
    a loader whose file is missing as an error, which would hide a real one."""
    names = {n["widgets_values"][0] for wf in WORKFLOWS for n in json.loads(wf.read_text())["nodes"]
             if n["type"] == "CheckpointLoaderSimple"}
    checkpoints = Path(base_dir) / "models" / "checkpoints"
    for name in names:
        if not (checkpoints / name).exists():
            (checkpoints / name).symlink_to((checkpoints / "tiny_sd35m.safetensors").resolve())


@pytest.fixture(scope="module")
def page(comfy_server, base_dir, sd35m_checkpoint):
    _require_tools()
    _provide_named_models(base_dir)
    from playwright.sync_api import sync_playwright

    settings = Path(base_dir) / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    frontend = importlib.metadata.version("comfyui-frontend-package")
    settings.write_text(json.dumps(dict(EDITOR_SETTINGS, **{"Comfy.InstalledVersion": frontend})))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        pg.on("pageerror", lambda err: errors.append(str(err)))
        # Warnings the frontend prints about an extension (deprecated APIs) name it.
        pg.on("console", lambda msg: errors.append(msg.text) if msg.type in ("warning", "error") else None)
        pg.goto(comfy_server.url)
        # Ready when the node definitions are registered, our extension is loaded and the editor has
        # opened its start-up workflow (which would otherwise replace the first one a test loads).
        pg.wait_for_function(f"{APP}?.graph && window.LiteGraph?.createNode?.('SD3LoraTrain')?.constructor?.nodeData"
                             f" && {APP}.extensions?.some(e => e.name === 'sd3lora.LossChart')"
                             f" && {APP}.graph._nodes.length > 0", timeout=120_000)
        pg.js_errors = errors
        yield pg
        browser.close()


def _load(page, workflow):
    """Load an editor workflow; returns [{id, type, known, error}] for its nodes."""
    return page.evaluate(f"""async (wf) => {{
        const app = {APP};
        await app.loadGraphData(wf);
        // A known type is built from its /object_info entry (nodeData); a missing one is a bare,
        // errored placeholder.
        return app.graph._nodes.map(n => ({{id: n.id, type: n.type, known: !!n.constructor?.nodeData,
                                            error: !!n.has_errors}}));
    }}""", workflow)


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads_without_missing_or_red_nodes(page, path):
    workflow = json.loads(path.read_text())
    nodes = _load(page, workflow)
    assert len(nodes) == len(workflow["nodes"])
    assert [n["type"] for n in nodes if not n["known"]] == []
    assert [n["type"] for n in nodes if n["error"]] == []
    page.evaluate(f"""() => {{  // fit the whole graph in the view for the thumbnail
        const app = {APP}, c = app.canvas.canvas, ns = app.graph._nodes;
        const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - 30));
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
        const scale = Math.min(c.clientWidth / (x1 - x0 + 120), (c.clientHeight - 100) / (y1 - y0 + 120));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [-x0 + 100 / scale, -y0 + 110 / scale];
        app.graph.setDirtyCanvas(true, true); }}""")
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}.jpg"), type="jpeg", quality=80)
    assert (REPO / "example_workflows" / f"{path.stem}.jpg").exists(), \
        f"example_workflows/{path.stem}.jpg (template browser thumbnail) is missing: copy tests/artifacts/{path.stem}.jpg"


@pytest.mark.slow
def test_tiny_run_draws_the_loss_chart_and_a_reload_restores_it(page, sd35m_checkpoint, dataset_dir):
    steps = 5
    workflow = json.loads((REPO / "example_workflows" / "train_and_preview.json").read_text())
    _load(page, workflow)
    train_id = page.evaluate(f"""([ckpt, steps]) => {{
        const app = {APP};
        const set = (type, name, value) => app.graph._nodes.filter(n => n.type === type)
            .forEach(n => {{ n.widgets.find(w => w.name === name).value = value; }});
        set("CheckpointLoaderSimple", "ckpt_name", ckpt);
        set("SD3LoraImageFolder", "folder", "tiny_dataset");
        set("SD3LoraImageFolder", "resolution", 64);
        set("EmptySD3LatentImage", "width", 64);
        set("EmptySD3LatentImage", "height", 64);
        set("KSampler", "steps", 2);
        set("SD3LoraTrain", "steps", steps);
        set("SD3LoraSave", "output_name", "browser_test");
        app.queuePrompt(0, 1);
        return app.graph._nodes.find(n => n.type === "SD3LoraTrain").id;
    }}""", [sd35m_checkpoint, steps])
    points = f"{APP}.graph.getNodeById({train_id})?.sd3lora?.losses?.length ?? 0"
    page.wait_for_function(f"({points}) >= {steps}", timeout=300_000)
    view = page.evaluate(f"{APP}.graph.getNodeById({train_id}).sd3lora")
    assert len(view["losses"]) == steps and view["step"] == steps and view["total"] == steps
    assert all(isinstance(v, float) for v in view["losses"])
    # The dataset node shows its summary (counts, bucket table) without changing what is saved.
    dataset_view = page.evaluate(f"""() => {{ const app = {APP};
        const n = app.graph._nodes.find(n => n.type === "SD3LoraImageFolder");
        const saved = app.graph.serialize().nodes.find(s => String(s.id) === String(n.id)).widgets_values;
        return [n.widgets.find(w => w.name === "dataset summary")?.value ?? "", saved.length, n.widgets.length]; }}""")
    assert "image" in dataset_view[0].lower(), dataset_view
    assert dataset_view[1] == dataset_view[2] - 1  # every widget but the summary is saved
    # The chart's smoothed line (orange) is on the canvas, inside the node.
    page.evaluate(f"""() => {{ const app = {APP}; const n = app.graph.getNodeById({train_id});
        app.canvas.bringToFront?.(n);  // over any neighbour the chart's extra height now overlaps
        app.canvas.ds.scale = 1.2; app.canvas.ds.offset = [-n.pos[0] + 80, -n.pos[1] + 160];
        app.graph.setDirtyCanvas(true, true); }}""")
    page.wait_for_timeout(500)
    shot = ARTIFACTS / "train_node.png"
    page.screenshot(path=str(shot))
    import numpy as np
    from PIL import Image

    r, g, b = np.asarray(Image.open(shot).convert("RGB")).astype(int).transpose(2, 0, 1)
    assert int(((r > 200) & (g > 80) & (g < 140) & (b < 80)).sum()) > 30, "no loss line drawn"

    page.reload()
    page.wait_for_function(f"{APP}?.graph && ({points}) >= {steps}", timeout=120_000)
    assert not [e for e in page.js_errors if "sd3lora" in e.lower() or "sd3_lora_trainer" in e.lower()]


def test_readme_screenshot_is_committed():
    """docs/train_node.png is the README's picture (a copy of tests/artifacts/train_node.png)."""
    assert (REPO / "docs" / "train_node.png").exists()
    assert "docs/train_node.png" in (REPO / "README.md").read_text()


if __name__ == "__main__":  # refresh the committed copies after a run: python tests/test_browser.py
    for p in WORKFLOWS:
        shutil.copy(ARTIFACTS / f"{p.stem}.jpg", REPO / "example_workflows" / f"{p.stem}.jpg")
    (REPO / "docs").mkdir(exist_ok=True)
    shutil.copy(ARTIFACTS / "train_node.png", REPO / "docs" / "train_node.png")
