"""End to end: each example workflow, converted with the real server's /object_info, queued on the
real ComfyUI server with this pack in custom_nodes, on the tiny SD3-family fixtures."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import headless

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"))
# The tiny random model learns visibly faster at a higher rate than real SD3 weights want (1e-4).
TINY_MODEL_OVERRIDES = ["SD3LoraSettings.learning_rate=0.001", "SD3LoraSave.save_precision=float"]


# An sd-scripts dataset config for workflows that read one (relative image_dir: next to the file).
TINY_DATASET_TOML = '[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 256\n\n' \
                    '[[datasets.subsets]]\nimage_dir = "tiny_dataset"\n'


def _overrides(ckpt: str, wf_name: str, prompt=None, base_dir=None) -> list:
    """The tiny-fixture overrides for the node classes the workflow has (each workflow uses a subset)."""
    # 256 px like the TOML below: at the workflows' 512 px the tiny model's step is 4x the tokens,
    # and the run tests the flow, not the resolution (the text-encoder workflow took 70-85 s).
    overrides = [f"CheckpointLoaderSimple.ckpt_name={ckpt}", "SD3LoraImageFolder.folder=tiny_dataset",
                 "SD3LoraImageFolder.resolution=256", f"SD3LoraSave.output_name=e2e_{wf_name}"] + TINY_MODEL_OVERRIDES
    if wf_name == "train_text_encoder":  # each step runs the full-size CLIP-L forward and backward
        overrides.append("SD3LoraTrain.steps=40")
    if prompt is None:
        return overrides
    classes = {node["class_type"] for node in prompt.values()}
    if "SD3LoraDatasetConfig" in classes:
        (base_dir / "input" / "tiny_dataset.toml").write_text(TINY_DATASET_TOML)
        overrides.append("SD3LoraDatasetConfig.toml_path=tiny_dataset.toml")
    return [o for o in overrides if o.split(".", 1)[0] in classes]


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return headless.get_object_info(comfy_server.url)


@pytest.mark.slow
@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_trains_saves_and_previews(workflow_path, comfy_server, object_info, base_dir,
                                                    sd35m_checkpoint, dataset_dir, host):
    workflow = json.loads(workflow_path.read_text())
    converted = headless.editor_to_api(workflow, object_info)
    prompt = headless.apply_overrides(converted, _overrides(sd35m_checkpoint, workflow_path.stem, converted, base_dir),
                                      object_info)
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "SD3LoraTrain")
    steps = prompt[train_id]["inputs"]["steps"]
    events = []
    entry = headless.run_prompt(comfy_server.url, prompt, on_event=lambda t, d: events.append((t, d)),
                                timeout=900, extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert entry["status"]["status_str"] == "success"

    # The pack's live events reached the websocket client: one per step, then the end of the run.
    live = [d for t, d in events if t == "sd3lora.progress" and d["node"] == train_id]
    assert [d["step"] for d in live if isinstance(d.get("loss"), float)][-1] == steps and live[-1].get("done")
    assert live[-1]["losses"][-1] == live[-2]["loss"]  # the end of the run carries every loss

    # The host's progress bar moved with the steps on the training node (newer hosts send at most
    # one update per 100 ms, and always the first and the last).
    train_progress = [d["value"] for t, d in events
                      if t == "progress" and str(d.get("node")) == train_id and d.get("max") == steps]
    assert train_progress[0] == 1 and train_progress[-1] == steps and train_progress == sorted(train_progress)

    # The LoRA file: kohya names, metadata, and every key mapped by the host's own LoRA key map.
    lora_path = base_dir / "models" / "loras" / f"e2e_{workflow_path.stem}.safetensors"
    assert lora_path.exists()
    assert json.loads(lora_path.with_suffix(".workflow.json").read_text()) == workflow  # provenance
    with safe_open(str(lora_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_steps"] == str(steps) and meta["ss_network_module"] == "networks.lora_sd3"
    import comfy.lora
    import comfy.sd

    model, clip = comfy.sd.load_checkpoint_guess_config(str(base_dir / "models" / "checkpoints" / sd35m_checkpoint),
                                                        output_vae=False, output_clip=True)[:2]
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert modules and all(m in key_map for m in modules), sorted(m for m in modules if m not in key_map)[:5]
    assert len(comfy.lora.load_lora(tensors, key_map)) == len(modules)  # the loader leaves no key unused
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k)  # it learned something

    # The preview made by the stock KSampler from the training node's MODEL output.
    images = [info for node, info in headless.output_files(entry) if prompt[node]["class_type"] == "SaveImage"]
    assert images and all((base_dir / "output" / i["subfolder"] / i["filename"]).exists() for i in images)

    # Loss history: on the fixed tiny dataset the last quarter's mean is below the first quarter's.
    history = json.loads(lora_path.with_suffix(".loss.json").read_text())["loss"]
    assert len(history) == steps
    q = max(1, steps // 4)
    assert sum(history[-q:]) / q < sum(history[:q]) / q


@pytest.mark.slow
def test_bad_dataset_folder_is_a_node_error_and_server_keeps_serving(comfy_server, object_info,
                                                                      sd35m_checkpoint, dataset_dir):
    workflow = json.loads((WORKFLOWS[0].parent / "train_and_preview.json").read_text())
    prompt = headless.apply_overrides(headless.editor_to_api(workflow, object_info),
                                      _overrides(sd35m_checkpoint, "bad") + ["SD3LoraImageFolder.folder=no_such_dir"],
                                      object_info)
    with pytest.raises(headless.WorkflowError) as err:
        headless.run_prompt(comfy_server.url, prompt, timeout=300)
    assert "image folder not found" in str(err.value) and "no_such_dir" in str(err.value)
    # Refused when queued (the node's VALIDATE_INPUTS), before any node ran.
    assert [e["class_type"] for e in err.value.node_errors.values()] == ["SD3LoraImageFolder"]
    # The same server runs the next prompt.
    assert "SD3LoraTrain" in headless.get_object_info(comfy_server.url)


@pytest.mark.slow
def test_server_log_has_no_warning_about_the_pack(comfy_server):
    """After the browser and end-to-end runs on this host, its log names the pack in no warning or
    deprecation notice (newer hosts warn about node packs that use retired APIs)."""
    lines = comfy_server.log_path.read_text(errors="replace").splitlines()
    about_pack = [line for line in lines if re.search(r"warn|deprecat", line, re.I)
                  and re.search(r"sd3_lora_trainer|sd3lora", line, re.I)]
    assert about_pack == [], about_pack
    assert any("sd3_lora_trainer" in line for line in lines)  # the host did load and name the pack
