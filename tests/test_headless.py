"""The headless runner: editor-to-API conversion, overrides, the client and the CLI.

Conversion tests use the /object_info of a real ComfyUI server; expected prompts are written out
by hand. Only stock nodes are used, so these tests do not depend on the pack's own nodes.
"""
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from headless import (ConversionError, ServerStartError, WorkflowError, apply_overrides, editor_to_api,
                      get_object_info, output_files, run_prompt, start_server)
from headless.client import decode_binary_frame

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "scripts" / "run_workflow.py"


# --- building editor-format workflows ------------------------------------------------------------

class EditorGraph:
    """Builds an editor (UI) workflow the way the editor saves it (links as 6-item lists)."""

    def __init__(self):
        self.nodes = []
        self.links = []

    def add(self, node_id, kind, widgets=None, inputs=(), outputs=(), mode=0, title=None):
        """Add a node. ``inputs``: (name, type) or (name, type, "widget") for a widget's input slot."""
        node = {"id": node_id, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": len(self.nodes),
                "mode": mode, "properties": {},
                "inputs": [self._input(spec) for spec in inputs],
                "outputs": [{"name": t, "type": t, "links": []} for t in outputs]}
        if widgets is not None:
            node["widgets_values"] = widgets
        if title is not None:
            node["title"] = title
        self.nodes.append(node)
        return self

    @staticmethod
    def _input(spec):
        entry = {"name": spec[0], "type": spec[1], "link": None}
        if len(spec) > 2:
            entry["widget"] = {"name": spec[0]}
        return entry

    def connect(self, src, src_slot, dst, input_name):
        """Link output ``src_slot`` of node ``src`` to the input named ``input_name`` of node ``dst``."""
        source = self._node(src)
        target = self._node(dst)
        slot = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == input_name)
        link_id = len(self.links) + 1
        kind = target["inputs"][slot]["type"]
        self.links.append([link_id, src, src_slot, dst, slot, kind])
        target["inputs"][slot]["link"] = link_id
        source["outputs"][src_slot]["links"].append(link_id)
        return self

    def _node(self, node_id):
        return next(n for n in self.nodes if n["id"] == node_id)

    def workflow(self):
        return {"last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


KSAMPLER_INPUTS = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                   ("latent_image", "LATENT"), ("seed", "INT", "widget"), ("steps", "INT", "widget")]


def txt2img_workflow(ckpt="sd3_tiny.safetensors"):
    """Checkpoint -> Reroute(CLIP) -> 2 prompts -> KSampler -> VAEDecode -> SaveImage, a muted
    PreviewImage and a Note."""
    g = EditorGraph()
    g.add(4, "CheckpointLoaderSimple", [ckpt], outputs=["MODEL", "CLIP", "VAE"])
    g.add(10, "Reroute", inputs=[("", "*")], outputs=["CLIP"])
    g.add(6, "CLIPTextEncode", ["a photo of a cat"], [("clip", "CLIP"), ("text", "STRING", "widget")],
          ["CONDITIONING"], title="Positive")
    g.add(7, "CLIPTextEncode", ["blurry"], [("clip", "CLIP"), ("text", "STRING", "widget")],
          ["CONDITIONING"], title="Negative")
    g.add(5, "EmptyLatentImage", [64, 48, 1], outputs=["LATENT"])
    g.add(3, "KSampler", [42, "randomize", 20, 7.5, "euler", "normal", 1.0], KSAMPLER_INPUTS, ["LATENT"])
    g.add(8, "VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=["IMAGE"])
    g.add(9, "SaveImage", ["headless_test"], [("images", "IMAGE")])
    g.add(12, "PreviewImage", inputs=[("images", "IMAGE")], mode=2)
    g.add(13, "Note", ["just a note"])
    g.connect(4, 0, 3, "model").connect(4, 1, 10, "").connect(10, 0, 6, "clip").connect(10, 0, 7, "clip")
    g.connect(6, 0, 3, "positive").connect(7, 0, 3, "negative").connect(5, 0, 3, "latent_image")
    g.connect(3, 0, 8, "samples").connect(4, 2, 8, "vae").connect(8, 0, 9, "images").connect(8, 0, 12, "images")
    return g.workflow()


def empty_image_workflow(prefix):
    """EmptyImage (8x8) -> SaveImage: runs in well under a second on the CPU."""
    g = EditorGraph()
    g.add(1, "EmptyImage", [8, 8, 1, 0], outputs=["IMAGE"])
    g.add(2, "SaveImage", [prefix], [("images", "IMAGE")])
    g.connect(1, 0, 2, "images")
    return g.workflow()


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return get_object_info(comfy_server.url)


# --- conversion ----------------------------------------------------------------------------------

def test_editor_to_api_stock_workflow(object_info):
    """Widget values land in the right inputs, the seed's control value is skipped, links follow the
    Reroute, and the muted node and the Note are dropped."""
    expected = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3_tiny.safetensors"},
              "_meta": {"title": "Load Checkpoint"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]},
              "_meta": {"title": "Positive"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]},
              "_meta": {"title": "Negative"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1},
              "_meta": {"title": "Empty Latent Image"}},
        "3": {"class_type": "KSampler",
              "inputs": {"seed": 42, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                         "latent_image": ["5", 0]},
              "_meta": {"title": "KSampler"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
              "_meta": {"title": "VAE Decode"}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "headless_test", "images": ["8", 0]},
              "_meta": {"title": "Save Image"}},
    }
    assert editor_to_api(txt2img_workflow(), object_info) == expected


