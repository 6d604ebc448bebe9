"""Bad input through the real server, as a new user makes it: each prompt is refused with a
message that names the setting or file and the fix (most when queued, before any node runs),
the server keeps answering, and it still trains a good workflow afterwards.

All cases share the session's server; a refused prompt costs nothing, and the few that run are
two steps of the tiny model at 64 px. Killing the server is in test_kill_resume.py."""
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

import headless
import sd3_fixtures
from api_prompt import answers, train_prompt

pytestmark = pytest.mark.slow
TOML_OK = '[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "tiny_dataset"\n'


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return headless.get_object_info(comfy_server.url)


@pytest.fixture(scope="module")
def good(object_info, sd35m_checkpoint, dataset_dir):
    """The good workflow every case spoils in one place."""
    return train_prompt(object_info, sd35m_checkpoint, "bad_input_good")


@pytest.fixture(scope="module")
def rank4_lora(comfy_server, good, base_dir):
    """A rank-4 LoRA trained on the server from a folder with damaged files among good ones: they
    are skipped when the dataset is scanned and counted on the node and in the file's metadata."""
    folder = base_dir / "input" / "with_bad_files"
    if not folder.exists():
        sd3_fixtures.write_dataset(folder, n=3, seed=4)
        Image.new("RGB", (128, 128), (10, 200, 10)).save(folder / "cut.jpg", quality=95)
        data = (folder / "cut.jpg").read_bytes()
        (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
        (folder / "gone.png").symlink_to(folder / "missing.png")
        (folder / "img_000.txt").write_bytes("\ufeff".encode() + (folder / "img_000.txt").read_bytes())
    prompt = good.copy().set("data", folder="with_bad_files").set("save", output_name="bad_input_rank4")
    events = []
    headless.run_prompt(comfy_server.url, prompt, timeout=600, on_event=lambda kind, data: events.append((kind, data)))
    summary = next(d["summary"] for kind, d in events if kind == "sd3lora.dataset" and d["node"] == "data")
    assert "3 images (3 per epoch" in summary and "2 file(s) skipped" in summary, summary
    assert "cut.jpg: " in summary and "damaged or cut short" in summary, summary
    assert "gone.png: a link to a file that does not exist" in summary
    path = base_dir / "models" / "loras" / "bad_input_rank4.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_train_images"], meta["ss_num_skipped_images"]) == ("3", "2")
    assert "\ufeff" not in meta["ss_tag_frequency"]
    return path


def a_state(base_dir, name: str) -> Path:
    """A real training state (a tiny network's) under output/sd3_lora_states; returns its stem."""
    from sd3_lora_trainer.trainer import checkpoint
    from sd3_lora_trainer.trainer.config import TrainConfig
    from sd3_lora_trainer.trainer.state import build_network, new_train_state
    from tiny_mmdit import tiny_mmdit

    cfg = TrainConfig(network_dim=2).validate()
    stem = base_dir / "output" / "sd3_lora_states" / name
    checkpoint.save_state(stem, checkpoint.state_dict(new_train_state(cfg, build_network(tiny_mmdit(), cfg)), {}))
    return stem


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- the cases: (id, how the good prompt is spoilt, words the message must hold, node that says it) ----

def with_node(node_id, class_type, link, **inputs):
    """A case that adds a pack node and links it into the good prompt: ``link`` (target, input)."""
    def spoil(prompt, base_dir):
        prompt.node(node_id, class_type, **inputs)
        target, name = link
        prompt.set(target, **{name: (node_id, 0)})
    return spoil


def widgets(node_id, **inputs):
    return lambda prompt, base_dir: prompt.set(node_id, **inputs)


def toml_file(text):
    def spoil(prompt, base_dir):
        (base_dir / "input" / "bad_case.toml").write_text(text)
        prompt.set("data", folder="bad_case.toml")
    return spoil


def resume_from(name, damage=None):
    def spoil(prompt, base_dir):
        if damage is not None:
            damage(a_state(base_dir, name))
        prompt.node("resume", "SD3LoraResume", state_name=name, if_missing="error")
        prompt.set("train", resume=("resume", 0))
    return spoil


def network_weights(value, make=None):
    def spoil(prompt, base_dir):
        if make is not None:
            make(base_dir / "models" / "loras")
        with_node("netargs", "SD3LoraNetworkArgs", ("settings", "network_args"), network_weights=value)(prompt, base_dir)
    return spoil


def sampling(prompts, **kw):
    return with_node("sampling", "SD3LoraSampling", ("train", "sampling"), sample_prompts=prompts, **kw)


def optimizer(args, kind="AdamW"):
    return with_node("opt", "SD3LoraOptimizer", ("settings", "optimizer"), optimizer_type=kind, optimizer_args=args)


def save_every(**kw):
    return with_node("every", "SD3LoraSaveEvery", ("train", "save_every"), **kw)


def save_state(name):
    def spoil(prompt, base_dir):
        prompt.node("state", "SD3LoraSaveState", lora=("train", 1), state_name=name)
    return spoil


