"""Bad input in-process, through the real host's node classes: each is refused with the setting or
file and the fix (most of them by the node's VALIDATE_INPUTS, at queue time), or handled as a user
expects (bad image files skipped at scan time and counted, 16-bit images scaled, BOMs dropped).
tests/test_bad_input_server.py drives the same kinds of mistakes through a real server."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sd3_fixtures
from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.lora_file import build_metadata
from train_settings import SETTINGS, settings


def refusal(N, node: str, **inputs) -> str:
    """What the node's VALIDATE_INPUTS says about ``inputs`` (asserting it refuses them)."""
    result = N[node].VALIDATE_INPUTS(**inputs)
    assert isinstance(result, str), f"{node} accepted {inputs}"
    return result


@pytest.fixture
def images(tmp_path):
    """A folder with two good captioned images."""
    return sd3_fixtures.write_dataset(tmp_path / "imgs", n=2, seed=1)


# --- names: nothing is written outside ComfyUI's folders --------------------------------------------

@pytest.mark.parametrize("node, key, extra", [
    ("SD3LoraSave", "output_name", {"save_to": "loras"}),
    ("SD3LoraSaveEvery", "output_name", {"save_to": "output"}),
    ("SD3LoraSaveState", "state_name", {}),
    ("SD3LoraResume", "state_name", {"if_missing": "start new session"}),
])
@pytest.mark.parametrize("name, message", [
    ("../../../x", "is a path: give a plain name"),
    ("/tmp/escape", "is a path: give a plain name"),
    ("~/x", "is a path"),
    (".hidden", "is not a plain file name"),
    ("a" * 300, "bytes long; file names here may have at most 200"),
    ("", "is empty: name the file"),
])
def test_every_writer_takes_only_plain_names(N, node, key, extra, name, message):
    assert message in refusal(N, node, **{key: name}, **extra)
    assert key in refusal(N, node, **{key: name}, **extra)
    assert N[node].VALIDATE_INPUTS(**{key: "fine name-1.v2"}, **extra) is True


def test_linked_names_pass_at_queue_time_and_are_checked_when_run(N):
    assert N["SD3LoraSave"].VALIDATE_INPUTS(output_name=None, save_to="loras") is True  # a link: value unknown yet
    with pytest.raises(ValueError, match="output_name '../x' is a path"):
        N["SD3LoraSaveEvery"]().build(output_name="../x", save_every_n_steps=1, save_last_n_steps=0,
                                      save_to="loras", save_precision="fp16")


def test_sample_filename_prefix_stays_in_the_output_folder(N):
    base = dict(sample_prompts="a cat --s 2")
    assert "is an absolute path" in refusal(N, "SD3LoraSampling", filename_prefix="/tmp/x", **base)
    assert "'..' is not a plain name" in refusal(N, "SD3LoraSampling", filename_prefix="../../x", **base)
    assert N["SD3LoraSampling"].VALIDATE_INPUTS(filename_prefix="samples/run_%date%", **base) is True
    assert N["SD3LoraSampling"].VALIDATE_INPUTS(filename_prefix=" ", **base) is True  # the default prefix


def test_a_name_ending_in_safetensors_is_not_doubled(N, pack, base_dir):
    lora = pack.trainer.session.LoraSnapshot(
        tensors={"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, config=pack.trainer.config.TrainConfig(),
        info={"variant": "medium", "resolution": 64, "num_images": 1}, step=1, losses=[1.0])
    path = N["SD3LoraSave"]().save(lora, "doubled.safetensors", "output", "float")["result"][0]
    assert path.endswith(os.sep + "doubled.safetensors") and os.path.isfile(path)


def test_relative_network_weights_are_in_models_loras(N, base_dir):
    (base_dir / "models" / "loras" / "start_from.safetensors").write_bytes(b"")
    args = N["SD3LoraNetworkArgs"]().build(**_network_args(network_weights="start_from"))[0]
    assert args["network_weights"] == str(base_dir / "models" / "loras" / "start_from.safetensors")


def _network_args(**kw):
    dims = {n: -1 for n in ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim",
                            "x_mod_dim")}
    return dict(dims, **dict(dict(emb_dims="", train_block_indices="all", split_qkv=False, network_dropout=0.0,
                                  rank_dropout=0.0, module_dropout=0.0, loraplus_lr_ratio=0.0, network_weights="",
                                  verbose=False, network_train_unet_only=True, train_t5xxl=False,
                                  text_encoder_lr=""), **kw))


