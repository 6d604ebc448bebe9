"""Dataset nodes through the real host (in-process, CPU, tiny SD3.5-Medium checkpoint): the README's
TOML trains end to end, the host's own VAE/CLIP are called once per content and never on a cached
second run, caching shows progress and can be cancelled, images come from the graph."""
import json
import re

import pytest
import torch
from safetensors import safe_open

import comfy.model_management
import comfy.utils
import sd3_fixtures
from conftest import REPO_ROOT


class Counting:
    """A real host object with one method counted: every attribute, that method included, is the
    real one (the method is called through), so nothing of the host is replaced."""

    def __init__(self, inner, method: str):
        self._inner, self._method, self.calls = inner, method, 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def counted(*args, **kwargs):
            self.calls += 1
            return attr(*args, **kwargs)
        return counted


@pytest.fixture(autouse=True)
def fresh_memory_cache(pack):
    pack.trainer.latent_cache.clear_memory()
    yield


def config(pack, **kw):
    return pack.trainer.config.TrainConfig(**dict(dict(network_dim=4, network_alpha=4.0, learning_rate=1e-3,
                                                       seed=3), **kw)).validate()


def train(N, pack, model, clip, vae, dataset, steps, node_id, **kw):
    with torch.inference_mode():  # the executor's mode
        return N["SD3LoraTrain"]().run(model, clip, vae, dataset, config(pack, **kw), steps, unique_id=node_id)["result"]


def readme_toml(scale: int = 8) -> str:
    """The README's dataset TOML with its pixel sizes divided by ``scale`` (a tiny model trains at 128)."""
    text = re.search(r"```toml\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S).group(1)
    for key in ("resolution", "min_bucket_reso", "max_bucket_reso"):
        text, n = re.subn(rf"^{key} = (\d+)$", lambda m: f"{key} = {int(m.group(1)) // scale}", text, flags=re.M)
        assert n == 1, key
    return re.sub(r"^bucket_reso_steps = \d+$", "bucket_reso_steps = 16", text, flags=re.M)


def test_readme_toml_trains_through_the_nodes(N, pack, loaded, tmp_path):
    model, clip, vae = loaded
    sizes = [(200, 100), (100, 200), (150, 150), (160, 120), (96, 176)]
    sd3_fixtures.write_dataset(tmp_path / "images" / "character", n=10, seed=0, sizes=sizes)
    sd3_fixtures.write_dataset(tmp_path / "images" / "regularization", n=3, seed=5)
    for i, caption in enumerate(sorted((tmp_path / "images").rglob("*.txt"))):  # few distinct captions: the
        caption.write_text(["a shape, red", "a shape, blue"][i % 2])            # real CLIP-L is slow on a CPU
    (tmp_path / "dataset.toml").write_text(readme_toml())
    with torch.inference_mode():
        dataset, summary = N["SD3LoraDatasetConfig"]().load(str(tmp_path / "dataset.toml"), validate_every_n_steps=2)
    assert "bucket (w x h)" in summary and "1 validation" in summary
    assert len({s.bucket for s in dataset.samples}) >= 3  # landscape, portrait and square buckets

    out = train(N, pack, model, clip, vae, dataset, 4, "data-readme")
    lora = out[1]
    assert lora.step == 4 and all(l == l for l in lora.losses)
    session = pack.trainer.session._SESSIONS["node:data-readme"]
    assert [s for s, _ in session.info["validation_loss"]] == [2, 4]
    assert f"validation loss {session.info['validation_loss'][-1][1]:.4f} at step 4" in out[2]  # shown on the node
    # Under bf16 the run's layers hold bf16 weight copies: validation runs under the same autocast.
    train(N, pack, model, clip, vae, dataset, 2, "data-readme-bf16", mixed_precision="bf16")
    assert [s for s, _ in pack.trainer.session._SESSIONS["node:data-readme-bf16"].info["validation_loss"]] == [2]
    path = N["SD3LoraSave"]().save(lora, "data_readme", "loras", "float")["result"][0]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == str(9 * 10) and meta["ss_num_reg_images"] == str(9 * 10)
    datasets = json.loads(meta["ss_datasets"])
    assert datasets[0]["batch_size_per_device"] == 2 and datasets[0]["subsets"][1]["is_reg"] is True
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sum(b["count"] for b in buckets.values()) == 180
    assert all(w * h <= 128 * 128 and w % 16 == 0 and h % 16 == 0 for w, h in (b["resolution"] for b in buckets.values()))
    assert json.loads(meta["ss_dataset_dirs"]) == {"character": {"n_repeats": 10, "img_count": 9}}
    tags = json.loads(meta["ss_tag_frequency"])["character"]  # the 9 training images (1 held out)
    assert tags["a shape"] == 9 and tags["red"] + tags["blue"] == 9
    assert meta["ss_enable_bucket"] == "True" and meta["ss_max_bucket_reso"] == "256"


def test_cached_second_run_calls_neither_vae_nor_text_encoder(N, pack, loaded, tmp_path):
    model, clip, vae = loaded
    sd3_fixtures.write_dataset(tmp_path / "d", n=4, seed=2)
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(tmp_path / "d"), 128, ".txt", enable_bucket=True,
                                                 min_bucket_reso=64, max_bucket_reso=256,
                                                 cache_latents="disk", cache_text_encoder_outputs="disk")[0]
    vae1, clip1 = Counting(vae, "encode"), Counting(clip, "encode_from_tokens")
    train(N, pack, model, clip1, vae1, dataset, 2, "data-cache-1")
    assert (vae1.calls, clip1.calls) == (4, 4)

    pack.trainer.latent_cache.clear_memory()  # as after a restart: only the safetensors files remain
    vae2, clip2 = Counting(vae, "encode"), Counting(clip, "encode_from_tokens")
    lora = train(N, pack, model, clip2, vae2, dataset, 2, "data-cache-2")[1]
    assert (vae2.calls, clip2.calls) == (0, 0)
    assert lora.losses == train(N, pack, model, clip, vae, dataset, 2, "data-cache-3")[1].losses  # same data


