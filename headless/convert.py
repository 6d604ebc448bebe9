"""Convert editor (UI) workflows to ComfyUI's API prompt format, and apply overrides.

The editor format is what the graph editor saves: ``nodes`` (each with ``id``, ``type``,
``inputs``, ``outputs``, ``widgets_values``, ``mode``, maybe ``title``) and ``links``. The API
format is what POST /prompt takes::

    {"<node id>": {"class_type": ..., "inputs": {name: value or [source id, slot]},
                   "_meta": {"title": ...}}}

The editor does this conversion itself in the browser (``graphToPrompt``); this module does the
same from the server's /object_info, following the editor's conventions:

- ``widgets_values`` lists the node's widget values in the order of its widget inputs (required,
  then optional, as in ``input_order``); a seed-like INT (``control_after_generate``) is followed
  by one extra value, the control mode ("fixed", "randomize", ...), which the server never sees.
- A widget turned into an input and linked keeps its slot in ``widgets_values``; the link wins.
- Muted nodes (mode 2) are dropped. Bypassed nodes (mode 4) are dropped and their consumers are
  wired to the bypassed node's input of the same type.
- ``Reroute`` and ``PrimitiveNode`` exist only in the editor: links are followed through a
  Reroute, and a PrimitiveNode's value is written into the widget it feeds. Notes are dropped.
"""
import copy
import json
from dataclasses import dataclass

MODE_MUTED = 2
MODE_BYPASSED = 4

# Editor-only nodes with nothing to execute.
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
FRONTEND_ONLY_TYPES = NOTE_TYPES | {REROUTE, PRIMITIVE}

# Input types the editor shows as widgets (a list type is an old-style combo).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Values of the editor's "control after generate" widget.
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# The editor gives INT inputs with these names a control widget even without the flag.
LEGACY_SEED_NAMES = {"seed", "noise_seed"}


class ConversionError(ValueError):
    """The workflow cannot be converted (unknown node types, malformed file, bad override)."""


@dataclass(frozen=True)
class Link:
    """One editor link: output ``origin_slot`` of ``origin_id`` feeds input ``target_slot`` of ``target_id``."""

    id: int
    origin_id: object
    origin_slot: int
    target_id: object
    target_slot: int
    type: str


@dataclass(frozen=True)
class _Value:
    """A constant that replaces a link (the value of a PrimitiveNode)."""

    value: object


def is_editor_workflow(data):
    """True for an editor (UI) workflow: a dict with a ``nodes`` list."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def is_api_prompt(data):
    """True for an API prompt: a non-empty dict of nodes that each have a ``class_type``."""
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def parse_links(workflow):
    """The workflow's links by id. Accepts the list form ``[id, from, slot, to, slot, type]``
    and the object form (``origin_id``, ``origin_slot``, ...) of newer editor versions."""
    links = {}
    for raw in workflow.get("links") or []:
        if isinstance(raw, dict):
            link = Link(raw["id"], raw["origin_id"], raw["origin_slot"], raw["target_id"],
                        raw["target_slot"], raw.get("type"))
        else:
            link = Link(*raw[:6])
        links[link.id] = link
    return links


def _input_spec_options(spec):
    """The options dict of an /object_info input spec ``[type, {options}]`` ({} when absent)."""
    if len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def is_widget_input(spec):
    """Whether an /object_info input spec is shown as a widget (and so has a widgets_values slot)."""
    kind = spec[0]
    if _input_spec_options(spec).get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(name, spec):
    """Whether the editor adds a "control after generate" widget after this input."""
    kind = spec[0]
    flag = _input_spec_options(spec).get("control_after_generate")
    if flag is not None:
        return bool(flag)
    return kind == "INT" and name in LEGACY_SEED_NAMES


def widget_inputs(node_info):
    """``[(name, spec)]`` of a node class's widget inputs, in the order the editor creates them."""
    declared = node_info.get("input", {})
    order = node_info.get("input_order") or {section: list(declared.get(section, {}))
                                              for section in ("required", "optional")}
    result = []
    for section in ("required", "optional"):
        specs = declared.get(section, {})
        for name in order.get(section, []):
            if name in specs and is_widget_input(specs[name]):
                result.append((name, specs[name]))
    return result


