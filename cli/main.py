"""The entry point of ``scripts/sd3_train_network.py``: read and check the command line, then
(in each process of a multi-GPU run) set up the host, build the dataset, load the models and train.

Everything that can be checked before a model loads is checked first (arguments, files, the
model's family from its header, the dataset), and a bad one exits with one message that names
the argument and the fix: status 2 for the command line, 1 for what fails later.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import List, Optional

from ..headless import in_process
from ..trainer import distributed
from . import config_file, models, translate
from .arguments import PROG, CliError, build_parser, check_refused

log = logging.getLogger("sd3_train_network")
NOT_WRITTEN = ("config_file", "output_config", "write_workflow")


def _help_tips() -> dict:
    """Help texts for the training options: the settings nodes' tooltips (so they cannot drift)."""
    _setup_host(sdpa=False)
    from ..nodes import settings

    tips = {}
    for cls in (settings.SD3LoraSettings, settings.SD3LoraNetworkArgs, settings.SD3LoraOptimizer,
                settings.SD3LoraAdvanced):
        for section in cls.INPUT_TYPES().values():
            tips.update({name: spec[1].get("tooltip", "") for name, spec in section.items() if len(spec) > 1})
    return tips


def _setup_host(sdpa: bool) -> None:
    """The host in this process: on the GPU when torch has one (this process's, in a multi-GPU run)."""
    import torch

    in_process.setup_host(cpu=not torch.cuda.is_available(), pytorch_attention=sdpa)


# Arguments naming files or folders: written as absolute paths, so the config file runs from anywhere.
PATH_ARGUMENTS = ("pretrained_model_name_or_path", "clip_l", "clip_g", "t5xxl", "vae", "dataset_config",
                  "train_data_dir", "reg_data_dir", "output_dir", "sample_prompts", "logging_dir", "resume",
                  "network_weights")


def _config_values(args) -> dict:
    """The arguments as a --config_file (what ``<name>.toml`` and --output_config write)."""
    values = {k: v for k, v in vars(args).items() if k not in NOT_WRITTEN and v is not None and v != []}
    for k in PATH_ARGUMENTS:
        if values.get(k):
            values[k] = os.path.abspath(os.path.expanduser(values[k]))
    return values


def _prepare(argv: List[str]):
    """Parse and check the command line; returns (args, plan, whether the checkpoint is a full one)."""
    parser = build_parser(_help_tips() if {"-h", "--help"} & set(argv) else None)
    args = config_file.parse(parser, argv)
    check_refused(args)
    plan = translate.plan(args, parser)
    args.seed = plan.config.seed  # a drawn seed is written into <name>.toml, so the run can be repeated
    full = models.check(plan.models)
    return args, plan, full


def _for_device(plan):
    """blocks_to_swap keeps blocks in CPU memory for a GPU run; on the CPU they are there already,
    so it is turned off (with a note) rather than refused (a GPU command line runs on the CPU)."""
    import comfy.model_management

    if plan.config.blocks_to_swap and comfy.model_management.get_torch_device().type == "cpu":
        log.warning("--blocks_to_swap %d: this run is on the CPU, where every block is in CPU memory already; "
                    "swapping is off", plan.config.blocks_to_swap)
        return dataclasses.replace(plan, config=dataclasses.replace(plan.config, blocks_to_swap=0))
    return plan


def _build_dataset(plan):
    """The dataset through its node (errors name the dataset argument)."""
    from .run import build_dataset
    from ..trainer.data import DatasetError

    try:
        return build_dataset(plan.dataset)
    except DatasetError as e:
        argument = "dataset_config" if plan.dataset.node == "SD3LoraDatasetConfig" or \
            str(plan.dataset.inputs.get("folder", "")).endswith(".toml") else "train_data_dir"
        raise CliError(f"--{argument}: {e}") from None


def _resumed_step(plan) -> int:
    """The step of the --resume state (0 without one); a missing or foreign state names --resume."""
    if not plan.resume:
        return 0
    from ..trainer import checkpoint
    from .saving import resume_stem

    try:
        return checkpoint.load_state(resume_stem(plan.resume))[checkpoint.PROGRESS]["step"]
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CliError(f"--resume {plan.resume}: {e}; pass a <name>-...-state folder written by --save_state, "
                       f"or the state files of 'SD3 LoRA Save State'") from None


def _run(args, plan, full) -> int:
    """Set up the host, then the dataset, workflow, models and training (in this process)."""
    import comfy.utils
    import folder_paths

    from . import workflow as workflows
    from .progress import HostProgress
    from .run import run_length, train_run

    main = distributed.is_main()
    plan = _for_device(plan)
    dataset, summary = _build_dataset(plan)
    if main:
        log.info("dataset: %s", summary)
    loaders = models.loader_nodes(plan.models, full)
    config, length = run_length(plan, dataset, distributed.world_size())
    resumed = _resumed_step(plan)
    graph = workflows.build(plan, loaders, config, length, resumed)
    if args.write_workflow:
        log.info("wrote %s", workflows.write(args.write_workflow, graph))
        return 0
    # The host's process-wide settings change only once the run trains, so a refused or
    # --write_workflow command line leaves an in-process host as it was.
    folder_paths.set_output_directory(plan.outputs.output_dir)
    if main:
        comfy.utils.set_progress_bar_global_hook(HostProgress())
    model, clip, vae = models.load(loaders)
    path = train_run(plan, dataset, model, clip, vae, graph)
    if main:
        toml = config_file.write(os.path.join(plan.outputs.output_dir, plan.outputs.output_name + ".toml"),
                                 _config_values(args), "written by sd3_train_network.py")
        log.info("saved %s (and %s)", path, toml.name)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args, plan, full = _prepare(argv)
        if args.output_config:
            path = config_file.write(os.path.join(plan.outputs.output_dir, plan.outputs.output_name + ".toml"),
                                     _config_values(args))
            log.info("wrote %s", path)
            return 0
        distributed.init_from_env(timeout_minutes=args.ddp_timeout)
        if not distributed.is_main():
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story; the others only warn
        _setup_host(plan.sdpa)
        return _run(args, plan, full)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except distributed.PeerLostError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # the nodes' and trainer's checks: they name the setting
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
