"""Queue a prompt on a ComfyUI server and follow it to the end.

Protocol (ComfyUI 0.3.75, unchanged in newer releases):

- websocket ``/ws?clientId=ID``: JSON text frames ``{"type": ..., "data": ...}`` (``status``,
  ``execution_start``, ``execution_cached``, ``executing``, ``progress``, ``progress_state``,
  ``executed``, ``execution_success``, ``execution_error``, ``execution_interrupted`` and any
  type a custom node sends) and binary frames whose first 4 bytes (big-endian) give their kind:
  1/2/4 preview images, 3 progress text (4-byte length, node id, UTF-8 text).
- POST ``/prompt`` ``{"prompt", "client_id", "extra_data"}`` answers ``{"prompt_id", "number",
  "node_errors"}``, or HTTP 400 ``{"error": {...}, "node_errors": {id: {"errors": [...],
  "class_type": ...}}}`` when validation fails.
- GET ``/history/{prompt_id}`` answers ``{}`` until the prompt's entry is written, which
  happens after ``execution_success`` is sent: it has to be polled.
"""
import json
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import websocket  # websocket-client

BINARY_PROGRESS_TEXT = 3  # server.BinaryEventTypes.TEXT
WS_POLL_SECONDS = 1.0


class WorkflowError(RuntimeError):
    """The server rejected the prompt, or a node failed while it ran.

    Attributes: ``prompt_id``, ``node_id``, ``node_type``, ``exception_type``, ``traceback``
    (list of lines) for execution errors; ``node_errors`` (the server's dict) for validation errors.
    """

    def __init__(self, message, prompt_id=None, node_id=None, node_type=None, exception_type=None,
                 traceback=None, node_errors=None):
        super().__init__(message)
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.traceback = traceback or []
        self.node_errors = node_errors or {}


def _http_json(url, body=None, timeout=30.0):
    """GET (or POST ``body`` as JSON) and decode the JSON answer. HTTP errors propagate."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def get_object_info(url, timeout=60.0):
    """The server's GET /object_info: every node class with its inputs and outputs."""
    return _http_json(url.rstrip("/") + "/object_info", timeout=timeout)


def get_history(url, prompt_id, timeout=30.0):
    """The history entry of ``prompt_id``, or None while the server has not written it yet."""
    answer = _http_json(f"{url.rstrip('/')}/history/{urllib.parse.quote(prompt_id)}", timeout=timeout)
    return (answer or {}).get(prompt_id)


def interrupt(url, prompt_id=None):
    """Ask the server to stop the running prompt (only that prompt when ``prompt_id`` is given)."""
    _http_json(url.rstrip("/") + "/interrupt", body={"prompt_id": prompt_id} if prompt_id else {})


def websocket_url(url, client_id):
    """The ws:// (or wss://) address of the server's websocket for ``client_id``."""
    parts = urllib.parse.urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}/ws?clientId={urllib.parse.quote(client_id)}"


def format_validation_error(answer, api_prompt=None):
    """A readable message from a rejected POST /prompt answer: one line per failing input."""
    error = answer.get("error") or {}
    if isinstance(error, str):
        error = {"message": error}
    lines = [error.get("message") or "the server rejected the prompt"]
    node_errors = answer.get("node_errors") or {}
    for node_id, entry in sorted(node_errors.items()):
        class_type = entry.get("class_type", "?")
        title = ((api_prompt or {}).get(node_id) or {}).get("_meta", {}).get("title")
        named = f'"{title}" ' if title and title != class_type else ""
        label = f"node {node_id} {named}({class_type})"
        for reason in entry.get("errors", []):
            input_name = (reason.get("extra_info") or {}).get("input_name")
            where = f"{label}, input {input_name!r}" if input_name else label
            lines.append(f"  {where}: {reason.get('message', '')}: {reason.get('details', '')}")
    if not node_errors and error.get("details"):
        lines.append(f"  {error['details']}")
    return "\n".join(lines)


def queue_prompt(url, api_prompt, client_id, extra_data=None):
    """POST the prompt; return the server's answer. Raises WorkflowError when it is rejected."""
    body = {"prompt": api_prompt, "client_id": client_id}
    if extra_data:
        body["extra_data"] = extra_data
    try:
        return _http_json(url.rstrip("/") + "/prompt", body=body)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            raise WorkflowError(f"POST /prompt failed with HTTP {err.code}: {raw[:2000]!r}") from None
        raise WorkflowError(format_validation_error(answer, api_prompt),
                            node_errors=answer.get("node_errors")) from None


def execution_error(data):
    """WorkflowError from the data of an ``execution_error`` message (or history status message)."""
    node = f"node {data.get('node_id')} ({data.get('node_type')})"
    return WorkflowError(f"{node} failed: {data.get('exception_type')}: {data.get('exception_message')}",
                         prompt_id=data.get("prompt_id"), node_id=data.get("node_id"),
                         node_type=data.get("node_type"), exception_type=data.get("exception_type"),
                         traceback=data.get("traceback"))


