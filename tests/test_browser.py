"""The editor in a real browser: the real ComfyUI frontend (comfyui-frontend-package, the version the
host's requirements pin) served by the real host, driven by Playwright on the system's Chromium.

Each example workflow loads as the editor saved it, with every node type known, no node in error
and none over another; Run, Cancel and Run in the editor continue the session, a changed setting
starts a new one that the node names, and the chart and the dataset summary come back after a page
reload. Screenshots of each step go to
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
        await new Promise(r => setTimeout(r, 300));  // widgets are laid out on the first draw
        // A known type is built from its /object_info entry (nodeData); a missing one is a bare,
        // errored placeholder.
        return app.graph._nodes.map(n => ({{id: n.id, type: n.type, known: !!n.constructor?.nodeData,
                                            error: !!n.has_errors}}));
    }}""", workflow)


# What a user sees of the loaded graph: nodes covering each other, nodes smaller than their widgets
# need (the rest hidden), and what the editor would save for each node.
LAYOUT_JS = f"""() => {{
    const app = {APP}, ns = app.graph._nodes, T = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const box = (n) => [n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
    const overlaps = [];
    for (const a of ns) for (const b of ns) {{
        const A = box(a), B = box(b);
        if (a !== b && String(a.id) < String(b.id) && A[0] < B[2] && B[0] < A[2] && A[1] < B[3] && B[1] < A[3])
            overlaps.push(`${{a.type}} #${{a.id}} and ${{b.type}} #${{b.id}}`);
    }}
    const cramped = ns.filter((n) => {{ const m = n.computeSize(); return n.size[0] + 0.5 < m[0] || n.size[1] + 0.5 < m[1]; }})
        .map((n) => `${{n.type}} #${{n.id}}: ${{n.size.map(Math.round)}} < ${{n.computeSize().map(Math.round)}}`);
    const saved = JSON.parse(JSON.stringify(app.graph.serialize())).nodes;
    return {{overlaps, cramped, saved: saved.map((n) => ({{id: n.id, pos: n.pos, values: n.widgets_values ?? null}}))}};
}}"""


def _fit_view(page):
    """Zoom the canvas so that the whole graph shows (for the screenshots)."""
    page.evaluate(f"""() => {{
        const app = {APP}, c = app.canvas.canvas, ns = app.graph._nodes;
        const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - 30));
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
        const scale = Math.min(c.clientWidth / (x1 - x0 + 120), (c.clientHeight - 100) / (y1 - y0 + 120));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [-x0 + 100 / scale, -y0 + 110 / scale];
        app.graph.setDirtyCanvas(true, true); }}""")
    page.wait_for_timeout(300)


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads_as_saved_with_nothing_hidden(page, path):
    """Every node known and not red, no node over another (so no widget covered), each node at least
    the size its widgets take, and the file is what this editor saves (every widget value, the
    same positions): it was saved from the editor, not written by hand."""
    workflow = json.loads(path.read_text())
    nodes = _load(page, workflow)
    assert len(nodes) == len(workflow["nodes"])
    assert [n["type"] for n in nodes if not n["known"]] == []
    assert [n["type"] for n in nodes if n["error"]] == []
    layout = page.evaluate(LAYOUT_JS)
    assert layout["overlaps"] == [], f"{path.name}: nodes cover each other (scripts/save_example_workflows.py)"
    assert layout["cramped"] == [], f"{path.name}: nodes too small for their widgets"
    stored = {str(n["id"]): n for n in workflow["nodes"]}
    for node in layout["saved"]:
        mine = stored[str(node["id"])]
        # (a node without widgets: [] in one frontend, no entry in another)
        assert (node["values"] or []) == (mine.get("widgets_values") or []), \
            f"{path.name} #{node['id']} {mine['type']}: widget values"
        assert [round(v) for v in node["pos"]] == [round(v) for v in mine["pos"]], f"{path.name} #{node['id']}"
    xs = {n["type"]: n["pos"][0] for n in workflow["nodes"]}
    assert xs["SD3LoraTrain"] > xs["SD3LoraSettings"] and xs["SD3LoraSave"] > xs["SD3LoraTrain"], \
        "data flows left to right"
    _fit_view(page)
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}.jpg"), type="jpeg", quality=80)
    assert (REPO / "example_workflows" / f"{path.stem}.jpg").exists(), \
        f"example_workflows/{path.stem}.jpg (template browser thumbnail) is missing: copy tests/artifacts/{path.stem}.jpg"


