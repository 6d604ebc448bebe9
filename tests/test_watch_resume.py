"""Watch, sample, stop and continue, through the real host in-process: live events and history,
loss output and chart, samples made with the host's sampler, Cancel/continue and save/resume
bitwise equal to an uninterrupted run, and the workflow written next to saved files."""
import json

import pytest
import torch
from PIL import Image

import comfy.model_management
import comfy.utils

WORKFLOW = {"workflow": {"nodes": [{"id": 4, "type": "SD3LoraTrain"}], "links": [], "version": 0.4}}


@pytest.fixture(scope="module")
def dataset(N, dataset_dir):
    with torch.inference_mode():
        return N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]


@pytest.fixture
def events(pack, monkeypatch):
    """Every live event the train node sends, as (type, data)."""
    seen = []
    monkeypatch.setattr(pack.nodes.live, "send", lambda kind, data: seen.append((kind, data)))
    return seen


def config(pack, **kw):
    return pack.trainer.config.TrainConfig(**dict(dict(network_dim=4, network_alpha=4.0, learning_rate=1e-3,
                                                       seed=3), **kw)).validate()


def train(N, pack, loaded, dataset, steps, node_id, settings=None, **inputs):
    model, clip, vae = loaded
    with torch.inference_mode():  # the executor's mode
        return N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings or config(pack), steps, unique_id=node_id,
                                       extra_pnginfo=WORKFLOW, **inputs)["result"]


def tensors_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(N, pack, loaded, dataset):
    """Six uninterrupted steps: the reference every stop-and-continue run must equal bitwise."""
    return train(N, pack, loaded, dataset, 6, "ref")[1]


def test_cancel_then_continue_equals_uninterrupted_bitwise(N, pack, loaded, dataset, straight):
    def hook(value, total, preview, node_id=None):
        # After the step bar's first update, which every host sends (newer ones throttle the rest).
        if value == 1 and total == 6:  # the step bar, not the dataset-caching bar before it
            comfy.model_management.interrupt_current_processing(True)  # what the Cancel button does

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(N, pack, loaded, dataset, 6, "cancel")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert pack.trainer.session.current("node:cancel").state.step == 1
    lora = train(N, pack, loaded, dataset, 5, "cancel")[1]
    assert lora.step == 6 and lora.losses == straight.losses
    assert tensors_equal(lora.tensors, straight.tensors)


def test_save_state_then_resume_in_a_fresh_session_equals_uninterrupted_bitwise(N, pack, loaded, dataset, straight,
                                                                                 base_dir):
    first = train(N, pack, loaded, dataset, 2, "disk")[1]
    path = N["SD3LoraSaveState"]().save(first, "resume_test", extra_pnginfo=WORKFLOW)["result"][0]
    assert path.endswith("sd3_lora_states/resume_test.json")
    assert json.loads((base_dir / "output/sd3_lora_states/resume_test.workflow.json").read_text()) == WORKFLOW["workflow"]
    pack.trainer.session.forget("node:disk")  # as after a restart: nothing in memory
    resume = N["SD3LoraResume"]().load("resume_test", "error")[0]
    out = train(N, pack, loaded, dataset, 4, "disk", resume=resume)
    assert "resumed from" in out[2] and "at step 2" in out[2]
    assert out[1].losses == straight.losses and tensors_equal(out[1].tensors, straight.tensors)
    # Queued again with the same (now older) state connected: continues in memory, no rewind.
    again = train(N, pack, loaded, dataset, 1, "disk", resume=resume)
    assert again[1].step == 7 and "continuing from step 6" in again[2]


def test_resume_if_missing(N, pack, loaded, dataset):
    with pytest.raises(FileNotFoundError, match="no_such_state.json"):
        N["SD3LoraResume"]().load("no_such_state", "error")
    resume = N["SD3LoraResume"]().load("no_such_state", "start new session")[0]
    out = train(N, pack, loaded, dataset, 1, "missing", resume=resume)
    assert out[1].step == 1 and "no saved state at" in out[2]


