"""``--config_file``: sd-scripts' arguments written as TOML, read as defaults under the command line.

As in sd-scripts, keys may sit at the top level or inside any table (tables only group them),
and an argument given on the command line wins over the file's value.
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Dict, Optional

import toml

from .arguments import CliError, unknown_error

HEADER = "# sd3_train_network.py --config_file: every argument of the run (the command line overrides them)\n"


def read(path: str | Path, parser: argparse.ArgumentParser) -> Dict[str, object]:
    """The file's arguments by name, checked against ``parser``.

    Raises:
        CliError: naming the file for a missing file, a syntax error (with its line) or an unknown key.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CliError(f"--config_file {path}: no such file; pass the .toml written by --output_config or the Save node")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"--config_file {path}: not valid TOML ({e})") from e
    flat: Dict[str, object] = {}
    for key, value in doc.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    dests = {a.dest for a in parser._actions}
    for key in flat:
        if key not in dests or key == "config_file":
            raise unknown_error(parser, ["--" + key], where=f" in --config_file {path}")
    return flat


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv`` over the defaults of its ``--config_file`` (when it names one)."""
    first, _ = parser.parse_known_args(argv)
    if first.config_file:
        parser.set_defaults(**read(first.config_file, parser))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise unknown_error(parser, unknown)
    return args


def write(path: str | Path, values: Dict[str, object], comment: Optional[str] = None) -> Path:
    """Write ``values`` (argument name -> value; None values left out) as a --config_file TOML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = toml.dumps({k: v for k, v in values.items() if v is not None})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(HEADER + (f"# {comment}\n" if comment else "") + body, encoding="utf-8")
    tmp.replace(path)
    return path