# --- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["max_grad_norm", "logit_mean", "mode_scale", "learning_rate"])
def test_nan_and_inf_are_refused_by_name(N, pack, key):
    floats = {k: SETTINGS[k] for k in ("network_alpha", "learning_rate", "logit_mean", "logit_std", "mode_scale",
                                       "training_shift", "max_grad_norm")}
    for bad in (float("nan"), float("inf")):
        assert refusal(N, "SD3LoraSettings", **dict(floats, **{key: bad})).startswith(f"{key} is {bad}: set a finite")
        with pytest.raises(ValueError, match=f"{key} is {bad}: set a finite number"):
            pack.trainer.config.TrainConfig(**{key: bad}).validate()
    # Naming an input in VALIDATE_INPUTS turns the host's range check off for it: ours does it instead.
    assert "learning_rate 5.0 is above its maximum 1.0" in refusal(N, "SD3LoraSettings",
                                                                    **dict(floats, learning_rate=5.0))


@pytest.mark.parametrize("optimizer_type, args, message", [
    ("AdamW", "weight_decay=abc", "weight_decay='abc' must be a number"),
    ("AdamW", "betas=(0.9)", "betas=0.9 must be a tuple of 2 numbers"),
    ("AdamW", "no_such=1", "AdamW has no argument 'no_such'"),
    ("Lion", "betas=(1.5,0.9)", "Lion refused them"),
    ("AdamW", "lr=1", "lr is set by the trainer"),
])
def test_optimizer_args_are_checked_against_the_optimizer(N, optimizer_type, args, message):
    assert message in refusal(N, "SD3LoraOptimizer", optimizer_type=optimizer_type, optimizer_args=args,
                              lr_scheduler_power=1.0)
    assert N["SD3LoraOptimizer"].VALIDATE_INPUTS(optimizer_type=optimizer_type, optimizer_args="weight_decay=0.1",
                                                 lr_scheduler_power=1.0) is True


def test_network_weights_of_another_rank_name_the_file_and_rank(N, pack, loaded, dataset_dir, base_dir):
    model, clip, vae = loaded
    rank4 = pack.trainer.state.build_network(model.model.diffusion_model, settings(N, network_dim=4))  # not attached
    save_file(rank4.kohya_state_dict(), str(base_dir / "models" / "loras" / "rank4.safetensors"))
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]
    assert N["SD3LoraNetworkArgs"].VALIDATE_INPUTS(**_validate_args(network_weights="rank4")) is True
    assert "file not found" in refusal(N, "SD3LoraNetworkArgs", **_validate_args(network_weights="nope"))
    args = N["SD3LoraNetworkArgs"]().build(**_network_args(network_weights="rank4"))[0]
    with pytest.raises(ValueError, match=r"network_weights .*rank4.safetensors: lora_unet_\w+ has rank 4 in the "
                                         r"file, but these settings give it rank 8: set network_dim"):
        with torch.inference_mode():
            N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N, network_dim=8, network_args=args), 1,
                                    unique_id="rank8")


def _validate_args(**kw):
    keys = ("emb_dims", "train_block_indices", "network_dropout", "rank_dropout", "module_dropout",
            "loraplus_lr_ratio", "network_weights", "text_encoder_lr")
    return {k: v for k, v in _network_args(**kw).items() if k in keys}


# --- a bad node after the train node stops it before the first step ---------------------------------