def test_live_events_history_route_data_and_loss_outputs(N, pack, loaded, dataset, events):
    out = train(N, pack, loaded, dataset, 3, "live")
    progress = [d for t, d in events if t == "sd3lora.progress"]
    # Caching first (the node shows "caching ... 3/8"), then the run starts with the session's note.
    phases = [d["phase"] for d in progress if "phase" in d]
    assert phases[0] == "caching latents and text-encoder outputs 0/8"
    assert phases[-1] == "caching latents and text-encoder outputs 8/8" and len(phases) == 9
    start = next(d for d in progress if d.get("reset"))
    assert start["losses"] == [] and start["step"] == 0 and start["note"] == "started a new session"
    steps = [d for d in progress if isinstance(d.get("loss"), float)]
    assert [d["step"] for d in steps] == [1, 2, 3] and progress[-1]["done"]
    assert all(d["node"] == "live" and d["total"] == 3 and d["lr"] == pytest.approx(1e-3) for d in steps)
    assert [d["loss"] for d in steps] == out[1].losses
    # The rate leaves out the run's first step (warm-up), so there is none yet after it.
    assert steps[0]["steps_per_s"] is None and steps[0]["eta_s"] is None
    assert steps[2]["steps_per_s"] > 0 and steps[2]["eta_s"] == 0
    assert progress[-1]["losses"] == out[1].losses  # the end carries every loss (a Cancel may skip an event)
    view = pack.nodes.live.history("live")
    assert view["losses"] == out[1].losses and not view["running"] and view["step"] == 3
    assert out[3] == {"loss": out[1].losses}
    image = N["SD3LoraLossPlot"]().plot(out[3], 256, 128, 0.9)[0]
    assert image.shape == (1, 128, 256, 3) and image.min() >= 0 and image.max() <= 1
    # The smoothed line (orange) is drawn: some pixels are far from white and grey.
    assert ((image[0, :, :, 0] > 0.8) & (image[0, :, :, 2] < 0.4)).sum() > 20


def test_samples_do_not_disturb_training_and_carry_the_workflow(N, pack, loaded, dataset, straight, events, base_dir):
    sampling = N["SD3LoraSampling"]().build("a red square --s 2 --d 5\nblue circle --w 64 --h 48 --s 2 --n dark",
                                            3, True, "euler", "sgm_uniform", "sd3_lora_samples/t")[0]
    out = train(N, pack, loaded, dataset, 6, "sampled", sampling=sampling)
    # Sampling between steps goes through the host's LoRA patching and must leave training exact.
    assert out[1].losses == straight.losses and tensors_equal(out[1].tensors, straight.tensors)
    made = [d for t, d in events if t == "sd3lora.samples"]
    assert [d["step"] for d in made] == [0, 3, 6] and all(len(d["images"]) == 2 for d in made)
    assert out[4].shape == (2, 64, 64, 3)  # the newest set, the 64x48 one fitted to the first's size
    png = Image.open(base_dir / "output" / made[-1]["images"][1]["subfolder"] / made[-1]["images"][1]["filename"])
    assert png.size == (64, 48) and json.loads(png.info["workflow"]) == WORKFLOW["workflow"]
    assert pack.nodes.live.history("sampled")["samples"] == made[-1]["images"]
    # The newest samples show the trained LoRA: they differ from the untrained ones (step 0).
    first = Image.open(base_dir / "output" / made[0]["images"][0]["subfolder"] / made[0]["images"][0]["filename"])
    last = Image.open(base_dir / "output" / made[-1]["images"][0]["subfolder"] / made[-1]["images"][0]["filename"])
    assert first.tobytes() != last.tobytes()


def test_bf16_run_samples_on_the_stored_weights_and_leaves_them_as_they_were(N, pack, loaded, dataset, events):
    # Under bf16 autocast the frozen fp32 weights get bf16 copies for the run; sampling between
    # steps must see the host's own fp32 weights, and training must not notice the sampling.
    mmdit = loaded[0].model.diffusion_model
    assert mmdit.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float32  # so the run casts
    before = {k: v.clone() for k, v in mmdit.state_dict().items()}
    bf16 = config(pack, mixed_precision="bf16")
    plain = train(N, pack, loaded, dataset, 4, "bf16_plain", settings=bf16)
    sampling = N["SD3LoraSampling"]().build("a red square --s 2 --d 5", 2, False, "euler", "sgm_uniform",
                                            "sd3_lora_samples/bf16")[0]
    sampled = train(N, pack, loaded, dataset, 4, "bf16_sampled", settings=bf16, sampling=sampling)
    assert [d["step"] for t, d in events if t == "sd3lora.samples"] == [2, 4]
    assert sampled[1].losses == plain[1].losses and tensors_equal(sampled[1].tensors, plain[1].tensors)
    after = mmdit.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)


