"""save_every_n_steps / save_last_n_steps: step files written during a run, old ones pruned."""
import torch
from safetensors.torch import load_file

from sd3_lora_trainer.trainer.periodic_save import is_due, prune_step_files, step_file_name
from train_settings import settings


def test_names_due_and_pruning(tmp_path):
    assert step_file_name("x", 42) == "x-step00000042.safetensors"
    assert is_due(4, 2) and not is_due(5, 2) and not is_due(4, 0)
    for step in (100, 200, 300):
        (tmp_path / step_file_name("x", step)).write_bytes(b"")
    (tmp_path / "x.safetensors").write_bytes(b"")
    (tmp_path / "xy-step00000100.safetensors").write_bytes(b"")
    removed = prune_step_files(tmp_path, "x", 300, 150)
    assert [p.name for p in removed] == ["x-step00000100.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x-step00000200.safetensors", "x-step00000300.safetensors", "x.safetensors", "xy-step00000100.safetensors"]
    assert prune_step_files(tmp_path, "x", 300, 0) == []


def test_train_node_saves_every_n_steps(N, loaded, dataset_dir, base_dir):
    model, clip, vae = loaded
    every = N["SD3LoraSaveEvery"]().build(output_name="every_check", save_every_n_steps=2, save_last_n_steps=3,
                                          save_to="loras", save_precision="float")[0]
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]
        out = N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N), 6, save_every=every,
                                      unique_id="save-every")["result"]
    folder = base_dir / "models" / "loras"
    names = sorted(p.name for p in folder.glob("every_check-step*.safetensors"))
    assert names == ["every_check-step00000004.safetensors", "every_check-step00000006.safetensors"]
    last = load_file(str(folder / names[-1]))
    final = out[1].tensors
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k].float()) for k in final)
    assert not torch.equal(load_file(str(folder / names[0]))["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"],
                           last["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"])


def test_save_state_every_n_steps_then_resume_from_the_newest_equals_uninterrupted(N, pack, loaded, dataset_dir,
                                                                                     base_dir):
    """sd-scripts' save_state: states written with the step files, pruned with them; a run that
    stops after step 7 (its session forgotten, as after a crash) resumes from the newest (step 6)
    and ends bitwise where an uninterrupted run does."""
    model, clip, vae = loaded
    every = N["SD3LoraSaveEvery"]().build(output_name="periodic", save_every_n_steps=2, save_last_n_steps=3,
                                          save_to="output", save_precision="float", save_state=True)[0]
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]
        straight = N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N), 8, unique_id="periodic-ref")
        N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N), 7, save_every=every, unique_id="periodic")
    states = base_dir / "output" / "sd3_lora_states"
    assert sorted(p.name for p in states.glob("periodic-*")) == [
        "periodic-step00000004.json", "periodic-step00000004.safetensors",
        "periodic-step00000006.json", "periodic-step00000006.safetensors"]
    assert sorted(p.name for p in (base_dir / "output").glob("periodic-*")) == [
        "periodic-step00000004.safetensors", "periodic-step00000006.safetensors"]
    pack.trainer.session.forget("node:periodic")
    resume = N["SD3LoraResume"]().load("periodic", "error")[0]
    assert resume.path.endswith("periodic-step00000006")
    with torch.inference_mode():
        out = N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N), 2, resume=resume,
                                      unique_id="periodic")["result"]
    ref = straight["result"][1]
    assert "resumed from" in out[2] and "periodic-step00000006 at step 6" in out[2]
    assert out[1].step == 8 and out[1].losses == ref.losses
    assert out[1].tensors.keys() == ref.tensors.keys()
    assert all(torch.equal(out[1].tensors[k], ref.tensors[k]) for k in ref.tensors)