QUEUE_TIME = [
    ("sample_100000px", sampling("a cat --w 100000 --h 100000"), ["width 100000 (--w) is too large", "8192 px"],
     "SD3LoraSampling"),
    ("sample_over_16_mpx", sampling("a cat --w 8192 --h 4096"), ["16 Mpx limit for samples", "lower --w and --h"],
     "SD3LoraSampling"),
    ("sample_unknown_option", sampling("a cat --q 3"), ["line 1: unknown option --q"], "SD3LoraSampling"),
    ("sample_prefix_up", sampling("a cat", filename_prefix="../../x"), ["filename_prefix", "not a plain name"],
     "SD3LoraSampling"),
    ("every_name_up", save_every(output_name="../../../x"), ["output_name '../../../x' is a path"], "SD3LoraSaveEvery"),
    ("every_name_absolute", save_every(output_name="/tmp/sd3_escape", save_last_n_steps=2),
     ["output_name '/tmp/sd3_escape' is a path"], "SD3LoraSaveEvery"),
    ("state_name_absolute", save_state("/tmp/sd3_state"), ["state_name '/tmp/sd3_state' is a path"], "SD3LoraSaveState"),
    ("state_name_up", save_state("../up"), ["state_name '../up' is a path"], "SD3LoraSaveState"),
    ("save_name_up", widgets("save", output_name="../../x"), ["output_name '../../x' is a path"], "SD3LoraSave"),
    ("save_name_300_chars", widgets("save", output_name="n" * 300), ["output_name is 300 bytes long", "at most 200"],
     "SD3LoraSave"),
    ("save_name_hidden", widgets("save", output_name=".hidden"), ["not a plain file name"], "SD3LoraSave"),
    ("save_to_unknown", widgets("save", save_to="elsewhere"), ["save_to 'elsewhere' is not one of: loras, output"],
     "SD3LoraSave"),
    ("resume_name_up", resume_from("../x"), ["state_name '../x' is a path"], "SD3LoraResume"),
    ("resume_missing", resume_from("no_such_state"), ["no_such_state.json not found"], "SD3LoraResume"),
    ("resume_cut_tensors", resume_from("cut_tensors", lambda s: cut_in_half(s.with_suffix(".safetensors"))),
     ["cut_tensors.safetensors is damaged", "Resume from another state"], "SD3LoraResume"),
    ("resume_cut_json", resume_from("cut_json", lambda s: cut_in_half(s.with_suffix(".json"))),
     ["cut_json.json is damaged"], "SD3LoraResume"),
    ("toml_single_bracket_subsets",
     toml_file('[general]\nresolution = 64\n[[datasets]]\n[datasets.subsets]\nimage_dir = "tiny_dataset"\n'),
     ["bad_case.toml, line 4", "write [[datasets.subsets]] (double brackets)"], "SD3LoraImageFolder"),
    ("toml_double_bracket_general", toml_file(TOML_OK.replace("[general]", "[[general]]")),
     ["bad_case.toml, line 1", "write [general]"], "SD3LoraImageFolder"),
    ("toml_subsets_string", toml_file('[general]\nresolution = 64\n[[datasets]]\nsubsets = "x"\n'),
     ["'subsets' in [[datasets]] #1 must be [[datasets.subsets]] tables"], "SD3LoraImageFolder"),
    ("toml_unknown_key", toml_file(TOML_OK + "colour = 3\n"), ["unknown key 'colour'"], "SD3LoraImageFolder"),
    ("toml_missing_image_dir", toml_file(TOML_OK.replace("tiny_dataset", "no_such_folder")),
     ["image_dir not found", "no_such_folder"], "SD3LoraImageFolder"),
    ("folder_missing", widgets("data", folder="no_such_images"), ["image folder not found", "no_such_images"],
     "SD3LoraImageFolder"),
    ("caption_extension_path", widgets("data", caption_extension="a/b"), ["caption_extension 'a/b' is not a file"],
     "SD3LoraImageFolder"),
    ("cache_dir_is_a_file", widgets("data", cache_dir="tiny_dataset/img_000.txt"), ["is a file: name a folder"],
     "SD3LoraImageFolder"),
    ("bucket_min_above_resolution", widgets("data", enable_bucket=True, min_bucket_reso=256),
     ["min_bucket_reso (256) must be at most the resolution (64)"], "SD3LoraImageFolder"),
    ("optimizer_args_word", optimizer("weight_decay=abc"), ["weight_decay='abc' must be a number"], "SD3LoraOptimizer"),
    ("optimizer_args_one_beta", optimizer("betas=(0.9)"), ["betas=0.9 must be a tuple of 2 numbers"],
     "SD3LoraOptimizer"),
    ("optimizer_args_unknown", optimizer("decay=0.1", "Lion"), ["Lion has no argument 'decay'"], "SD3LoraOptimizer"),
    ("max_grad_norm_nan", widgets("settings", max_grad_norm=float("nan")), ["max_grad_norm is nan: set a finite"],
     "SD3LoraSettings"),
    ("logit_mean_nan", widgets("settings", logit_mean=float("nan")), ["logit_mean is nan"], "SD3LoraSettings"),
    ("mode_scale_inf", widgets("settings", mode_scale=float("inf")), ["mode_scale is inf"], "SD3LoraSettings"),
    ("learning_rate_above_max", widgets("settings", learning_rate=5.0), ["learning_rate 5.0 is above its maximum"],
     "SD3LoraSettings"),
    ("network_weights_missing", network_weights("no_such_lora"), ["network_weights: file not found", "models/loras"],
     "SD3LoraNetworkArgs"),
    ("network_weights_not_a_lora", network_weights("text.safetensors", lambda d: (d / "text.safetensors").write_text(
        "not a tensor file")), ["cannot read", "text.safetensors"], "SD3LoraNetworkArgs"),
    ("emb_dims_words", with_node("netargs", "SD3LoraNetworkArgs", ("settings", "network_args"), emb_dims="abc"),
     ["emb_dims: 'abc' is not a list of integers"], "SD3LoraNetworkArgs"),
    ("block_indices_words", with_node("netargs", "SD3LoraNetworkArgs", ("settings", "network_args"),
                                      train_block_indices="x-y"), ["train_block_indices: cannot read 'x-y'"],
     "SD3LoraNetworkArgs"),
]


