#!/usr/bin/env python
"""Re-save every ``example_workflows/*.json`` from the real editor, laid out left to right.

    COMFYUI_DIR=/path/to/ComfyUI .venv-<version>/bin/python scripts/save_example_workflows.py

Starts a local ComfyUI (``$COMFYUI_DIR``, else the default host) with this pack, opens each workflow
in the host's own frontend (headless Chromium, as tests/test_browser.py drives it), and saves what
the editor itself serialises: every widget value, the sizes the nodes really take (each node at
least its computed size, the train node with room for its chart), laid out in columns by data
flow (a node sits one column right of the nodes it reads from, dataset nodes at the bottom of
their column, where the summary they show after a run can grow). The node graph (nodes, links,
values, titles) is kept; only sizes and positions change.
"""
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from headless import start_server  # noqa: E402

APP = "(window.app ?? window.comfyAPI?.app?.app)"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
# Nodes that grow after a run (their summary): the bottom of their column.
GROWING = ("SD3LoraImageFolder", "SD3LoraDatasetConfig", "SD3LoraImagesFromGraph")

LAYOUT_JS = """([growing]) => {
  const app = %(app)s, graph = app.graph, nodes = graph._nodes;
  const link = (id) => graph.links?.get?.(id) ?? graph.links?.[id];
  const byId = new Map(nodes.map((n) => [String(n.id), n]));
  const ups = (n) => (n.inputs ?? []).filter((i) => i.link != null).map((i) => link(i.link))
    .filter(Boolean).map((l) => byId.get(String(l.origin_id))).filter(Boolean);
  const downs = new Map(nodes.map((n) => [n, []]));
  nodes.forEach((n) => ups(n).forEach((u) => downs.get(u).push(n)));
  // Column = longest path from a source; then each node moves right next to its nearest reader.
  const col = new Map();
  const depth = (n) => col.has(n) ? col.get(n) : (col.set(n, 0), col.set(n, Math.max(0, ...ups(n).map((u) => depth(u) + 1))), col.get(n));
  nodes.forEach(depth);
  for (let changed = true; changed;) {
    changed = false;
    for (const n of nodes) {
      const readers = downs.get(n);
      if (!readers.length) continue;
      const want = Math.min(...readers.map((r) => col.get(r))) - 1;
      if (want > col.get(n)) { col.set(n, want); changed = true; }
    }
  }
  for (const n of nodes) {  // at least the size the node takes
    const min = n.computeSize();
    n.setSize([Math.max(n.size[0], min[0]), Math.max(n.size[1], min[1])]);
  }
  const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30, gapX = 60, gapY = 30 + title;
  const columns = [...new Set(col.values())].sort((a, b) => a - b);
  let x = 40;
  for (const c of columns) {
    const members = nodes.filter((n) => col.get(n) === c)
      .sort((a, b) => (growing.includes(a.type) - growing.includes(b.type)) || (a.pos[1] - b.pos[1]) || (a.id - b.id));
    let y = 40 + title;
    for (const n of members) { n.pos = [x, y]; y += n.size[1] + gapY; }
    x += Math.max(...members.map((n) => n.size[0])) + gapX;
  }
  graph.setDirtyCanvas(true, true);
  return JSON.stringify(graph.serialize());  // what the editor writes to a file (no undefined fields)
}""" % {"app": APP}


def save_all(url: str) -> None:
    """Load, lay out and re-save each example workflow through the editor at ``url``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        page.wait_for_function(f"{APP}?.graph && {APP}.graph._nodes.length > 0 && "
                               f"{APP}.extensions?.some(e => e.name === 'sd3lora.LossChart')", timeout=120_000)
        for path in sorted((REPO / "example_workflows").glob("*.json")):
            old = json.loads(path.read_text())
            page.evaluate(f"async (wf) => {{ await {APP}.loadGraphData(wf); }}", old)
            page.wait_for_timeout(300)  # the frontend lays out widgets on its first draw
            new = json.loads(page.evaluate(LAYOUT_JS, [list(GROWING)]))
            assert [n["type"] for n in sorted(new["nodes"], key=lambda n: n["id"])] == \
                   [n["type"] for n in sorted(old["nodes"], key=lambda n: n["id"])], path
            path.write_text(json.dumps(new, indent=2) + "\n")
            print(f"saved {path.relative_to(REPO)}: {len(new['nodes'])} nodes")
        browser.close()


def main() -> int:
    with tempfile.TemporaryDirectory() as base:
        (Path(base) / "user" / "default").mkdir(parents=True)
        (Path(base) / "user" / "default" / "comfy.settings.json").write_text(
            json.dumps({"Comfy.TutorialCompleted": True}))
        (Path(base) / "custom_nodes").mkdir()
        (Path(base) / "custom_nodes" / "sd3_lora_trainer").symlink_to(REPO, target_is_directory=True)
        with start_server(base, timeout=180) as server:
            print(f"editor at {server.url}: {server.versions()}")
            save_all(server.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
