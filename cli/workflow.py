"""``--write_workflow``: the editor workflow of a command line.

The graph is the one a user would wire: the stock loaders of the model files, the dataset node,
Settings with its Network Args / Optimizer / Advanced groups, Sampling and Save Every when asked
for, Resume for --resume, the train node (steps = the run's steps) and the Save node. Widget
values are written in the order the editor creates the widgets, read from each node class's
``INPUT_TYPES`` with the headless converter's rules, so the converter (and the editor) reads
them back as written. Models are named by file name: the server that runs the workflow finds
them in its models/ folders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from ..headless.convert import default_widget_value, has_control_widget, widget_inputs

from ..nodes import NODE_CLASS_MAPPINGS
from ..trainer.config import TrainConfig
from ..trainer.lora_targets import TYPE_DIM_NAMES
from .models import LoaderNode, _node_class
from .run import Length, sampling_options
from .saving import resume_stem
from .translate import Plan

SETTING_GROUPS = (("network_args", "SD3LoraNetworkArgs"), ("optimizer", "SD3LoraOptimizer"),
                  ("advanced", "SD3LoraAdvanced"))


def _node_inputs(config: TrainConfig, node: str) -> Dict[str, object]:
    """The settings node's widget values for ``config`` (the Network Args node's "unset" forms:
    -1 for a type rank, "" for emb_dims, 0 for LoRA+)."""
    values = config.to_dict()
    for name in TYPE_DIM_NAMES:
        values[name] = -1 if values[name] is None else values[name]
    values["emb_dims"] = values["emb_dims"] or ""
    values["loraplus_lr_ratio"] = values["loraplus_lr_ratio"] or 0.0
    return values


class _Builder:
    """An editor graph under construction: nodes laid out in columns, links as the editor stores them."""

    def __init__(self):
        self.nodes: List[dict] = []
        self.links: List[list] = []

    def add(self, kind: str, values: Dict[str, object], column: int, title: Optional[str] = None) -> int:
        cls = NODE_CLASS_MAPPINGS.get(kind) or _node_class(kind)
        spec = cls.INPUT_TYPES()
        info = {"input": spec, "input_order": {k: list(v) for k, v in spec.items() if k != "hidden"}}
        widgets = []
        for name, input_spec in widget_inputs(info):
            widgets.append(values[name] if name in values else default_widget_value(input_spec))
            if has_control_widget(name, input_spec):
                widgets.append("fixed")  # the run's seed stays as written
        widget_names = {n for n, _ in widget_inputs(info)}
        sockets = [{"name": n, "type": s[0] if isinstance(s[0], str) else "COMBO", "link": None}
                   for section in ("required", "optional") for n, s in spec.get(section, {}).items()
                   if n not in widget_names]
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (t, n) in enumerate(zip(cls.RETURN_TYPES, getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES))]
        # Stacked in their column, each as tall as the editor draws it (a smaller size gets re-laid out).
        height = 60 + 30 * (len(widgets) + max(len(sockets), len(outputs)))
        top = max([n["pos"][1] + n["size"][1] + 70 for n in self.nodes if n["pos"][0] == 40 + 420 * column] or [40])
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": [40 + 420 * column, top],
                "size": [380, height], "flags": {}, "order": len(self.nodes), "mode": 0,
                "inputs": sockets, "outputs": outputs, "properties": {"Node name for S&R": kind},
                "widgets_values": widgets}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def connect(self, src: int, slot: int, dst: int, input_name: str) -> None:
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        index = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input_name)
        link_id = len(self.links) + 1
        kind = target["inputs"][index]["type"]
        self.links.append([link_id, src, slot, dst, index, kind])
        target["inputs"][index]["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def build(plan: Plan, loaders: List[LoaderNode], config: TrainConfig, length: Length,
          resumed_step: int = 0) -> dict:
    """The editor workflow of the run: ``config`` and ``length`` as :func:`cli.run.run_length` gives
    them; ``resumed_step``: the step of the --resume state (the train node runs the rest)."""
    g = _Builder()
    sockets: Dict[str, tuple] = {}
    for loader in loaders:
        node_id = g.add(loader.node, loader.inputs, 0)
        sockets.update({socket: (node_id, slot) for socket, slot in loader.provides.items()})
    dataset = g.add(plan.dataset.node, plan.dataset.inputs, 0)
    groups = {name: g.add(node, _node_inputs(config, node), 1) for name, node in SETTING_GROUPS}
    settings = g.add("SD3LoraSettings", config.to_dict(), 2)
    for name, node_id in groups.items():
        g.connect(node_id, 0, settings, name)
    train = g.add("SD3LoraTrain", {"steps": max(1, length.total_steps - resumed_step)}, 3)
    for socket, name in (("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")):
        g.connect(*sockets[socket], train, name)
    g.connect(dataset, 0, train, "dataset")
    g.connect(settings, 0, train, "settings")
    _optional_nodes(g, plan, length, train)
    o = plan.outputs
    save = g.add("SD3LoraSave", {"output_name": o.output_name, "save_to": "output", "save_precision": o.save_precision,
                                 "diffusers_export": o.diffusers_export}, 4)
    g.connect(train, 1, save, "lora")
    return g.workflow()


def _optional_nodes(g: _Builder, plan: Plan, length: Length, train: int) -> None:
    """Sampling, Save Every and Resume, when the command line asks for them (epochs as steps)."""
    o = plan.outputs
    sampling = sampling_options(plan.sampling, o.output_name, length.steps_per_epoch)
    if sampling is not None:
        every = sampling.every_n_steps or sampling.every_n_epochs * sampling.steps_per_epoch
        node = g.add("SD3LoraSampling", {"sample_prompts": plan.sampling.prompts, "sample_every_n_steps": every,
                                         "sample_at_first": sampling.at_first, "sampler_name": sampling.sampler_name,
                                         "scheduler": sampling.scheduler, "filename_prefix": sampling.filename_prefix}, 2)
        g.connect(node, 0, train, "sampling")
    every = o.every_n_steps or o.every_n_epochs * length.steps_per_epoch
    if every:
        node = g.add("SD3LoraSaveEvery", {"output_name": o.output_name, "save_every_n_steps": every,
                                          "save_last_n_steps": o.last_n_steps, "save_to": "output",
                                          "save_precision": o.save_precision}, 2)
        g.connect(node, 0, train, "save_every")
    if plan.resume:
        node = g.add("SD3LoraResume", {"state_name": str(resume_stem(plan.resume)), "if_missing": "error"}, 2)
        g.connect(node, 0, train, "resume")


def write(path: str, workflow: dict) -> Path:
    """Write the workflow JSON (what the editor's Save writes)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(workflow, indent=1), encoding="utf-8")
    return path