def test_compiled_run_samples_eager_between_steps_and_trains_as_eager(N, pack, loaded, dataset, events, monkeypatch):
    import test_compile  # registers the "sd3lora_counting" backend, which runs captured graphs as they are

    real_sample, graphs_per_sample = pack.nodes.train_extras.RunExtras._sample, []

    def observed_sample(self, step):
        """The pack's own sampling call, noting how many graphs were compiled while it ran."""
        before = len(test_compile.GRAPHS)
        real_sample(self, step)
        graphs_per_sample.append(len(test_compile.GRAPHS) - before)

    monkeypatch.setattr(pack.nodes.train_extras.RunExtras, "_sample", observed_sample)
    eager = train(N, pack, loaded, dataset, 4, "eager_ref", settings=config(pack, mixed_precision="bf16"))
    torch._dynamo.reset()
    test_compile.GRAPHS.clear()
    sampling = N["SD3LoraSampling"]().build("a red square --s 2 --d 5", 2, False, "euler", "sgm_uniform",
                                            "sd3_lora_samples/compiled")[0]
    compiled = train(N, pack, loaded, dataset, 4, "compiled_sampled", sampling=sampling,
                     settings=config(pack, mixed_precision="bf16", torch_compile=True,
                                     dynamo_backend="sd3lora_counting"))
    assert [d["step"] for t, d in events if t == "sd3lora.samples"] == [2, 4]
    assert test_compile.GRAPHS, "no joint block went through torch.compile"
    assert graphs_per_sample == [0, 0]  # samples ran eager: no graphs of their own
    torch.testing.assert_close(torch.tensor(compiled[1].losses), torch.tensor(eager[1].losses), rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(block) for block in loaded[0].model.diffusion_model.joint_blocks)


@pytest.mark.parametrize("mixed_precision,sdpa_calls", [("no", True), ("bf16", False)])
def test_fp32_on_the_cpu_trains_with_sdpa_and_restores_the_hosts_attention(N, pack, loaded, dataset, monkeypatch,
                                                                           mixed_precision, sdpa_calls):
    """In fp32 on the CPU the MMDiT trains with PyTorch SDPA (faster and leaner there than the
    host's chunked CPU attention); in bf16 with the host's own; the host's choice is back afterwards."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module

    calls, real = [], attention.attention_pytorch

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "attention_pytorch", counted)
    hosts_own = mmdit_module.optimized_attention
    train(N, pack, loaded, dataset, 1, f"sdpa_{mixed_precision}", settings=config(pack, mixed_precision=mixed_precision))
    assert bool(calls) == sdpa_calls
    assert mmdit_module.optimized_attention is hosts_own


def test_compile_with_checkpointing_needs_pytorch_attention(N, pack, loaded, dataset):
    # On the CPU the host's attention sizes its chunks from free memory at every call, which a
    # compiled, checkpointed block cannot replay: the node says how to get PyTorch attention.
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module

    assert mmdit_module.optimized_attention is not attention.attention_pytorch
    # bf16: in fp32 on the CPU the trainer itself switches to SDPA (nodes/host.py sdpa_for_training).
    settings = config(pack, torch_compile=True, gradient_checkpointing=True, mixed_precision="bf16")
    with pytest.raises(ValueError, match="--use-pytorch-cross-attention"):
        train(N, pack, loaded, dataset, 1, "compile_ckpt", settings=settings)
    # In fp32 the trainer's own SDPA is what the pair needs: it trains, through torch.compile.
    import test_compile  # registers the "sd3lora_counting" backend

    test_compile.GRAPHS.clear()
    train(N, pack, loaded, dataset, 1, "compile_ckpt_fp32",
          settings=config(pack, torch_compile=True, gradient_checkpointing=True, dynamo_backend="sd3lora_counting"))
    assert test_compile.GRAPHS, "no joint block went through torch.compile"


def test_save_writes_the_workflow_next_to_the_lora(N, straight, base_dir):
    N["SD3LoraSave"]().save(straight, "provenance", "loras", "float", extra_pnginfo=WORKFLOW)
    saved = base_dir / "models" / "loras" / "provenance.workflow.json"
    assert json.loads(saved.read_text()) == WORKFLOW["workflow"]


def test_sample_prompt_options_and_errors(pack):
    sp = pack.trainer.sample_prompts
    p = sp.parse_line("a cat, sitting --w 512 --h 768 --s 28 --l 4.5 --d 7 --n blurry, low quality", sp.SamplePrompt(""))
    assert (p.prompt, p.width, p.height, p.steps, p.cfg, p.seed, p.negative) == \
        ("a cat, sitting", 512, 768, 28, 4.5, 7, "blurry, low quality")
    assert [q.prompt for q in sp.parse_prompts("# comment\n\none\ntwo --s 3", sp.SamplePrompt(""))] == ["one", "two"]
    with pytest.raises(ValueError, match="line 2: unknown option --q"):
        sp.parse_prompts("ok\nbad --q 3", sp.SamplePrompt(""))
    with pytest.raises(ValueError, match="--w needs a int"):
        sp.parse_line("x --w big", sp.SamplePrompt(""))
    with pytest.raises(ValueError, match="height 50 must be a multiple of 16"):
        sp.parse_line("x --h 50", sp.SamplePrompt(""))