def interrupted_error(data):
    """WorkflowError from the data of an ``execution_interrupted`` message."""
    return WorkflowError(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})",
                         prompt_id=data.get("prompt_id"), node_id=data.get("node_id"),
                         node_type=data.get("node_type"))


def decode_binary_frame(frame):
    """``(type, data)`` for a binary frame worth reporting, else None.

    Progress text (kind 3) becomes ``("progress_text", {"node", "text"})``; previews and frames
    of unknown kinds are skipped.
    """
    if len(frame) < 8 or struct.unpack(">I", frame[:4])[0] != BINARY_PROGRESS_TEXT:
        return None
    (id_length,) = struct.unpack(">I", frame[4:8])
    node_id = frame[8:8 + id_length].decode("utf-8", errors="replace")
    text = frame[8 + id_length:].decode("utf-8", errors="replace")
    return "progress_text", {"node": node_id, "text": text}


def _error_from_history(entry):
    """The WorkflowError recorded in a history entry's status messages, or None on success."""
    status = entry.get("status") or {}
    for kind, data in status.get("messages") or []:
        if kind == "execution_error":
            return execution_error(data)
        if kind == "execution_interrupted":
            return interrupted_error(data)
    if status.get("status_str") == "error":
        return WorkflowError(f"prompt {entry.get('prompt', [None, '?'])[1]} ended with an error")
    return None


def wait_for_history(url, prompt_id, deadline):
    """Poll GET /history/{prompt_id} until the entry appears (it lags the websocket)."""
    delay = 0.05
    while True:
        entry = get_history(url, prompt_id)
        if entry is not None:
            return entry
        if time.monotonic() > deadline:
            raise WorkflowError(f"prompt {prompt_id}: no history entry before the deadline", prompt_id=prompt_id)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _follow(ws, url, prompt_id, emit, deadline):
    """Read websocket messages until ``prompt_id`` finishes; raise WorkflowError if it fails.

    Returns normally on success. If the websocket drops, falls back to polling the history.
    """
    while time.monotonic() < deadline:
        try:
            frame = ws.recv()
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            entry = wait_for_history(url, prompt_id, deadline)
            error = _error_from_history(entry)
            if error is not None:
                raise error
            return
        if isinstance(frame, (bytes, bytearray)):
            event = decode_binary_frame(bytes(frame))
            if event is not None:
                emit(*event)
            continue
        message = json.loads(frame)
        kind, data = message.get("type"), message.get("data") or {}
        emit(kind, data)
        if isinstance(data, dict) and data.get("prompt_id", prompt_id) != prompt_id:
            continue  # another prompt queued under the same client id
        if kind == "execution_error":
            raise execution_error(data)
        if kind == "execution_interrupted":
            raise interrupted_error(data)
        if kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                           and data.get("prompt_id") == prompt_id):
            return
    raise WorkflowError(f"prompt {prompt_id} did not finish before the deadline", prompt_id=prompt_id)


def run_prompt(url, api_prompt, client_id=None, on_event=None, timeout=6 * 3600.0, extra_data=None):
    """Queue ``api_prompt``, follow its execution and return its history entry.

    Args:
        url: server address, e.g. ``http://127.0.0.1:8188``.
        api_prompt: the prompt in API format.
        client_id: websocket client id (a fresh one when None).
        on_event: ``on_event(type, data)`` for every websocket message (custom types included),
            binary progress text as ``"progress_text"``, and ``"prompt_queued"`` with the answer
            to POST /prompt (its ``node_errors`` lists outputs the server dropped as invalid).
        timeout: seconds for the whole run.
        extra_data: passed with the prompt (e.g. ``{"extra_pnginfo": {"workflow": ...}}`` so
            saved images embed the editor workflow, as when queued from the editor).

    Returns:
        the history entry: ``{"prompt", "outputs": {node id: {...}}, "status", "meta"}``.
    Raises:
        WorkflowError when the prompt is rejected, a node fails, or it is interrupted.
    """
    client_id = client_id or uuid.uuid4().hex
    emit = on_event or (lambda kind, data: None)
    deadline = time.monotonic() + timeout
    # The websocket is opened first so that no message about the prompt can be missed.
    ws = websocket.create_connection(websocket_url(url, client_id), timeout=WS_POLL_SECONDS)
    try:
        answer = queue_prompt(url, api_prompt, client_id, extra_data)
        prompt_id = answer["prompt_id"]
        emit("prompt_queued", answer)
        _follow(ws, url, prompt_id, emit, deadline)
    finally:
        ws.close()
    entry = wait_for_history(url, prompt_id, deadline)
    error = _error_from_history(entry)
    if error is not None:
        raise error
    return entry


def output_files(history_entry):
    """``[(node id, file info)]`` for every file a node reported in the history entry's outputs.

    A file info is the server's dict: ``filename``, ``subfolder``, ``type`` ("output", "temp", ...).
    """
    files = []
    for node_id, outputs in (history_entry.get("outputs") or {}).items():
        for items in outputs.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    files.append((node_id, item))
    return files
