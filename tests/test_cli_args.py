"""The command line's arguments: every TrainConfig option reachable under its sd-scripts name,
--config_file under the command line, refused and unknown names, and bad input that stops before
any model loads (the script run as a subprocess)."""
import dataclasses
import importlib

import pytest

import sd3_fixtures
from cli_helpers import TINY, run_cli

# A value other than the default for each TrainConfig field, as typed on the command line.
# Fields whose default is False are flags; the others get these values.
VALUES = {"network_dim": "5", "network_alpha": "2.5", "learning_rate": "3e-4", "train_batch_size": "2",
          "weighting_scheme": "logit_normal", "logit_mean": "0.5", "logit_std": "1.5", "mode_scale": "1.5",
          "training_shift": "3.0", "max_grad_norm": "0.5", "mixed_precision": "bf16", "seed": "7",
          "optimizer_type": "Lion", "optimizer_args": "weight_decay=0.01", "lr_scheduler": "cosine",
          "lr_warmup_steps": "3", "lr_scheduler_num_cycles": "2", "lr_scheduler_power": "2.0",
          "max_train_steps": "99", "gradient_accumulation_steps": "2", "loss_type": "huber",
          "huber_schedule": "constant", "huber_c": "0.2", "huber_scale": "2.0", "t5xxl_max_token_length": "77",
          "clip_l_dropout_rate": "0.1", "clip_g_dropout_rate": "0.2", "t5_dropout_rate": "0.3",
          "pos_emb_random_crop_rate": "0.4", "blocks_to_swap": "2", "dynamo_backend": "eager",
          "network_dropout": "0.1", "network_weights": "start.safetensors", "text_encoder_lr": "1e-5",
          "network_train_unet_only": None, "loraplus_lr_ratio": "16"}
NETWORK_ARGS = {"context_attn_dim": "2", "context_mlp_dim": "3", "context_mod_dim": "4", "x_attn_dim": "5",
                "x_mlp_dim": "6", "x_mod_dim": "7", "emb_dims": "[1,0,0,2,0,0]", "train_block_indices": "0",
                "split_qkv": "True", "rank_dropout": "0.1", "module_dropout": "0.2", "verbose": "True",
                "train_t5xxl": "True", "loraplus_lr_ratio": "8"}


@pytest.fixture(scope="module")
def cli(pack):
    """The pack's cli modules, imported from the package the host loaded."""
    return {name: importlib.import_module(f"{pack.__name__}.cli.{name}")
            for name in ("arguments", "config_file", "translate")}


def _config(cli, argv):
    parser = cli["arguments"].build_parser()
    args = cli["config_file"].parse(parser, argv)
    return cli["translate"].train_config(args)


def test_every_train_config_option_is_an_argument(cli, pack):
    """Each field, set on the command line (or in --network_args), reaches the TrainConfig."""
    TrainConfig = importlib.import_module(f"{pack.__name__}.trainer.config").TrainConfig
    extra = {"full_bf16": ["--mixed_precision", "bf16"]}  # full_bf16 needs bf16
    covered = set()
    for f in dataclasses.fields(TrainConfig):
        if f.name in NETWORK_ARGS:
            argv = ["--network_args", f"{f.name}={NETWORK_ARGS[f.name]}"]
        elif VALUES.get(f.name, "flag") in ("flag", None):
            argv = [f"--{f.name}"]
        else:
            argv = [f"--{f.name}", VALUES[f.name]]
        config = _config(cli, argv + extra.get(f.name, []))
        default = cli["arguments"].SD_SCRIPTS_DEFAULTS.get(f.name, f.default)
        assert getattr(config, f.name) != default, f.name
        covered.add(f.name)
    assert covered == {f.name for f in dataclasses.fields(TrainConfig)}


def test_sd_scripts_defaults(cli):
    """A bare command means what it means in sd-scripts: rank 4, lr 2e-6, text encoders trained, a random seed."""
    a, b = _config(cli, []), _config(cli, [])
    assert (a.network_dim, a.learning_rate, a.network_train_unet_only) == (4, 2e-6, False)
    assert a.seed != b.seed


def test_config_file_under_the_command_line(cli, tmp_path):
    (tmp_path / "run.toml").write_text('[network]\nnetwork_dim = 8\nnetwork_args = ["split_qkv=True"]\n'
                                       'learning_rate = 1e-3\n')
    config = _config(cli, ["--config_file", str(tmp_path / "run.toml"), "--learning_rate", "5e-4"])
    assert (config.network_dim, config.split_qkv, config.learning_rate) == (8, True, 5e-4)
    (tmp_path / "bad.toml").write_text("network_dimm = 8\n")
    with pytest.raises(cli["arguments"].CliError, match=r"--network_dimm in --config_file .*did you mean --network_dim"):
        _config(cli, ["--config_file", str(tmp_path / "bad.toml")])


