"""Datasets without the host: folders, kohya repeats, TOML configs, buckets, captions, batches,
caching (calls counted), metadata. Generated images of several sizes and formats."""
import json
import random
import re

import pytest
import torch
from PIL import Image

import sd3_fixtures
from sd3_lora_trainer.trainer import buckets as bk
from sd3_lora_trainer.trainer import latent_cache
from sd3_lora_trainer.trainer.captions import CaptionOptions, process_caption
from sd3_lora_trainer.trainer.data import DatasetError, Subset, load_pixels
from sd3_lora_trainer.trainer.dataset import DatasetOptions, build_group, folder_subsets, reg_repeats
from sd3_lora_trainer.trainer.dataset_toml import parse_dataset_toml
from sd3_lora_trainer.trainer.encode import Encoders, encode_training_data
from sd3_lora_trainer.trainer.lora_file import build_metadata
from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.training_data import CacheOptions, TrainingData

BUCKETS_128 = DatasetOptions(resolution=(128, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256,
                             bucket_reso_steps=32)


class CountingEncoders:
    """Deterministic stand-in encoders that count their calls (the host test counts the real ones)."""

    def __init__(self, image_id="vae-a", text_id="te-a"):
        self.image_calls, self.text_calls = 0, 0
        self.enc = Encoders(self.encode_image, self.encode_text, image_id, text_id)

    def encode_image(self, image):
        self.image_calls += 1
        pooled = torch.nn.functional.avg_pool2d(image.permute(0, 3, 1, 2), 8)  # [1, 3, h/8, w/8]
        return pooled.repeat(1, 6, 1, 1)[:, :16]

    def encode_text(self, caption):
        self.text_calls += 1
        g = torch.Generator().manual_seed(sum(caption.encode()) + len(caption))
        return torch.randn(1, 3 + len(caption) % 4, 8, generator=g), torch.randn(1, 4, generator=g)


@pytest.fixture(autouse=True)
def fresh_memory_cache():
    latent_cache.clear_memory()
    yield
    latent_cache.clear_memory()


def kohya_folder(root):
    """10_cat: 3 images (one without caption), 2_dog: 2 images in a nested folder, plus noise."""
    sd3_fixtures.write_dataset(root / "10_cat", n=3, seed=0, sizes=[(200, 100), (100, 200), (150, 150)])
    (root / "10_cat" / "img_001.txt").unlink()
    sd3_fixtures.write_dataset(root / "2_dog" / "nested", n=2, seed=1, sizes=[(120, 90), (64, 160)])
    (root / "notes").mkdir()
    return root


def load(root, options=BUCKETS_128, cache=CacheOptions(), **subset):
    warnings = []
    subsets, more = folder_subsets(str(root), Subset(**subset))
    group = build_group(options, subsets, warnings + more)
    return TrainingData([group], str(root), cache, warnings=warnings + more)


# --- buckets -----------------------------------------------------------------------------------------

def test_buckets_as_sd_scripts_makes_them():
    resos = bk.make_bucket_resolutions((1024, 1024), 512, 2048, 64)
    assert (1024, 1024) in resos and (512, 2048) in resos and (2048, 512) in resos
    for w, h in resos:
        assert w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 and 512 <= min(w, h) and max(w, h) <= 2048
        tallest = lambda a, b: b == 2048 or (b + 64) * a > 1024 * 1024  # noqa: E731
        assert tallest(w, h) or tallest(h, w)  # the tallest height for one of its sides
    assert bk.make_bucket_resolutions((512, 512), 256, 1024, 64)[:5] == [(256, 832), (256, 896), (256, 960),
                                                                          (256, 1024), (320, 704)]


def test_select_bucket_nearest_aspect_and_cover_resize():
    resos = bk.make_bucket_resolutions((128, 128), 64, 256, 32)
    bucket, resized = bk.select_bucket(300, 150, resos, (128, 128), 32)
    assert bucket == min(resos, key=lambda b: abs(b[0] / b[1] - 2.0))
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1] and (resized[0] == bucket[0] or resized[1] == bucket[1])
    # no upscale: a small image keeps its size, rounded down to the steps; a big one shrinks to the area
    assert bk.select_bucket(100, 70, None, (128, 128), 32) == ((96, 64), (100, 70))
    bucket, resized = bk.select_bucket(400, 200, None, (128, 128), 32)
    assert resized[0] * resized[1] <= 128 * 128 * 1.02 and bucket[0] % 32 == 0 and bucket[1] % 32 == 0


@pytest.mark.parametrize("kw, message", [
    (dict(bucket_reso_steps=24), "multiple of 16 for SD3"),
    (dict(min_bucket_reso=256), "min_bucket_reso .* at most the resolution"),
    (dict(max_bucket_reso=96), "max_bucket_reso .* at least the resolution"),
])
def test_bad_bucket_settings_are_named(kw, message):
    with pytest.raises(DatasetError, match=message):
        DatasetOptions(**{**BUCKETS_128.__dict__, **kw}).validate()
    with pytest.raises(DatasetError, match="multiple of 16"):
        DatasetOptions(resolution=(120, 120)).validate()


