"""Queue-time checks: each node's ``VALIDATE_INPUTS``, and the train node's look at what follows it.

The host calls a node's ``VALIDATE_INPUTS`` classmethod when a prompt is queued, before any node
runs, with the widget inputs it names as parameters (a linked input arrives as None: its value
exists only once the graph runs). A string it returns refuses the prompt with that message on the
node. Two host details shape this module:

- For every input a ``VALIDATE_INPUTS`` names, the host skips its own min/max and choice checks,
  and it never checks that a FLOAT is finite (NaN passes both comparisons). So
  :func:`widget_problem` does all three for the named inputs.
- A prompt whose invalid node is one output among several still runs the valid outputs. A bad
  Save name next to a preview would train (for the preview) and drop the save, so the train node
  runs :func:`downstream_problems` first and refuses to train when a node after it would not run.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Dict, List, Optional, Union

NodeCheck = Callable[[], object]  # raises ValueError / OSError with the message when something is wrong


def _spec(node_cls) -> Dict[str, tuple]:
    types = node_cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def _number_problem(name: str, value, options: dict) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number (got {value!r})"
    if isinstance(value, float) and not math.isfinite(value):
        lo, hi = options.get("min"), options.get("max")
        where = f" between {lo} and {hi}" if lo is not None and hi is not None else ""
        return f"{name} is {value}: set a finite number{where}"
    if "min" in options and value < options["min"]:
        return f"{name} {value} is below its minimum {options['min']}: raise it"
    if "max" in options and value > options["max"]:
        return f"{name} {value} is above its maximum {options['max']}: lower it"
    return None


def widget_problem(node_cls, values: dict) -> Optional[str]:
    """The first of ``values`` (widget inputs of ``node_cls`` by name) that is out of its declared
    range, not a finite number, or not one of its choices; None when all are fine.

    Example:
        >>> widget_problem(SD3LoraSettings, {"max_grad_norm": float("nan")})
        'max_grad_norm is nan: set a finite number between 0 and 100'
    """
    spec = _spec(node_cls)
    for name, value in values.items():
        if value is None or name not in spec:
            continue  # linked: checked when the node runs
        kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if isinstance(kind, (list, tuple)):
            if value not in kind:
                return f"{name} {value!r} is not one of: {', '.join(map(str, kind))}"
        elif kind in ("INT", "FLOAT"):
            problem = _number_problem(name, value, options)
            if problem:
                return problem
    return None


def run_check(check: NodeCheck) -> Optional[str]:
    """The text of the ValueError / OSError ``check()`` raises, or None when it returns (whatever
    it returns: checks are the same functions the nodes call to get their values)."""
    try:
        check()
    except (ValueError, OSError) as e:
        return str(e)
    return None


def given(value, check: Callable[[object], object]) -> NodeCheck:
    """A check that runs ``check(value)`` unless ``value`` is None (a linked input: its value is
    known only when the node runs, and the node checks it then).

    Example:
        >>> report(cls, locals(), given(output_name, lambda v: plain_name(v, "output_name", "x")))
    """
    return lambda: None if value is None else check(value)


def report(node_cls, values: dict, *checks: NodeCheck) -> Union[bool, str]:
    """What a ``VALIDATE_INPUTS`` returns: True, or the first problem of :func:`widget_problem`
    on ``values`` (its own arguments; ``cls`` is ignored) and then of each check in turn."""
    values = {k: v for k, v in values.items() if k != "cls"}
    problem = widget_problem(node_cls, values)
    for check in checks:
        if problem:
            break
        problem = run_check(check)
    return problem or True


def node_problem(node_cls, inputs: dict) -> Optional[str]:
    """Why ``node_cls`` would refuse the literal ``inputs`` of a prompt entry (links count as None),
    asking it the way the host does: its declared ranges and choices, then its VALIDATE_INPUTS."""
    literal = {k: (None if isinstance(v, list) else v) for k, v in inputs.items()}
    problem = widget_problem(node_cls, literal)
    validate = getattr(node_cls, "VALIDATE_INPUTS", None)
    if problem or validate is None:
        return problem
    wanted = [a for a in inspect.getfullargspec(validate).args if a != "cls"]
    try:
        result = validate(**{k: literal[k] for k in wanted if k in literal})
    except (ValueError, OSError) as e:
        return str(e)
    return None if result is True else str(result)


def downstream_ids(prompt: dict, node_id: str) -> List[str]:
    """Ids of the nodes of an API-format ``prompt`` that take an output of ``node_id``, directly or further on."""
    found, frontier = [], [str(node_id)]
    while frontier:
        current = frontier.pop()
        for other, entry in prompt.items():
            links = [v for v in (entry.get("inputs") or {}).values() if isinstance(v, list) and len(v) == 2]
            if other not in found and any(str(src) == current for src, _ in links):
                found.append(other)
                frontier.append(other)
    return found


def downstream_problems(prompt: Optional[dict], node_id, classes: dict) -> List[str]:
    """"node 12 (SD3LoraSave): <why>" for each node after ``node_id`` whose class is in ``classes``
    ({class_type: node class}) and would refuse its inputs."""
    problems = []
    for other in downstream_ids(prompt or {}, str(node_id)):
        entry = prompt[other]
        node_cls = classes.get(entry.get("class_type"))
        problem = node_problem(node_cls, entry.get("inputs") or {}) if node_cls is not None else None
        if problem:
            problems.append(f"node {other} ({entry['class_type']}): {problem}")
    return problems
