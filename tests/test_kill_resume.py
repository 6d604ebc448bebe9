"""kill -9 in the middle of a run, during a save: nothing finished is lost, nothing half-written
stays, and Resume from the newest periodic state ends bitwise where an uninterrupted run does.

A server of its own trains with Save Every (save_state on, every 2 steps) and is killed with
SIGKILL while it writes a periodic save; a second server on the same folders resumes from the
newest complete state, and trains the same run uninterrupted for comparison (CPU, fp32)."""
import json
import os
import signal
import time

import pytest
from safetensors.torch import load_file

import headless
import sd3_fixtures
from api_prompt import answers, train_prompt
from conftest import install_checkpoint, make_base_dir
from headless.client import queue_prompt

pytestmark = pytest.mark.slow
STEPS, EVERY = 10, 2
TEMP_PREFIX = ".sd3lora-tmp-"  # trainer/atomic_files.py


def run_prompt(steps, save_every=True, resume=None, prefix="", output_name="killed"):
    """The run under test: rank 256 on the tiny model, so that each periodic save (LoRA ~13 MB, state
    ~38 MB) lasts long enough to be killed in the middle of."""
    def build(info, ckpt):
        prompt = train_prompt(info, ckpt, output_name, steps=steps, prefix=prefix, network_dim=256, network_alpha=16.0)
        if save_every:
            prompt.node(f"{prefix}every", "SD3LoraSaveEvery", output_name="killed", save_every_n_steps=EVERY,
                        save_last_n_steps=2 * EVERY, save_precision="float", save_state=True)
            prompt.set(f"{prefix}train", save_every=(f"{prefix}every", 0))
        if resume:
            prompt.node(f"{prefix}resume", "SD3LoraResume", state_name=resume, if_missing="error")
            prompt.set(f"{prefix}train", resume=(f"{prefix}resume", 0))
        return prompt
    return build


def temp_folders(*folders):
    return [entry for folder in folders if folder.is_dir() for entry in folder.iterdir()
            if entry.name.startswith(TEMP_PREFIX)]


def kill_during_a_save(server, folders, states, deadline_s=600):
    """SIGKILL the server's process group as soon as one of this pack's temporary folders appears
    in ``folders`` after a periodic state of step >= 2 * EVERY exists; returns what was in flight."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not server.is_running():
            pytest.fail(f"the server exited before it was killed:\n{server.log_tail()}")
        done = [p.name for p in states.glob("killed-step*.json")]
        if f"killed-step{STEPS:08d}.json" in done:
            pytest.fail("the run ended before a save was seen in flight: saves are too quick to catch here")
        if len(done) >= 2:
            in_flight = temp_folders(*folders)
            if in_flight:
                os.killpg(server.pid, signal.SIGKILL)
                server.process.wait(timeout=30)
                return in_flight
        time.sleep(0.0005)
    pytest.fail("no periodic save was seen in flight before the deadline")


def test_kill_during_a_save_then_resume_equals_an_uninterrupted_run_bitwise(tmp_path):
    base = make_base_dir(tmp_path / "base")
    ckpt = install_checkpoint(base, "tiny_sd35m.safetensors", variant="3.5-medium", depth=2, seed=0, clip="full",
                              vae="taesd")
    sd3_fixtures.write_dataset(base / "input" / "tiny_dataset", n=8, seed=0)
    loras, states = base / "models" / "loras", base / "output" / "sd3_lora_states"

    with headless.start_server(base, log_path=tmp_path / "killed.log", timeout=180) as server:
        info = headless.get_object_info(server.url)
        queue_prompt(server.url, run_prompt(STEPS)(info, ckpt), "killer")
        in_flight = kill_during_a_save(server, [loras, states], states)
    left = temp_folders(loras, states)
    assert left and {p.name for p in left} <= {p.name for p in in_flight}, (in_flight, left)
    finished = sorted(int(p.stem.rsplit("step", 1)[1]) for p in states.glob("killed-step*.json"))
    newest = finished[-1]
    assert 2 * EVERY <= newest < STEPS and all(s % EVERY == 0 for s in finished)
    for step in finished:  # every finished save is whole: both state files, and its LoRA
        assert (states / f"killed-step{step:08d}.safetensors").is_file()

    with headless.start_server(base, log_path=tmp_path / "resumed.log", timeout=180) as server:
        info = headless.get_object_info(server.url)
        resumed = headless.run_prompt(server.url, run_prompt(STEPS - newest, resume="killed",
                                                             output_name="killed_final")(info, ckpt), timeout=900)
        summary = resumed["outputs"]["train"]["text"][0]
        assert f"resumed from {states / f'killed-step{newest:08d}'} at step {newest}" in summary, summary
        # The first saves after the restart removed what the kill left in both folders.
        assert temp_folders(loras, states) == []
        headless.run_prompt(server.url, run_prompt(STEPS, save_every=False, prefix="ref_",
                                                   output_name="straight")(info, ckpt), timeout=900)
        assert answers(server.url)

    final, straight = load_file(str(loras / "killed_final.safetensors")), load_file(str(loras / "straight.safetensors"))
    assert final.keys() == straight.keys() and all((final[k] == straight[k]).all() for k in final)
    losses = [json.loads((loras / f"{n}.loss.json").read_text()) for n in ("killed_final", "straight")]
    assert losses[0] == losses[1] and losses[0]["step"] == STEPS and len(losses[0]["loss"]) == STEPS
    # save_last_n_steps pruned the LoRA step files and the states alike, across the restart.
    kept = [f"killed-step{s:08d}" for s in (STEPS - EVERY, STEPS)]
    assert sorted(p.stem for p in loras.glob("killed-step*.safetensors")) == kept
    assert sorted(p.stem for p in states.glob("killed-step*.json")) == kept