# --- folders -----------------------------------------------------------------------------------------

def test_kohya_folder_repeats_class_tokens_recursion_and_metadata(tmp_path):
    data = load(kohya_folder(tmp_path))
    assert [s.num_repeats for s in data.groups[0].subsets] == [10, 2]
    assert len(data.samples) == 5 and any("notes" in w for w in data.warnings)
    uncaptioned = [s for s in data.samples if "img_001." in s.path and "10_cat" in s.path][0]
    assert uncaptioned.caption == "cat"  # class tokens from the folder name
    info = data.metadata_info()
    assert info["num_images"] == 3 * 10 + 2 * 2 and info["num_reg_images"] == 0
    assert info["dataset_dirs"] == {"10_cat": {"n_repeats": 10, "img_count": 3},
                                    "2_dog": {"n_repeats": 2, "img_count": 2}}
    counts = {tuple(b["resolution"]): b["count"] for b in info["bucket_info"]["buckets"].values()}
    assert sum(counts.values()) == 34 and counts[(160, 96)] >= 10  # the 200x100 cat, 10 repeats
    for s in data.samples:
        w, h = s.bucket
        assert w * h <= 128 * 128 and w % 32 == 0 and h % 32 == 0
        assert tuple(s.image.shape) == (h, w, 3)
    assert "cat" in info["tag_frequency"]["10_cat"]
    meta = build_metadata(TrainConfig(), dict(info, variant="medium"), 10, "x")
    assert meta["ss_num_train_images"] == "34" and json.loads(meta["ss_bucket_info"]) == info["bucket_info"]
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["num_repeats"] == 10
    assert meta["ss_enable_bucket"] == "True" and meta["ss_min_bucket_reso"] == "64"


