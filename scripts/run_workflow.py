#!/usr/bin/env python
"""Run a ComfyUI workflow headlessly and print what it produced.

    python scripts/run_workflow.py WORKFLOW.json [--set NODE.input=value ...]
        [--url http://127.0.0.1:8188 | --base-dir DIR] [--api-out FILE]

WORKFLOW.json is an editor (UI) workflow, converted with the server's /object_info, or an API
prompt, used as is. NODE in ``--set`` is a node id, a node title or a class type; the value is
read as JSON when it parses (numbers, true/false), else as text.

With ``--base-dir`` a fresh local server is started with that base directory (this repository
linked into its custom_nodes/ as ``sd3_lora_trainer``) and stopped at the end. Exit status: 0 on
success, 1 when the workflow is rejected or a node fails, 2 for usage errors, 130 on Ctrl-C.
"""
import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from headless import (  # noqa: E402
    ConversionError, ServerStartError, WorkflowError, apply_overrides, editor_to_api, get_object_info,
    interrupt, is_api_prompt, is_editor_workflow, output_files, run_prompt, start_server)
from headless.server import server_versions  # noqa: E402

PACK_NAME = "sd3_lora_trainer"
# Messages that only repeat what other messages already say.
QUIET_EVENTS = {"status", "progress_state", "execution_start", "feature_flags", "executed"}


def parse_args(argv=None):
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="workflow JSON (editor or API format)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.input=value",
                        help="set an input before queuing (repeatable)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI server")
    where.add_argument("--base-dir", type=Path, help="start a local server with this base directory")
    parser.add_argument("--host-dir", type=Path, default=None,
                        help="ComfyUI source tree for --base-dir (default: $COMFYUI_DIR, else the one "
                             "scripts/setup.sh unpacks); it runs in the venv set-up built for it")
    parser.add_argument("--api-out", type=Path, help="also write the API prompt that is queued to this file")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds allowed for the run")
    return parser.parse_args(argv)


def ensure_pack_linked(base_dir):
    """Link this repository into ``base_dir/custom_nodes`` unless some entry there already is it."""
    custom_nodes = Path(base_dir) / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    for entry in custom_nodes.iterdir():
        if entry.resolve() == REPO_ROOT:
            return entry
    link = custom_nodes / PACK_NAME
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def to_api_prompt(workflow, url, overrides):
    """The API prompt to queue: converted if needed, with the overrides applied."""
    object_info = get_object_info(url)
    if is_editor_workflow(workflow):
        prompt = editor_to_api(workflow, object_info)
    elif is_api_prompt(workflow):
        prompt = workflow
    else:
        raise ConversionError("neither an editor workflow (with 'nodes') nor an API prompt (nodes with 'class_type')")
    return apply_overrides(prompt, overrides, object_info)


class ProgressPrinter:
    """Prints execution events: one line per node, an in-place bar (or lines) for progress."""

    def __init__(self, api_prompt, stream=sys.stdout):
        self.prompt = api_prompt
        self.stream = stream
        self.in_place = stream.isatty()
        self.bar_open = False
        self.prompt_id = None  # known once queued; Ctrl-C interrupts only this prompt

    def label(self, node_id):
        """``id ClassType`` of a node of the prompt."""
        node = self.prompt.get(str(node_id), {})
        return f"{node_id} {node.get('class_type', '?')}"

    def line(self, text):
        """Print a full line, ending an in-place progress bar first."""
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, data):
        """One progress update: ``node value/max``."""
        value, total = data.get("value", 0), data.get("max", 0) or 1
        text = f"  [{self.label(data.get('node'))}] {value}/{total}"
        if self.in_place:
            filled = int(30 * value / total)
            self.stream.write(f"\r{text} |{'#' * filled}{'.' * (30 - filled)}|")
            self.stream.flush()
            self.bar_open = True
        else:
            self.line(text)

    def __call__(self, kind, data):
        if kind == "progress":
            self.progress(data)
        elif kind == "prompt_queued":
            self.prompt_id = data.get("prompt_id")
            self.line(f"queued prompt {self.prompt_id}")
            for node_id, entry in (data.get("node_errors") or {}).items():
                self.line(f"  warning: node {node_id} ({entry.get('class_type')}) is invalid; its outputs are skipped")
        elif kind == "executing" and data.get("node") is not None:
            self.line(f"running [{self.label(data['node'])}]")
        elif kind == "execution_cached" and data.get("nodes"):
            self.line(f"cached: {', '.join(map(str, data['nodes']))}")
        elif kind == "progress_text":
            self.line(f"  [{self.label(data.get('node'))}] {data.get('text')}")
        elif kind not in QUIET_EVENTS and kind not in ("executing", "execution_cached", "execution_success"):
            self.line(f"{kind}: {json.dumps(data)[:300]}")


def print_outputs(entry, base_dir=None):
    """List the files the run produced (local paths when the base directory is known)."""
    files = output_files(entry)
    if not files:
        print("no output files")
    for node_id, item in files:
        relative = Path(item.get("type", "output"), item.get("subfolder", ""), item["filename"])
        local = base_dir is not None and item.get("type") in ("output", "temp", "input")
        where = Path(base_dir) / relative if local else relative
        print(f"output: node {node_id}: {where}")


def run(args):
    """Convert, queue and follow the workflow; return the exit status."""
    workflow = json.loads(args.workflow.read_text())
    url = args.url
    server = None
    try:
        if args.base_dir is not None:
            ensure_pack_linked(args.base_dir)
            print(f"starting ComfyUI with base directory {args.base_dir} ...", flush=True)
            server = start_server(args.base_dir, host_dir=args.host_dir)
            url = server.url
            print(f"server {url} (pid {server.pid}, log {server.log_path})", flush=True)
        print(f"{url}: {server_versions(url)}", flush=True)
        prompt = to_api_prompt(workflow, url, args.overrides)
        if args.api_out:
            args.api_out.write_text(json.dumps(prompt, indent=2))
        # Like the editor, embed the workflow in saved images' metadata.
        extra = {"extra_pnginfo": {"workflow": workflow}} if is_editor_workflow(workflow) else None
        printer = ProgressPrinter(prompt)
        try:
            entry = run_prompt(url, prompt, on_event=printer, timeout=args.timeout, extra_data=extra)
        except KeyboardInterrupt:
            if printer.prompt_id:
                interrupt(url, printer.prompt_id)
            print("\ninterrupted", file=sys.stderr)
            return 130
        print_outputs(entry, args.base_dir)
        return 0
    except (ConversionError, WorkflowError, ServerStartError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()


def main(argv=None):
    """Entry point."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