def test_train_node_refuses_when_a_later_node_would_not_run(N, pack, loaded, dataset_dir):
    prompt = {"5": {"class_type": "SD3LoraTrain", "inputs": {"steps": 1}},
              "7": {"class_type": "SD3LoraSave", "inputs": {"lora": ["5", 1], "output_name": "../../up",
                                                             "save_to": "loras", "save_precision": "fp16"}},
              "8": {"class_type": "SaveImage", "inputs": {"images": ["5", 4], "filename_prefix": "x"}}}
    model, clip, vae = loaded
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]
        with pytest.raises(ValueError, match=r"not training, because a node after this one would not run: node 7 "
                                             r"\(SD3LoraSave\): output_name '../../up' is a path"):
            N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N), 1, unique_id="5", prompt=prompt)
    assert pack.trainer.session.current("node:5") is None  # nothing was trained or encoded


# --- image files: skipped at scan time and counted, or read as meant --------------------------------

def test_damaged_linked_tiny_and_huge_files_are_skipped_when_scanned_and_counted(N, images):
    good = images / "img_000.png"
    Image.new("RGB", (256, 256), (200, 10, 10)).save(images / "cut.jpg", quality=95)
    data = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) // 2])
    (images / "gone.png").symlink_to(images / "no_such_file.png")
    Image.new("RGB", (1, 1)).save(images / "dot.png")
    with torch.inference_mode():
        dataset, summary = N["SD3LoraImageFolder"]().load(str(images), 64, ".txt", max_megapixels=1)
    assert [os.path.basename(s.path) for s in dataset.samples] == ["img_000.png", "img_001.jpg"]
    assert "2 images (2 per epoch" in summary and "3 file(s) skipped" in summary
    assert "cut.jpg: image file is truncated" in summary and "damaged or cut short" in summary
    assert "gone.png: a link to a file that does not exist" in summary
    assert "dot.png is 1x1 px, under 16 px on a side" in summary
    info = dataset.metadata_info()
    assert info["num_images"] == 2 and info["num_skipped_images"] == 3
    meta = build_metadata(TrainConfig(), dict(info, variant="medium"), 1, "x")
    assert (meta["ss_num_train_images"], meta["ss_num_skipped_images"]) == ("2", "3")
    assert good.exists()
    Image.new("RGB", (1100, 1000)).save(images / "big.png")
    with torch.inference_mode():
        summary = N["SD3LoraImageFolder"]().load(str(images), 64, ".txt", max_megapixels=1)[1]
    assert "big.png is 1100x1000 = 1 Mpx, above the 1 Mpx limit (max_megapixels)" in summary


def test_a_file_damaged_after_the_scan_is_skipped_when_encoded_and_named_on_the_train_node(N, loaded, images):
    noise = np.random.default_rng(1313).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # content no cache holds
    Image.fromarray(noise).save(images / "late.png")
    model, clip, vae = loaded
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(images), 64, ".txt")[0]
        (images / "late.png").write_bytes(b"overwritten after the scan")
        out = N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N), 1, unique_id="late")["result"]
    assert "warning: skipped when encoding: cannot read image" in out[2] and "late.png" in out[2]
    assert out[1].info["num_skipped_images"] == 1


def test_sixteen_bit_grey_png_trains_as_its_grey_not_white(N, tmp_path):
    folder = tmp_path / "grey16"
    folder.mkdir()
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(folder / "grey.png")
    assert Image.open(folder / "grey.png").mode.startswith("I")
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(folder), 64, ".txt")[0]
    assert abs(dataset.samples[0].image.mean().item() - 0.5) < 0.01


def test_caption_bom_extension_without_dot_and_empty_caption(N, images):
    (images / "img_000.txt").write_bytes("\ufeffred square, bright".encode("utf-8"))
    (images / "img_001.txt").write_text("   \n")
    with torch.inference_mode():
        dataset, summary = N["SD3LoraImageFolder"]().load(str(images), 64, "txt")
    by_name = {os.path.basename(s.path): s.caption for s in dataset.samples}
    assert by_name == {"img_000.png": "red square, bright", "img_001.jpg": ""}
    assert "red square" in dataset.tag_frequency()["imgs"]
    assert "1 image(s) in" in summary and "have no or an empty .txt caption" in summary and "img_001.jpg" in summary