def test_network_args_errors_name_the_key(cli):
    with pytest.raises(cli["arguments"].CliError, match="split_qkvv.*did you mean split_qkv"):
        _config(cli, ["--network_args", "split_qkvv=True"])
    with pytest.raises(cli["arguments"].CliError, match="x_attn_dim=two: x_attn_dim takes a int"):
        _config(cli, ["--network_args", "x_attn_dim=two"])


@pytest.mark.parametrize("argv, message", [
    (["--v2"], "--v2 does not apply to SD3"),
    (["--v_parameterization"], "--v_parameterization does not apply to SD3"),
    (["--clip_skip", "2"], "--clip_skip does not apply to SD3"),
    (["--network_dimm", "4"], "unknown argument --network_dimm; did you mean --network_dim"),
    (["--network_module", "networks.lora_flux"], "--network_module networks.lora_flux is not supported"),
    (["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d", "--resolution", "64",
      "--output_dir", "o", "--shuffle_caption"], "--shuffle_caption: set shuffle_caption in a [[datasets.subsets]]"),
    (["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "d", "--output_dir", "o"],
     "--train_data_dir needs --resolution"),
])
def test_refused_and_unknown_arguments(pack, argv, message, capsys):
    """Refused before anything is loaded (the entry point called in-process: it stops at the arguments)."""
    main = importlib.import_module(f"{pack.__name__}.cli.main").main
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _stops_before_loading(result, code, *fragments):
    """Exit ``code`` with one error line naming each fragment, and no model was loaded."""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == code and len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "model_type" not in result.stdout + result.stderr  # the host prints this when a model loads


def test_bad_model_files_stop_before_any_model_loads(pack, base_dir, sd35m_checkpoint, dataset_dir, tmp_path, capsys):
    """A missing and a non-SD3 checkpoint, and a missing image folder (the entry point called
    in-process; the subprocess test below runs the script itself)."""
    main = importlib.import_module(f"{pack.__name__}.cli.main").main
    common = [*map(str, TINY), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"]
    wan = sd3_fixtures.write_non_sd3_unet(tmp_path / "wan.safetensors")
    ckpt = base_dir / "models" / "checkpoints" / sd35m_checkpoint
    for model, data, fragments in (
            (tmp_path / "missing.safetensors", dataset_dir, ("--pretrained_model_name_or_path", "no such file")),
            (wan, dataset_dir, ("a video (Wan) model, not SD3", "pass an SD3 Medium")),
            (ckpt, tmp_path / "nope", ("--train_data_dir", "nope"))):
        assert main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), *common]) == 2
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if "error:" in line]
        assert len(errors) == 1 and all(f in errors[0] for f in fragments), captured.err[-2000:]
        assert not (tmp_path / "out").exists()


def test_bad_input_stops_before_any_model_loads(base_dir, sd35m_checkpoint, dataset_dir, tmp_path):
    ckpt = base_dir / "models" / "checkpoints" / sd35m_checkpoint
    common = ["--output_dir", tmp_path / "out", "--max_train_steps", "1"]
    (tmp_path / "bad.toml").write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]\nimage_dir = 'x'\n")
    _stops_before_loading(run_cli(["--pretrained_model_name_or_path", ckpt, "--dataset_config", tmp_path / "bad.toml",
                                   *TINY[4:], *common]), 2, "--dataset_config", "TOML syntax error", "line 3")


def test_rank_shard_splits_each_batch_and_pads_short_ones(pack):
    """Each process's rows of a batch: the batch split in order, a process without a row gets the
    last row at weight 0; the weights add up to the whole batch."""
    distributed = importlib.import_module(f"{pack.__name__}.trainer.distributed")
    shares = [[distributed.RankShard(None, r, 2).share(n) for r in range(2)] for n in (4, 3, 1)]
    assert [(s.offset, s.rows, s.weight) for s in shares[0]] == [(0, 2, 0.5), (2, 2, 0.5)]
    assert [(s.offset, s.rows, s.weight) for s in shares[1]] == [(0, 2, 2 / 3), (2, 1, 1 / 3)]
    assert [(s.offset, s.rows, s.weight) for s in shares[2]] == [(0, 1, 1.0), (0, 1, 0.0)]