def default_widget_value(spec):
    """The value a widget starts with in the editor: its default, else a combo's first option."""
    options = _input_spec_options(spec)
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    if choices:
        return choices[0]
    return None


def map_widget_values(node, node_info):
    """``{input name: value}`` for the node's widgets, read from its ``widgets_values``.

    Widgets missing at the end of a list (a workflow saved by an older version of the node)
    get their default values, as the editor gives them when it loads such a workflow.
    """
    widgets = widget_inputs(node_info)
    values = node.get("widgets_values")
    if isinstance(values, dict):
        # Some nodes serialise their widgets by name.
        mapped = {name: values[name] for name, _ in widgets if name in values}
    else:
        mapped = {}
        values = list(values or [])
        position = 0
        for name, spec in widgets:
            if position >= len(values):
                break
            mapped[name] = values[position]
            position += 1
            if has_control_widget(name, spec) and position < len(values) \
                    and isinstance(values[position], str) and values[position] in CONTROL_VALUES:
                position += 1  # the control mode: editor-side only
    for name, spec in widgets:
        if name not in mapped:
            default = default_widget_value(spec)
            if default is not None:
                mapped[name] = default
    return mapped


class _Graph:
    """The editor graph, with the link-following rules of the editor's own conversion."""

    def __init__(self, workflow):
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self.links = parse_links(workflow)

    def resolve(self, link_id, wanted_type):
        """Follow a link back to what the API prompt should receive for it.

        Returns ``[source id, slot]``, a :class:`_Value` (from a PrimitiveNode), or None when
        nothing executable feeds it (a muted source, an unconnected bypass, a dangling link).
        ``wanted_type`` is the consuming input's type, used to pick a bypassed node's input.
        """
        seen = set()
        link = self.links.get(link_id)
        while link is not None:
            source = self.nodes.get(link.origin_id)
            if source is None or source["id"] in seen:
                return None  # dangling link, or a cycle of reroutes/bypasses
            seen.add(source["id"])
            kind = source.get("type")
            if kind == PRIMITIVE:
                values = source.get("widgets_values") or [None]
                return _Value(values[0])
            if kind == REROUTE:
                link = self.links.get(_input_link(source, 0))
            elif source.get("mode") == MODE_MUTED:
                return None
            elif source.get("mode") == MODE_BYPASSED:
                link = self.links.get(self._bypass_input_link(source, link.origin_slot, wanted_type))
            else:
                return [str(source["id"]), link.origin_slot]
        return None

    @staticmethod
    def _bypass_input_link(node, output_slot, wanted_type):
        """The link id a bypassed node passes through for an output of ``wanted_type``.

        Like the editor: the input at the output's slot index if its type matches, else the
        first input of that type. None when no input matches or the matching one is unlinked.
        """
        inputs = node.get("inputs") or []
        candidates = [output_slot] + list(range(len(inputs)))
        for index in candidates:
            if index < len(inputs) and inputs[index].get("type") == wanted_type:
                return inputs[index].get("link")
        return None


def _input_link(node, slot):
    """The link id into input ``slot`` of an editor node (None when unlinked or absent)."""
    inputs = node.get("inputs") or []
    return inputs[slot].get("link") if slot < len(inputs) else None


def _input_name(editor_input):
    """The API input name of an editor input (a converted widget is named by its widget)."""
    widget = editor_input.get("widget")
    if isinstance(widget, dict) and widget.get("name"):
        return widget["name"]
    return editor_input["name"]


def _check_node_types(nodes, object_info, workflow):
    """Raise ConversionError naming every node type the server does not know."""
    subgraph_ids = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    missing, subgraphs = set(), set()
    for node in nodes:
        kind = node.get("type")
        if kind in FRONTEND_ONLY_TYPES or kind in object_info:
            continue
        (subgraphs if kind in subgraph_ids else missing).add(str(kind))
    if subgraphs:
        raise ConversionError("this workflow uses subgraphs, which the headless converter does not expand "
                              "(unpack them in the editor first): " + ", ".join(sorted(subgraphs)))
    if missing:
        raise ConversionError(f"missing node types: {', '.join(sorted(missing))} — install the pack that "
                              "provides them (or check that it imported without errors in the server log)")


