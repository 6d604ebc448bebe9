"""sd-scripts dataset config files (``--dataset_config my_sd3_dataset_config.toml``): ``[general]``,
``[[datasets]]`` and ``[[datasets.subsets]]``, where each level's keys are the defaults of the
levels below it. Errors name the file, the line, the key and what is accepted."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .captions import CaptionOptions
from .data import DatasetError, Subset
from .dataset import DatasetOptions

# key -> expected type; "resolution" is an int or a [width, height] pair.
SUBSET_KEYS = {"image_dir": str, "num_repeats": int, "caption_extension": str, "is_reg": bool, "flip_aug": bool,
               "random_crop": bool, "color_aug": bool, "alpha_mask": bool}
CAPTION_KEYS = {"class_tokens": str, "caption_prefix": str, "caption_suffix": str, "caption_separator": str,
                "shuffle_caption": bool, "keep_tokens": int, "keep_tokens_separator": str,
                "caption_dropout_rate": float, "caption_dropout_every_n_epochs": int,
                "caption_tag_dropout_rate": float, "enable_wildcard": bool}
DATASET_KEYS = {"resolution": "resolution", "batch_size": int, "enable_bucket": bool, "min_bucket_reso": int,
                "max_bucket_reso": int, "bucket_reso_steps": int, "bucket_no_upscale": bool,
                "validation_split": float, "validation_seed": int}
# sd-scripts keys that exist there but not (yet) here: named as such instead of "unknown".
UNSUPPORTED = ("metadata_file", "face_crop_aug_range", "token_warmup_min", "token_warmup_step",
               "secondary_separator", "conditioning_data_dir", "cache_info", "custom_attributes",
               "resize_interpolation", "network_multiplier")
SUBSET_LEVEL = {**SUBSET_KEYS, **CAPTION_KEYS}
ALL_KEYS = {**DATASET_KEYS, **SUBSET_LEVEL}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
               "resolution": "an integer or [width, height]"}


class _Where:
    """Finds the line of a key inside the n-th table of a kind, for error messages."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()
        self.sections: List[Tuple[str, int]] = [("", 0)]  # (table header, first line index)
        for i, line in enumerate(self.lines):
            m = re.match(r"\s*(\[\[?[^\]]+\]\]?)", line)
            if m:
                self.sections.append((m.group(1).replace(" ", ""), i))

    def line_of(self, key: str, header: str, nth: int) -> Optional[int]:
        """1-based line of ``key`` in the ``nth`` (0-based) table named ``header`` (e.g. "[[datasets]]")."""
        starts = [i for k, (h, i) in enumerate(self.sections) if h == header]
        if nth >= len(starts):
            return None
        nxt = [i for _, i in self.sections if i > starts[nth]]
        end = nxt[0] if nxt else len(self.lines)
        for i in range(starts[nth], end):
            if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[i]):
                return i + 1
        return None

    def error(self, msg: str, key: str, header: str, nth: int) -> DatasetError:
        return self.at(msg, self.line_of(key, header, nth))

    def at(self, msg: str, line: Optional[int]) -> DatasetError:
        return DatasetError(f"{self.path}{f', line {line}' if line else ''}: {msg}")

    def first_line(self, name: str) -> Optional[int]:
        """1-based line of the first ``[name]`` / ``[[name]]`` header or ``key = `` for the last part of ``name``."""
        key = re.escape(name.rsplit(".", 1)[-1])
        pattern = re.compile(rf"\s*(\[\[?\s*{re.escape(name)}\s*\]\]?|{key}\s*=)")
        return next((i + 1 for i, line in enumerate(self.lines) if pattern.match(line)), None)


def _check_value(key: str, value, expected):
    """``value`` converted to the expected type, or None if it has the wrong type."""
    if expected == "resolution":
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
            return tuple(value)
        return None
    if expected is float and type(value) in (int, float):
        return float(value)
    return value if type(value) is expected else None


def _read_table(table: dict, allowed: Dict[str, object], label: str, where: _Where, header: str, nth: int) -> dict:
    """The checked values of one TOML table (sub-tables skipped); errors name the key and the line."""
    out = {}
    for key, value in table.items():
        if key == "subsets" and header == "[[datasets]]":
            continue
        if key in UNSUPPORTED:
            raise where.error(f"'{key}' in {label} is an sd-scripts key this trainer does not support; remove it",
                              key, header, nth)
        if key not in allowed:
            raise where.error(f"unknown key '{key}' in {label}; valid keys there: {', '.join(sorted(allowed))}",
                              key, header, nth)
        checked = _check_value(key, value, allowed[key])
        if checked is None:
            raise where.error(f"'{key}' in {label} must be {_TYPE_NAMES[allowed[key]]} (got {value!r})",
                              key, header, nth)
        out[key] = checked
    return out