def _click_run(page):
    """The editor's Run button (queue the workflow), as a user clicks it."""
    page.get_by_role("button", name="Run", exact=True).first.click()


def _click_cancel(page):
    """The editor's Cancel button (interrupt the running prompt)."""
    page.get_by_role("button", name="Cancel current run").first.click()


def _view(page, node_id):
    """The train node's live view as the chart draws it."""
    return page.evaluate(f"() => {APP}.graph.getNodeById({json.dumps(node_id)}).sd3lora")


def _shot(page, name):
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


@pytest.mark.slow
def test_run_cancel_run_continues_and_the_node_shows_what_happens(page, sd35m_checkpoint, dataset_dir):
    """What a user does in the editor: Run, Cancel, Run again (continues where it stopped), change a
    setting and Run (a new session, said on the node), reload the page (chart and dataset summary
    come back)."""
    workflow = json.loads((REPO / "example_workflows" / "train_and_preview.json").read_text())
    _load(page, workflow)
    ids = page.evaluate(f"""([ckpt]) => {{
        const app = {APP};
        const node = (type) => app.graph._nodes.find(n => n.type === type);
        const set = (type, name, value) => {{ node(type).widgets.find(w => w.name === name).value = value; }};
        set("CheckpointLoaderSimple", "ckpt_name", ckpt);
        set("SD3LoraImageFolder", "folder", "tiny_dataset");
        set("SD3LoraImageFolder", "resolution", 64);
        set("EmptySD3LatentImage", "width", 64);
        set("EmptySD3LatentImage", "height", 64);
        set("KSampler", "steps", 1);
        set("SD3LoraTrain", "steps", 2000);
        set("SD3LoraSave", "output_name", "browser_test");
        window.sd3loraEvents = [];
        const api = window.comfyAPI?.api?.api ?? app.api;
        api.addEventListener("sd3lora.progress", (e) => window.sd3loraEvents.push(e.detail));
        const t = node("SD3LoraTrain");
        app.canvas.ds.scale = 1.2; app.canvas.ds.offset = [-t.pos[0] + 60, -t.pos[1] + 140];
        app.graph.setDirtyCanvas(true, true);
        return {{train: t.id, dataset: node("SD3LoraImageFolder").id,
                 seedControl: node("SD3LoraSettings").widgets.some(w => /control/.test(w.name))}};
    }}""", [sd35m_checkpoint])
    assert not ids["seedControl"], "the Settings seed must not change by itself between runs"
    train = ids["train"]
    steps_done = f"{APP}.graph.getNodeById({json.dumps(train)}).sd3lora.step"

    _click_run(page)
    page.wait_for_function(f"{steps_done} >= 3", timeout=300_000)
    _shot(page, "ui_1_running")
    _click_cancel(page)
    page.wait_for_function(f"!{APP}.graph.getNodeById({json.dumps(train)}).sd3lora.running", timeout=120_000)
    first = _view(page, train)
    phases = page.evaluate("() => window.sd3loraEvents.map(e => e.phase).filter(Boolean)")
    assert phases and phases[0].startswith("caching latents and text-encoder outputs 0/"), phases
    assert first["note"] == "started a new session" or "new session" in first["note"], first["note"]
    stopped = first["step"]
    history = page.evaluate(f"async () => (await (await fetch('/sd3lora/history?node={train}')).json())")
    assert len(first["losses"]) == stopped == history["step"] == len(history["losses"])  # the chart has every step
    _shot(page, "ui_2_cancelled")

    _click_run(page)
    page.wait_for_function(f"{steps_done} >= {stopped + 3}", timeout=300_000)
    second = _view(page, train)
    assert second["note"] == f"continuing from step {stopped}", second["note"]
    assert second["losses"][:stopped] == first["losses"]  # the same session, continued
    _shot(page, "ui_3_continued")
    _click_cancel(page)
    page.wait_for_function(f"!{APP}.graph.getNodeById({json.dumps(train)}).sd3lora.running", timeout=120_000)

    page.evaluate(f"""() => {{ const n = {APP}.graph._nodes.find(n => n.type === "SD3LoraSettings");
        n.widgets.find(w => w.name === "learning_rate").value = 0.0002; }}""")
    _click_run(page)
    page.wait_for_function(f"{steps_done} >= 1 && /new session/.test("
                           f"{APP}.graph.getNodeById({json.dumps(train)}).sd3lora.note)", timeout=300_000)
    fresh = _view(page, train)
    assert "settings changed (learning_rate 0.0001 -> 0.0002)" in fresh["note"], fresh["note"]
    restart = page.evaluate("() => window.sd3loraEvents.filter(e => e.reset).pop()")
    assert restart["losses"] == [] and restart["step"] == 0  # the chart started again, empty
    assert len(fresh["losses"]) == fresh["step"]
    _shot(page, "ui_4_new_session")
    _click_cancel(page)
    page.wait_for_function(f"!{APP}.graph.getNodeById({json.dumps(train)}).sd3lora.running", timeout=120_000)

    # The dataset summary is on the dataset node, inside it, and comes back after a reload.
    def summary():
        return page.evaluate(f"""() => {{ const n = {APP}.graph.getNodeById({json.dumps(ids["dataset"])});
            return {{text: n.sd3loraSummary ?? "", fits: n.size[1] >= n.computeSize()[1] - 0.5}}; }}""")
    shown = summary()
    assert shown["text"].startswith("8 images") and "bucket" in shown["text"] and shown["fits"], shown
    layout = page.evaluate(LAYOUT_JS)
    assert layout["overlaps"] == [], "the dataset summary made its node cover another"
    _fit_view(page)
    _shot(page, "ui_5_dataset_summary")
    page.reload()
    page.wait_for_function(f"{APP}?.graph?._nodes?.length > 0 && ({APP}.graph.getNodeById({json.dumps(train)})"
                           f"?.sd3lora?.losses?.length ?? 0) > 0", timeout=120_000)
    page.wait_for_function(f"!!{APP}.graph.getNodeById({json.dumps(ids['dataset'])})?.sd3loraSummary", timeout=60_000)
    assert summary()["text"] == shown["text"]
    assert len(_view(page, train)["losses"]) == page.evaluate(
        f"async () => (await (await fetch('/sd3lora/history?node={train}')).json()).step")
    assert not [e for e in page.js_errors if "sd3lora" in e.lower() or "sd3_lora_trainer" in e.lower()]