def test_bad_files_are_skipped_and_named_but_missing_folder_is_an_error(tmp_path):
    sd3_fixtures.write_dataset(tmp_path, n=2, seed=0)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "readme.pdf").write_text("ignored: not an image extension")
    Image.new("RGB", (3000, 3000)).save(tmp_path / "huge.png")
    warnings = []
    subsets, _ = folder_subsets(str(tmp_path), Subset())
    from sd3_lora_trainer.trainer.dataset import collect_subset
    samples = collect_subset(subsets[0], warnings, max_pixels=2000 * 2000)
    assert len(samples) == 2
    text = "\n".join(warnings)
    assert "empty.png is empty" in text and "text.jpg" in text and "huge.png is 3000x3000" in text
    assert "readme.pdf" not in text
    with pytest.raises(DatasetError, match="image folder not found"):
        folder_subsets(str(tmp_path / "missing"), Subset())
    (tmp_path / "img_000.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match="img_000.txt is not UTF-8"):
        collect_subset(subsets[0], [])


def test_exif_orientation_bmp_and_alpha(tmp_path):
    img = Image.new("RGB", (160, 96), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: shown as 96 x 160
    img.save(tmp_path / "rot.jpg", exif=exif)
    Image.new("RGB", (96, 96), (0, 255, 0)).save(tmp_path / "plain.bmp")
    rgba = Image.new("RGBA", (96, 96), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 48, 96))  # left half opaque blue, right half transparent
    rgba.save(tmp_path / "alpha.png")
    data = load(tmp_path, DatasetOptions(resolution=(64, 64), enable_bucket=True, min_bucket_reso=32,
                                         max_bucket_reso=128, bucket_reso_steps=16))
    by = {s.path.rsplit("/", 1)[1]: s for s in data.samples}
    assert by["rot.jpg"].size == (96, 160) and by["rot.jpg"].bucket[0] < by["rot.jpg"].bucket[1]
    px = by["alpha.png"].image
    assert px[:, -1].min() > 0.99  # transparent part composited on white
    masked = load(tmp_path, DatasetOptions(resolution=(64, 64)), alpha_mask=True)
    sample = [s for s in masked.samples if s.path.endswith("alpha.png")][0]
    image, mask = load_pixels(sample)
    assert mask[:, :30].min() > 0.99 and mask[:, -30:].max() < 0.01 and image[:, -1, 2].min() > 0.99


# --- TOML --------------------------------------------------------------------------------------------

TOML = """
[general]
caption_extension = ".txt"
enable_bucket = true

[[datasets]]
resolution = [128, 96]
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 32
batch_size = 2

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 3
  shuffle_caption = true
  keep_tokens = 1

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
"""


def test_toml_levels_inherit_and_paths_are_relative(tmp_path):
    (tmp_path / "d.toml").write_text(TOML)
    [(opts, subsets)] = parse_dataset_toml(tmp_path / "d.toml")
    assert opts.resolution == (128, 96) and opts.enable_bucket and opts.batch_size == 2
    assert subsets[0].image_dir == str((tmp_path / "a").resolve()) and subsets[0].num_repeats == 3
    assert subsets[0].captions.shuffle_caption and subsets[0].captions.keep_tokens == 1
    assert subsets[1].is_reg and not subsets[1].captions.shuffle_caption


@pytest.mark.parametrize("edit, message", [
    (("num_repeats = 3", "num_repeats = = 3"), r"TOML syntax error: .*line 15"),
    (("keep_tokens = 1", "keep_tokens = 1\n  shufle_caption = true"), r"line 18: unknown key 'shufle_caption' .*"
                                                                     r"valid keys there: .*shuffle_caption"),
    (("batch_size = 2", 'batch_size = "2"'), r"line 11: 'batch_size' in \[\[datasets\]\] #1 must be an integer"),
    (("num_repeats = 3", "num_repeats = -1"), r"line 15: num_repeats .* at least 1"),
    (("resolution = [128, 96]", "resolution = 100"), r"resolution must be .* multiple of 16"),
    (("keep_tokens = 1", "keep_tokens = 1\n  token_warmup_step = 2"), r"'token_warmup_step' .* does not support"),
])
def test_toml_errors_name_line_and_key(tmp_path, edit, message):
    (tmp_path / "d.toml").write_text(TOML.replace(*edit))
    with pytest.raises(DatasetError, match=message):
        parse_dataset_toml(tmp_path / "d.toml")


def test_toml_subset_folder_must_exist(tmp_path):
    (tmp_path / "d.toml").write_text(TOML)
    [(opts, subsets)] = parse_dataset_toml(tmp_path / "d.toml")
    with pytest.raises(DatasetError, match=r"image folder not found: .*/a"):
        build_group(opts, subsets, [])


# --- captions ----------------------------------------------------------------------------------------

def test_caption_processing_like_sd_scripts():
    rng = random.Random(0)
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_prefix="sks,")
    seen = {process_caption("a, b, c, d", opts, rng) for _ in range(40)}
    assert len(seen) > 3 and all(c.startswith("sks, ") and sorted(c.split(", ")[1:]) == ["a", "b", "c", "d"]
                                 for c in seen)
    sep = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    assert all(process_caption("x, y ||| p, q ||| z", sep, rng).startswith("x, y, ") for _ in range(10))
    assert all(process_caption("x, y ||| p, q ||| z", sep, rng).endswith(", z") for _ in range(10))
    assert process_caption("a, b", CaptionOptions(caption_dropout_every_n_epochs=2), rng, epoch=2) == ""
    wild = {process_caption("a {red|blue} cat\nline two", CaptionOptions(enable_wildcard=True), rng)
            for _ in range(40)}
    assert wild == {"a red cat", "a blue cat", "line two"}
    drop = [process_caption("a, b, c, d", CaptionOptions(caption_tag_dropout_rate=0.5), rng) for _ in range(50)]
    assert min(len(d.split(", ")) for d in drop) < 4 and max(len(d.split(", ")) for d in drop) == 4


# --- batches, reg images, validation -----------------------------------------------------------------

def test_each_batch_from_one_bucket_and_repeats_per_epoch(tmp_path):
    data = load(kohya_folder(tmp_path))
    source, _ = encode_training_data(data, CountingEncoders().enc)
    g = torch.Generator().manual_seed(0)
    batches = source.epoch_batches(g, 4)
    flat = [i for b in batches for i in b]
    assert len(flat) == 34 and sorted(flat.count(i) for i in set(flat)) == sorted([10, 10, 10, 2, 2])
    for b in batches:
        assert len({source.records[i].bucket for i in b}) == 1
        batch = source.collate(b)
        assert batch.latents.shape[0] == len(b) and batch.context.shape[0] == len(b)
    assert source.num_batches(4) == len(batches)