def _convert_node(node, graph, object_info):
    """The API prompt entry of one executable editor node."""
    info = object_info[node["type"]]
    inputs = map_widget_values(node, info)
    for editor_input in node.get("inputs") or []:
        if editor_input.get("link") is None:
            continue
        link = graph.links.get(editor_input["link"])
        wanted_type = editor_input.get("type") or (link.type if link else None)
        source = graph.resolve(editor_input["link"], wanted_type)
        # An input fed by nothing executable keeps its widget value (if it has one), as in the editor.
        if isinstance(source, _Value):
            inputs[_input_name(editor_input)] = source.value
        elif source is not None:
            inputs[_input_name(editor_input)] = source
    title = node.get("title") or info.get("display_name") or node["type"]
    return {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}


def editor_to_api(workflow, object_info):
    """Convert an editor (UI) workflow to the API prompt format using the server's /object_info.

    Raises ConversionError for a malformed workflow or node types the server does not have.
    """
    if not is_editor_workflow(workflow):
        raise ConversionError("not an editor workflow (no 'nodes' list)")
    executable = [n for n in workflow["nodes"]
                  if n.get("mode") not in (MODE_MUTED, MODE_BYPASSED) and n.get("type") not in FRONTEND_ONLY_TYPES]
    _check_node_types(executable, object_info, workflow)
    graph = _Graph(workflow)
    return {str(node["id"]): _convert_node(node, graph, object_info) for node in executable}


def parse_override(text):
    """Split ``NODE.input=value`` into ``(node, input, value)``; value is JSON when it parses.

    NODE may itself contain dots (a title such as "Save v1.5"): the input name is what follows
    the last dot before the ``=``.
    """
    target, sep, raw = text.partition("=")
    node, dot, name = target.rpartition(".")
    if not sep or not dot or not node or not name:
        raise ConversionError(f"bad override {text!r}: expected NODE.input=value")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # plain text: a file name, a prompt, a sampler name...
    return node.strip(), name.strip(), value


def _id_order(node_id):
    """Sort key putting numeric node ids in numeric order ("6" before "10")."""
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def find_node(api_prompt, ref):
    """The id of the node that ``ref`` names: a node id, else a title, else a class_type.

    Raises ConversionError when nothing matches or when the match is ambiguous.
    """
    if ref in api_prompt:
        return ref
    by_title = ("title", lambda node: node.get("_meta", {}).get("title"))
    by_class = ("class_type", lambda node: node.get("class_type"))
    for what, key in (by_title, by_class):
        matches = sorted((node_id for node_id, node in api_prompt.items() if key(node) == ref), key=_id_order)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConversionError(f"{ref!r} is ambiguous: it is the {what} of nodes {', '.join(matches)}; "
                                  "use a node id")
    raise ConversionError(f"no node with id, title or class_type {ref!r}")


def _known_inputs(node, object_info):
    """Names of the inputs an override may set on ``node``."""
    names = set(node.get("inputs", {}))
    info = (object_info or {}).get(node.get("class_type"), {})
    for section in ("required", "optional"):
        names.update(info.get("input", {}).get(section, {}))
    return names


def apply_overrides(api_prompt, overrides, object_info=None):
    """A copy of ``api_prompt`` with each ``NODE.input=value`` override applied.

    The input must already be in the node's inputs, or (when ``object_info`` is given) be
    declared by its class, so a typo fails loudly instead of being ignored by the server.
    """
    prompt = copy.deepcopy(api_prompt)
    for text in overrides or []:
        ref, name, value = parse_override(text)
        node_id = find_node(prompt, ref)
        node = prompt[node_id]
        known = _known_inputs(node, object_info)
        if name not in known:
            raise ConversionError(f"node {node_id} ({node.get('class_type')}) has no input {name!r}; "
                                  f"its inputs: {', '.join(sorted(known))}")
        node.setdefault("inputs", {})[name] = value
    return prompt