@pytest.mark.slow
def test_chart_screenshot_shows_both_lines(page):
    """The README picture: the train node after the runs above, with the raw and smoothed lines."""
    train = page.evaluate(f"""() => {{ const app = {APP}; const n = app.graph._nodes.find(n => n.type === "SD3LoraTrain");
        app.canvas.bringToFront?.(n);
        app.canvas.ds.scale = 1.4; app.canvas.ds.offset = [-n.pos[0] + 40, -n.pos[1] + 120];
        app.graph.setDirtyCanvas(true, true); return n.id; }}""")
    assert len(_view(page, train)["losses"]) > 1
    shot = ARTIFACTS / "train_node.png"
    _shot(page, "train_node")
    import numpy as np
    from PIL import Image

    r, g, b = np.asarray(Image.open(shot).convert("RGB")).astype(int).transpose(2, 0, 1)
    assert int(((r > 200) & (g > 80) & (g < 140) & (b < 80)).sum()) > 30, "no smoothed (orange) loss line drawn"


def test_readme_screenshot_is_committed():
    """docs/train_node.png is the README's picture (a copy of tests/artifacts/train_node.png)."""
    assert (REPO / "docs" / "train_node.png").exists()
    assert "docs/train_node.png" in (REPO / "README.md").read_text()


if __name__ == "__main__":  # refresh the committed copies after a run: python tests/test_browser.py
    for p in WORKFLOWS:
        shutil.copy(ARTIFACTS / f"{p.stem}.jpg", REPO / "example_workflows" / f"{p.stem}.jpg")
    (REPO / "docs").mkdir(exist_ok=True)
    shutil.copy(ARTIFACTS / "train_node.png", REPO / "docs" / "train_node.png")