def test_dataset_folder_caption_extension_and_cache_dir_are_checked_at_queue_time(N, images, tmp_path):
    base = dict(folder=str(images), resolution=64, caption_extension=".txt")
    assert N["SD3LoraImageFolder"].VALIDATE_INPUTS(**base) is True
    assert "image folder not found" in refusal(N, "SD3LoraImageFolder", **dict(base, folder=str(tmp_path / "no")))
    assert "caption_extension 'a/b' is not a file ending" in refusal(
        N, "SD3LoraImageFolder", **dict(base, caption_extension="a/b"))
    (tmp_path / "a_file").write_text("x")
    assert "cache_dir" in refusal(N, "SD3LoraImageFolder", **dict(base, cache_dir=str(tmp_path / "a_file")))
    assert "is a file: name a folder" in refusal(N, "SD3LoraImageFolder",
                                                 **dict(base, cache_dir=str(tmp_path / "a_file")))
    assert "min_bucket_reso (256) must be at most the resolution" in refusal(
        N, "SD3LoraImageFolder", **dict(base, enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024,
                                        bucket_reso_steps=64))


@pytest.mark.parametrize("toml, message", [
    ('[general]\nresolution = 64\n[[datasets]]\n[datasets.subsets]\nimage_dir = "imgs"\n',
     "line 4: [datasets.subsets] in [[datasets]] #1 (single brackets) is one table; write [[datasets.subsets]]"),
    ('[[general]]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n',
     "line 1: [[general]] (double brackets) makes a list; there is one general table: write [general]"),
    ('[general]\nresolution = 64\n[[datasets]]\nsubsets = "x"\n',
     "line 4: 'subsets' in [[datasets]] #1 must be [[datasets.subsets]] tables (got 'x')"),
    ('[datasets]\nresolution = 64\n', "line 1: [datasets] (single brackets) is one table; write [[datasets]]"),
    ('[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "missing"\n',
     "image_dir not found"),
])
def test_dataset_toml_structure_mistakes_are_named(N, images, toml, message):
    path = images.parent / "d.toml"
    path.write_text(toml)
    assert message in refusal(N, "SD3LoraDatasetConfig", toml_path=str(path))
    with pytest.raises(ValueError, match="d.toml"):
        N["SD3LoraDatasetConfig"]().load(str(path))


def test_a_toml_with_a_bom_reads(N, images):
    path = images.parent / "bom.toml"
    path.write_bytes('\ufeff[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
                     .encode("utf-8"))
    assert N["SD3LoraDatasetConfig"].VALIDATE_INPUTS(toml_path=str(path)) is True


def test_pack_errors_reach_the_host_as_builtin_types(N, tmp_path):
    """The host prints "<module>.<class>"; ours would read "/…/sd3_lora_trainer.trainer.data.DatasetError"."""
    with pytest.raises(ValueError) as err:
        N["SD3LoraImageFolder"]().load(str(tmp_path / "missing"), 64, ".txt")
    assert type(err.value) is ValueError and "image folder not found" in str(err.value)
    assert type(err.value.__cause__).__name__ == "DatasetError"  # the original, for the traceback


# --- samples ----------------------------------------------------------------------------------------

def test_sample_sizes_are_bounded_at_queue_time_and_by_the_model(N, loaded, dataset_dir):
    base = dict(filename_prefix="s")
    message = refusal(N, "SD3LoraSampling", sample_prompts="cat --w 100000 --h 100000", **base)
    assert "width 100000 (--w) is too large: the limit is 8192 px" in message
    assert "above the 16 Mpx limit for samples" in refusal(N, "SD3LoraSampling",
                                                           sample_prompts="cat --w 8192 --h 4096", **base)
    sampling = N["SD3LoraSampling"]().build("cat --w 2048 --h 64 --s 1", 0, False, "euler", "sgm_uniform", "s")[0]
    model, clip, vae = loaded
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]
        with pytest.raises(ValueError, match=r"prompt 1: width 2048 \(--w\) is too large: this model's position "
                                             r"table covers 1024 px"):
            N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N), 1, sampling=sampling, unique_id="big")