def test_editor_to_api_bypass_and_primitives(object_info):
    """Bypassed nodes pass their same-typed input through (by slot, then by type); PrimitiveNode
    values fill the widgets they feed; a linked widget input takes the link over its value."""
    g = EditorGraph()
    g.add(4, "CheckpointLoaderSimple", ["m.safetensors"], outputs=["MODEL", "CLIP", "VAE"])
    g.add(20, "LoraLoader", ["l.safetensors", 1.0, 1.0], [("model", "MODEL"), ("clip", "CLIP")],
          ["MODEL", "CLIP"], mode=4)
    g.add(30, "PrimitiveNode", ["from a primitive"], outputs=["STRING"])
    g.add(6, "CLIPTextEncode", ["stale text"], [("clip", "CLIP"), ("text", "STRING", "widget")], ["CONDITIONING"])
    g.add(5, "EmptyLatentImage", [64, 64, 1], outputs=["LATENT"])
    g.add(32, "PrimitiveNode", [1234, "increment"], outputs=["INT"])
    g.add(33, "PrimitiveInt", [12, "fixed"], outputs=["INT"])
    g.add(40, "KSampler", [1, "fixed", 20, 8.0, "euler", "normal", 1.0], KSAMPLER_INPUTS, ["LATENT"])
    g.add(3, "KSampler", [5, "fixed", 3, 8.0, "euler", "normal", 0.5], KSAMPLER_INPUTS, ["LATENT"], mode=4)
    g.add(8, "VAEDecode", inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=["IMAGE"])
    g.add(9, "SaveImage", ["x"], [("images", "IMAGE")])
    g.connect(4, 0, 20, "model").connect(4, 1, 20, "clip").connect(20, 1, 6, "clip").connect(30, 0, 6, "text")
    g.connect(20, 0, 40, "model").connect(6, 0, 40, "positive").connect(6, 0, 40, "negative")
    g.connect(5, 0, 40, "latent_image").connect(32, 0, 40, "seed").connect(33, 0, 40, "steps")
    g.connect(20, 0, 3, "model").connect(6, 0, 3, "positive").connect(6, 0, 3, "negative")
    g.connect(40, 0, 3, "latent_image")
    g.connect(3, 0, 8, "samples").connect(4, 2, 8, "vae").connect(8, 0, 9, "images")

    api = editor_to_api(g.workflow(), object_info)

    assert sorted(api, key=int) == ["4", "5", "6", "8", "9", "33", "40"]
    assert api["6"]["inputs"] == {"text": "from a primitive", "clip": ["4", 1]}
    assert api["33"]["inputs"] == {"value": 12}
    assert api["40"]["inputs"] == {"seed": 1234, "steps": ["33", 0], "cfg": 8.0, "sampler_name": "euler",
                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                   "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0]}
    # The bypassed KSampler's LATENT output is its latent_image input (slot 3, found by type).
    assert api["8"]["inputs"] == {"samples": ["40", 0], "vae": ["4", 2]}


def test_widget_values_by_name_and_defaults(object_info):
    """A dict of widget values maps by name; widgets missing from the end get their defaults."""
    g = EditorGraph()
    g.add(1, "EmptyLatentImage", {"width": 96, "height": 32}, outputs=["LATENT"])
    g.add(2, "EmptyImage", [16], outputs=["IMAGE"])
    api = editor_to_api(g.workflow(), object_info)
    assert api["1"]["inputs"] == {"width": 96, "height": 32, "batch_size": 1}
    assert api["2"]["inputs"] == {"width": 16, "height": 512, "batch_size": 1, "color": 0}


def test_unknown_node_types_are_listed(object_info):
    workflow = txt2img_workflow()
    workflow["nodes"] += [{"id": 50, "type": "NoSuchNode", "mode": 0, "inputs": [], "outputs": []},
                          {"id": 51, "type": "AlsoMissing", "mode": 0, "inputs": [], "outputs": []},
                          {"id": 52, "type": "MutedAndMissing", "mode": 2, "inputs": [], "outputs": []}]
    with pytest.raises(ConversionError, match="missing node types: AlsoMissing, NoSuchNode — install"):
        editor_to_api(workflow, object_info)


# --- overrides -----------------------------------------------------------------------------------

def test_apply_overrides(object_info):
    api = editor_to_api(txt2img_workflow(), object_info)
    changed = apply_overrides(api, ["3.steps=5", "Positive.text=a dog", "KSampler.cfg=6.5",
                                    "9.filename_prefix=\"007\"", "SaveImage.filename_prefix=out/run 1",
                                    "EmptyLatentImage.batch_size=2"], object_info)
    assert changed["3"]["inputs"]["steps"] == 5
    assert changed["3"]["inputs"]["cfg"] == 6.5
    assert changed["6"]["inputs"]["text"] == "a dog"
    assert changed["9"]["inputs"]["filename_prefix"] == "out/run 1"  # later override wins
    assert changed["5"]["inputs"]["batch_size"] == 2
    assert api["3"]["inputs"]["steps"] == 20, "the input prompt must not be modified"
    assert apply_overrides(api, ['9.filename_prefix="007"'])["9"]["inputs"]["filename_prefix"] == "007"


@pytest.mark.parametrize("override, message", [
    ("CLIPTextEncode.text=x", "ambiguous: it is the class_type of nodes 6, 7"),
    ("Nothing.text=x", "no node with id, title or class_type 'Nothing'"),
    ("3.sed=1", "node 3 (KSampler) has no input 'sed'"),
    ("3steps=1", "expected NODE.input=value"),
])
def test_bad_overrides(object_info, override, message):
    api = editor_to_api(txt2img_workflow(), object_info)
    with pytest.raises(ConversionError, match=re.escape(message)):
        apply_overrides(api, [override], object_info)


# --- the client against the real server ----------------------------------------------------------

def test_server_rejects_missing_checkpoint(comfy_server, object_info):
    """Validation errors name the node, its class and the failing input; the server keeps serving."""
    api = editor_to_api(txt2img_workflow(ckpt="no_such_model.safetensors"), object_info)
    with pytest.raises(WorkflowError) as info:
        run_prompt(comfy_server.url, api, timeout=60)
    message = str(info.value)
    assert "node 4 \"Load Checkpoint\" (CheckpointLoaderSimple), input 'ckpt_name'" in message
    assert "no_such_model.safetensors" in message
    assert "4" in info.value.node_errors
    assert "KSampler" in get_object_info(comfy_server.url)


def test_run_prompt_returns_history_with_outputs(comfy_server, base_dir, object_info):
    api = editor_to_api(empty_image_workflow("headless_run"), object_info)
    events = []
    entry = run_prompt(comfy_server.url, api, on_event=lambda kind, data: events.append((kind, data)), timeout=120)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "prompt_queued" and "execution_success" in kinds
    assert ("executing", "2") in [(k, d.get("node")) for k, d in events if k == "executing"]
    assert entry["status"]["completed"] is True
    files = output_files(entry)
    assert len(files) == 1 and files[0][0] == "2"
    info = files[0][1]
    assert info["type"] == "output" and info["filename"].startswith("headless_run")
    assert (Path(base_dir) / "output" / info["subfolder"] / info["filename"]).is_file()


def test_run_prompt_raises_node_error(comfy_server, object_info):
    """A node that fails while running gives a WorkflowError with its id, class and message."""
    api = editor_to_api(empty_image_workflow("../../outside"), object_info)
    with pytest.raises(WorkflowError) as info:
        run_prompt(comfy_server.url, api, timeout=120)
    assert (info.value.node_id, info.value.node_type) == ("2", "SaveImage")
    assert "node 2 (SaveImage) failed" in str(info.value)
    assert "outside the output folder" in str(info.value)


def test_binary_frames():
    """Progress text frames are decoded; preview images and unknown kinds are skipped."""
    text = struct.pack(">I", 3) + struct.pack(">I", 2) + b"12" + "loss 0.5".encode()
    assert decode_binary_frame(text) == ("progress_text", {"node": "12", "text": "loss 0.5"})
    assert decode_binary_frame(struct.pack(">I", 1) + struct.pack(">I", 2) + b"\x89PNG") is None
    assert decode_binary_frame(b"\x00") is None


def test_start_server_reports_early_exit(tmp_path):
    with pytest.raises(ServerStartError, match="unrecognized arguments: --no-such-flag"):
        start_server(tmp_path / "base", extra_args=["--no-such-flag"], timeout=60)


# --- the CLI -------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_with_fresh_server(tmp_path, comfy_server):
    """--base-dir starts a server with this pack linked in, --set and --api-out apply, files are listed."""
    # A node's title is its display name, where the host gives it one (newer hosts do for EmptyImage).
    empty_title = get_object_info(comfy_server.url)["EmptyImage"].get("display_name") or "EmptyImage"
    workflow_file = tmp_path / "wf.json"
    workflow_file.write_text(json.dumps(empty_image_workflow("unused")))
    base = tmp_path / "base"
    result = run_cli(workflow_file, "--base-dir", base, "--set", "Save Image.filename_prefix=cli_run",
                     "--api-out", tmp_path / "api.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (base / "custom_nodes" / "sd3_lora_trainer").resolve() == REPO_ROOT
    assert json.loads((tmp_path / "api.json").read_text()) == {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
              "_meta": {"title": empty_title}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "cli_run", "images": ["1", 0]},
              "_meta": {"title": "Save Image"}},
    }
    listed = [line for line in result.stdout.splitlines() if line.startswith("output: node 2: ")]
    assert len(listed) == 1, result.stdout
    saved = Path(listed[0].split(": ", 2)[2])
    assert saved.is_file() and saved.name.startswith("cli_run") and saved.parent == base / "output"