@pytest.mark.parametrize("spoil, words, node_class", [c[1:] for c in QUEUE_TIME], ids=[c[0] for c in QUEUE_TIME])
def test_bad_input_is_refused_when_queued_and_the_server_keeps_serving(comfy_server, good, base_dir, spoil, words,
                                                                       node_class):
    prompt = good.copy()
    spoil(prompt, base_dir)
    with pytest.raises(headless.WorkflowError) as err:
        headless.run_prompt(comfy_server.url, prompt, timeout=120)
    message = str(err.value)
    assert all(w in message for w in words), message
    refused_when_queued = node_class in [e["class_type"] for e in err.value.node_errors.values()]
    # A bad output node beside a valid one (Save State beside Save): the host runs the valid one,
    # and the train node refuses before its first step, naming the node.
    refused_by_the_train_node = err.value.node_type == "SD3LoraTrain" and f"({node_class}): " in message
    assert refused_when_queued or refused_by_the_train_node, message
    assert answers(comfy_server.url)


def test_no_file_was_written_outside_comfyuis_folders(base_dir):
    """After the name cases: nothing three folders above models/loras, nothing under /tmp."""
    assert not list(base_dir.parent.glob("x-step*")) and not list(base_dir.parent.glob("x.*"))
    assert not list(Path("/tmp").glob("sd3_escape*")) and not list(Path("/tmp").glob("sd3_state*"))


# --- cases found when the graph runs (before training) ---------------------------------------------

def test_network_weights_of_another_rank_fail_on_the_train_node_naming_both_ranks(comfy_server, good, rank4_lora,
                                                                                    base_dir):
    prompt = good.copy().set("settings", network_dim=8)
    network_weights(rank4_lora.name)(prompt, base_dir)
    with pytest.raises(headless.WorkflowError) as err:
        headless.run_prompt(comfy_server.url, prompt, timeout=300)
    assert err.value.node_type == "SD3LoraTrain" and err.value.exception_type == "ValueError"
    assert "bad_input_rank4.safetensors: lora_unet_" in str(err.value)
    assert "has rank 4 in the file, but these settings give it rank 8: set network_dim" in str(err.value)
    assert answers(comfy_server.url)


def test_a_bad_save_beside_a_preview_stops_the_run_before_training(comfy_server, good, base_dir):
    """The host runs the valid outputs of a prompt whose other output is invalid: the preview's
    branch would train and the save never happen. The train node refuses first."""
    prompt = good.copy().set("save", output_name="../not_here").node("preview", "PreviewImage", images=("train", 4))
    with pytest.raises(headless.WorkflowError) as err:
        headless.run_prompt(comfy_server.url, prompt, timeout=300)
    assert err.value.node_type == "SD3LoraTrain", str(err.value)
    assert ("not training, because a node after this one would not run: node save (SD3LoraSave): output_name "
            "'../not_here' is a path") in str(err.value)
    assert answers(comfy_server.url)


def test_the_server_still_trains_a_good_workflow(comfy_server, good, base_dir, rank4_lora):
    """After every bad input above: the same server trains and saves, with the host's file mode,
    and a name ending in .safetensors is not doubled."""
    prompt = good.copy().set("save", output_name="bad_input_after.safetensors")
    entry = headless.run_prompt(comfy_server.url, prompt, timeout=600)
    assert entry["status"]["status_str"] == "success"
    lora = base_dir / "models" / "loras" / "bad_input_after.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_steps"] == "2" and any("lora_up" in k for k in f.keys())
    probe = base_dir / "mode_probe.txt"
    probe.write_text("x")
    assert lora.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777 == lora.with_suffix(".loss.json").stat().st_mode & 0o777
    assert not list((base_dir / "models" / "loras").glob(".*tmp*"))