def _subset(values: dict, base_dir: Path, label: str, where: _Where, nth: int) -> Subset:
    """A Subset from merged values; relative image_dir is taken from the TOML file's folder."""
    if "image_dir" not in values:
        raise where.error(f"{label} has no image_dir: set image_dir = \"/path/to/images\"", "image_dir",
                          "[[datasets.subsets]]", nth)
    if values.get("num_repeats", 1) < 1:
        raise where.error(f"num_repeats in {label} must be at least 1 (got {values['num_repeats']})",
                          "num_repeats", "[[datasets.subsets]]", nth)
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= values.get(key, 0.0) <= 1.0:
            raise where.error(f"{key} in {label} must be between 0 and 1 (got {values[key]})", key,
                              "[[datasets.subsets]]", nth)
    for key in ("keep_tokens", "caption_dropout_every_n_epochs"):
        if values.get(key, 0) < 0:
            raise where.error(f"{key} in {label} must be >= 0 (got {values[key]})", key, "[[datasets.subsets]]", nth)
    image_dir = Path(values["image_dir"]).expanduser()
    image_dir = image_dir if image_dir.is_absolute() else (base_dir / image_dir)
    captions = CaptionOptions(**{k: v for k, v in values.items() if k in CAPTION_KEYS})
    fields = {k: v for k, v in values.items() if k in SUBSET_KEYS}
    return Subset(**dict(fields, image_dir=str(image_dir.resolve())), captions=captions)


def _table(value, name: str, where: _Where) -> dict:
    """``[name]``'s table, or a DatasetError saying how to write it (e.g. ``[[general]]`` for ``[general]``)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        raise where.at(f"[[{name}]] (double brackets) makes a list; there is one {name} table: write [{name}]",
                       where.first_line(name))
    raise where.at(f"'{name}' must be the table [{name}] (got {value!r})", where.first_line(name))


def _tables(value, name: str, where: _Where, context: str = "") -> List[dict]:
    """``[[name]]``'s tables, or a DatasetError saying how to write them (``[[datasets.subsets]]``
    for ``[datasets.subsets]``, never ``subsets = "x"``)."""
    key, context = name.rsplit(".", 1)[-1], f" {context}" if context else ""
    if isinstance(value, dict):
        raise where.at(f"[{name}]{context} (single brackets) is one table; write [[{name}]] (double brackets), "
                       f"once per {key[:-1]}", where.first_line(name))
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise where.at(f"'{key}'{context} must be [[{name}]] tables (got {value!r}); write each as [[{name}]] "
                       f"followed by its keys", where.first_line(name))
    return value


def parse_dataset_toml(path: str | Path, defaults: Optional[dict] = None) -> List[Tuple[DatasetOptions, List[Subset]]]:
    """Each ``[[datasets]]`` of an sd-scripts dataset config as (options, subsets).

    ``defaults`` stand for sd-scripts' command-line values (e.g. {"resolution": (512, 512)}):
    the file's own keys win over them."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"dataset config not found: {path}. Set toml_path to an sd-scripts dataset .toml file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no TOML syntax error
        doc = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:  # its message carries "(at line L, column C)"
        raise DatasetError(f"{path}: TOML syntax error: {e}") from e
    where = _Where(path, text)
    unknown = sorted(set(doc) - {"general", "datasets"})
    if unknown:
        raise where.error(f"unknown table or key '{unknown[0]}'; a dataset config has [general] and [[datasets]] "
                          f"(with [[datasets.subsets]])", unknown[0], "", 0)
    general = _read_table(_table(doc.get("general", {}), "general", where), ALL_KEYS, "[general]", where,
                          "[general]", 0)
    datasets = _tables(doc.get("datasets", []), "datasets", where)
    if not datasets:
        raise DatasetError(f"{path}: no [[datasets]]; add one with at least one [[datasets.subsets]] image_dir")
    out, subset_no = [], 0
    for d, ds in enumerate(datasets):
        label = f"[[datasets]] #{d + 1}"
        merged = {**(defaults or {}), **general, **_read_table(ds, ALL_KEYS, label, where, "[[datasets]]", d)}
        opts = DatasetOptions(**{k: v for k, v in merged.items() if k in DATASET_KEYS}).validate(f"{path}: {label}")
        if "resolution" not in merged:
            raise DatasetError(f"{path}: {label} has no resolution (sd-scripts takes it from --resolution): "
                               f"set resolution = 1024 in [general] or in the dataset")
        subsets = []
        for s, sub in enumerate(_tables(ds.get("subsets", []), "datasets.subsets", where, f"in {label}")):
            slabel = f"{label} subset #{s + 1}"
            values = {**{k: v for k, v in merged.items() if k in SUBSET_LEVEL},
                      **_read_table(sub, SUBSET_LEVEL, slabel, where, "[[datasets.subsets]]", subset_no)}
            subsets.append(_subset(values, path.parent, slabel, where, subset_no))
            subset_no += 1
        if not subsets:
            raise DatasetError(f"{path}: {label} has no [[datasets.subsets]]; add one with image_dir = \"...\"")
        out.append((opts, subsets))
    return out