def test_cli_api_prompt_failure(comfy_server, tmp_path):
    """An API-format file is used as is; a failing node makes the CLI exit 1 with its message."""
    api_file = tmp_path / "api.json"
    api_file.write_text(json.dumps({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ok", "images": ["1", 0]}}}))
    result = run_cli(api_file, "--url", comfy_server.url, "--set", "2.filename_prefix=../../escape")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "node 2 (SaveImage) failed" in result.stderr
    assert "outside the output folder" in result.stderr


def _source_host_env(repo: Path, comfyui_dir: str) -> subprocess.CompletedProcess:
    """``scripts/host_env.sh`` sourced in ``repo`` with COMFYUI_DIR set, printing what it chose."""
    return subprocess.run(["bash", "-c", 'source scripts/host_env.sh && echo "$HOST_DIR|$HOST_IS_DEFAULT|$VENV"'],
                          cwd=repo, env={"PATH": "/usr/bin:/bin", "COMFYUI_DIR": comfyui_dir},
                          capture_output=True, text=True)


def test_host_env_in_a_fresh_checkout(tmp_path):
    """In a clone where set-up has not fetched the default tree yet, the scripts (which export
    COMFYUI_DIR to it before calling set-up) still map it to the default host; a COMFYUI_DIR
    without main.py is refused with the fix."""
    root = Path(__file__).resolve().parents[1]
    for rel in ("scripts/host_env.sh", "headless/hosts.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((root / rel).read_text())
    default = tmp_path / ".host" / "ComfyUI"
    out = _source_host_env(tmp_path, str(default))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{default}|1|{tmp_path / '.venv'}"
    refused = _source_host_env(tmp_path, str(tmp_path / "elsewhere"))
    assert refused.returncode == 2 and "has no main.py: point it at a ComfyUI checkout" in refused.stderr