def test_caching_progress_and_cancel_keep_finished_entries(N, pack, loaded, tmp_path):
    model, clip, vae = loaded
    sd3_fixtures.write_dataset(tmp_path / "d", n=5, seed=4)
    with torch.inference_mode():
        dataset = N["SD3LoraImageFolder"]().load(str(tmp_path / "d"), 64, ".txt")[0]
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        # Cancel at the first update: newer hosts (0.33.0 here) throttle the later ones (ProgressBar), so
        # a later update may never reach the hook; the first always does.
        if (value, total) == (1, 5):
            comfy.model_management.interrupt_current_processing(True)  # what the Cancel button does

    counting = Counting(vae, "encode")
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(N, pack, model, clip, counting, dataset, 3, "data-cancel")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert seen == [(1, 5)] and counting.calls == 1
    again = Counting(vae, "encode")
    assert train(N, pack, model, clip, again, dataset, 1, "data-cancel")[1].step == 1
    assert again.calls == 4  # only the images not cached before Cancel


def test_images_from_the_graph(N, pack, loaded):
    model, clip, vae = loaded
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 80, 112, 3, generator=g)
    node = N["SD3LoraImagesFromGraph"]()
    with pytest.raises(ValueError, match="captions has 2 lines for 3 images"):
        node.load(images, "a\nb", 64, 1)
    mask = torch.zeros(3, 80, 112)
    mask[:, :, :56] = 1
    with torch.inference_mode():
        dataset, summary = node.load(images, "red noise\nblue noise\ngreen noise\n", 64, 2, loss_mask=mask,
                                     enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    assert [s.caption for s in dataset.samples] == ["red noise", "blue noise", "green noise"]
    assert "6 per epoch" in summary and dataset.samples[0].bucket[0] > dataset.samples[0].bucket[1]
    counting = Counting(vae, "encode")
    lora = train(N, pack, model, clip, counting, dataset, 2, "data-graph")[1]
    assert lora.step == 2 and counting.calls == 3
    record = pack.trainer.session._SESSIONS["node:data-graph"].data.records[0]
    m = record.views[False]["mask"][0]
    assert m[:, :2].min() > 0.99 and m[:, -2:].max() < 0.01  # loss mask at latent size, left half


def test_folder_input_takes_a_toml_with_the_node_values_as_defaults(N, tmp_path):
    """demo.sh --dataset passes a .toml through the folder node: the file's keys win."""
    sd3_fixtures.write_dataset(tmp_path / "imgs", n=2, seed=0)
    (tmp_path / "d.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\nnum_repeats = 3\n')
    dataset, summary = N["SD3LoraImageFolder"]().load(str(tmp_path / "d.toml"), 96, ".txt")
    assert dataset.resolution == 96 and "6 per epoch" in summary
    (tmp_path / "d.toml").write_text('[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    assert N["SD3LoraImageFolder"]().load(str(tmp_path / "d.toml"), 96, ".txt")[0].resolution == 64
    with pytest.raises(ValueError, match=r"d.toml: TOML syntax error"):
        (tmp_path / "d.toml").write_text("[[datasets]\n")
        N["SD3LoraImageFolder"]().load(str(tmp_path / "d.toml"), 96, ".txt")


def test_dataset_summary_is_sent_to_its_node(N, pack, dataset_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(pack.nodes.live, "send", lambda kind, data: seen.append((kind, data)))
    with torch.inference_mode():
        _, summary = N["SD3LoraImageFolder"]().load(str(dataset_dir), 128, ".txt", enable_bucket=True, min_bucket_reso=64,
                                                   unique_id="17")
    assert seen == [("sd3lora.dataset", {"node": "17", "summary": summary})]
    assert "bucket" in summary.lower()