def test_reg_images_balance_and_prior_loss_weight(tmp_path):
    assert reg_repeats(5, [1, 1]) == [3, 2] and reg_repeats(2, [1, 1, 1]) == [1, 1, 0]
    sd3_fixtures.write_dataset(tmp_path / "train" / "5_x", n=2, seed=0)
    sd3_fixtures.write_dataset(tmp_path / "reg", n=3, seed=1)
    subsets, _ = folder_subsets(str(tmp_path / "train"), Subset())
    reg, _ = folder_subsets(str(tmp_path / "reg"), Subset(is_reg=True))
    group = build_group(DatasetOptions(resolution=(64, 64)), subsets + reg, [])
    data = TrainingData([group], "t", prior_loss_weight=0.25)
    info = data.metadata_info()
    assert info["num_images"] == 10 and info["num_reg_images"] == 10  # reg repeated to match 2 x 5
    source, _ = encode_training_data(data, CountingEncoders().enc)
    weights = {r.sample.subset.is_reg: r.loss_weight for r in source.records}
    assert weights == {True: 0.25, False: 1.0} and len(source) == 20


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    sd3_fixtures.write_dataset(tmp_path, n=10, seed=0)
    opts = DatasetOptions(resolution=(64, 64), validation_split=0.2, validation_seed=3)
    a, b = load(tmp_path, opts), load(tmp_path, opts)
    val = {s.path for s in a.groups[0].validation}
    assert len(val) == 2 and val == {s.path for s in b.groups[0].validation}
    assert not val & {s.path for s in a.samples}
    other = load(tmp_path, DatasetOptions(resolution=(64, 64), validation_split=0.2, validation_seed=4))
    assert {s.path for s in other.groups[0].validation} != val
    source, _ = encode_training_data(a, CountingEncoders().enc)
    assert len(source.validation.records) == 2 and len(source.records) == 8


# --- caching -----------------------------------------------------------------------------------------

def test_disk_cache_rebuilds_only_what_changed(tmp_path):
    root = tmp_path / "data"
    sd3_fixtures.write_dataset(root, n=4, seed=0)
    cache = CacheOptions("disk", "disk")
    first = CountingEncoders()
    encode_training_data(load(root, cache=cache), first.enc)
    assert (first.image_calls, first.text_calls) == (4, 4)
    files = list((root / ".sd3_lora_cache").glob("*.safetensors"))
    assert len(files) == 8 and not list((root / ".sd3_lora_cache").glob("*.tmp"))

    latent_cache.clear_memory()  # as after a restart: only the files remain
    again = CountingEncoders()
    source, stats = encode_training_data(load(root, cache=cache), again.enc)
    assert (again.image_calls, again.text_calls) == (0, 0) and stats.hits == 8

    (root / "img_001.txt").write_text("a new caption")
    Image.new("RGB", (90, 70), (1, 2, 3)).save(root / "img_000.png")  # same name, new pixels
    changed = CountingEncoders()
    encode_training_data(load(root, cache=cache), changed.enc)
    assert (changed.image_calls, changed.text_calls) == (1, 1)

    resized = CountingEncoders()
    encode_training_data(load(root, DatasetOptions(resolution=(96, 96)), cache=cache), resized.enc)
    assert (resized.image_calls, resized.text_calls) == (4, 0)  # new sizes: new latents, same captions
    other_vae = CountingEncoders(image_id="vae-b")
    encode_training_data(load(root, cache=cache), other_vae.enc)
    assert (other_vae.image_calls, other_vae.text_calls) == (4, 0)
    other_text = CountingEncoders(text_id="te-b")  # e.g. another t5xxl_max_token_length
    encode_training_data(load(root, cache=cache), other_text.enc)
    assert (other_text.image_calls, other_text.text_calls) == (0, 4)


def test_memory_cache_and_flip_aug_cache_both_flips(tmp_path):
    sd3_fixtures.write_dataset(tmp_path, n=2, seed=0, sizes=[(96, 64)])
    enc = CountingEncoders()
    source, _ = encode_training_data(load(tmp_path, DatasetOptions(resolution=(64, 64)), flip_aug=True), enc.enc)
    assert enc.image_calls == 4 and not list(tmp_path.glob(".sd3_lora_cache"))
    views = source.records[0].views
    torch.testing.assert_close(views[True]["latents"], views[False]["latents"].flip(-1), rtol=0, atol=1e-6)
    encode_training_data(load(tmp_path, DatasetOptions(resolution=(64, 64)), flip_aug=True), enc.enc)
    assert enc.image_calls == 4


def test_caching_refused_where_sd_scripts_refuses(tmp_path):
    sd3_fixtures.write_dataset(tmp_path, n=2, seed=0, sizes=[(80, 64)])
    with pytest.raises(DatasetError, match="random_crop .* set cache_latents to none"):
        load(tmp_path, random_crop=True)
    with pytest.raises(DatasetError, match="captions every step .* cache_text_encoder_outputs to none"):
        load(tmp_path, captions=CaptionOptions(shuffle_caption=True))
    # Uncached: latents and captions are made per step (random crop, shuffled captions)
    enc = CountingEncoders()
    data = load(tmp_path, cache=CacheOptions("none", "none"), random_crop=True,
                captions=CaptionOptions(shuffle_caption=True))
    source, _ = encode_training_data(data, enc.enc)
    assert enc.image_calls == 0
    batch = source.collate(source.epoch_batches(torch.Generator().manual_seed(0), 2)[0])
    assert batch.context is None and len(batch.captions) == 2 and enc.image_calls == 2
    assert re.fullmatch(r"[a-z ,]+", batch.captions[0])
