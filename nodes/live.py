"""Live view of a training run: websocket events for the editor and a history route for page reloads.

Events (``PromptServer.instance.send_sync``, broadcast so that every open tab and a reloaded page
see them): ``sd3lora.progress`` when a run starts (``reset``, with the session's note: continuing,
or why a new session started), while its dataset is cached (``phase``), once per step, and at
its end (``done``, with every loss); ``sd3lora.samples`` when samples are made;
``sd3lora.dataset`` when a dataset node runs. ``GET /sd3lora/history?node=ID`` returns what a fresh
page needs to redraw a node: the train node's chart, or a dataset node's summary.
"""
from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Deque, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

PROGRESS_EVENT = "sd3lora.progress"
SAMPLES_EVENT = "sd3lora.samples"
DATASET_EVENT = "sd3lora.dataset"
HISTORY_ROUTE = "/sd3lora/history"
# Steps the rate (and so the ETA) is measured over: recent enough to follow a change of speed,
# long enough to be steady. A run's first step (warm-up, compiling) is never in it.
RATE_WINDOW = 20
# node id -> the newest run's view; kept after the run ends, so a reload still shows the chart.
_HISTORY: Dict[str, dict] = {}
# node id -> the newest summary of a dataset node, for a reloaded page.
_DATASETS: Dict[str, str] = {}


def _prompt_server():
    """The host's running PromptServer, or None in-process (tests, scripts) where there is none.

    Looked up in ``sys.modules``: ComfyUI's main.py imports ``server`` before any custom node, and
    importing it here would only cost a process without a server (the command line) 1-2 s of
    start-up (0.33.0's server module brings its database and asset modules).
    """
    module = sys.modules.get("server")
    server_class = getattr(module, "PromptServer", None)
    return getattr(server_class, "instance", None)


def send(event: str, data: dict) -> None:
    """Broadcast one JSON event to every connected editor (a no-op with no server)."""
    server = _prompt_server()
    if server is not None:
        server.send_sync(event, data)


def history(node_id: str) -> Optional[dict]:
    """The newest view of ``node_id``'s training (losses, step, rate...), or None."""
    return _HISTORY.get(str(node_id))


def dataset_summary(node_id, summary: str) -> None:
    """Show a dataset node's summary on it in the editor (now, and after a page reload)."""
    _DATASETS[str(node_id)] = summary
    send(DATASET_EVENT, {"node": str(node_id), "summary": summary})


def phase(node_id, text: str) -> None:
    """Tell the editor what the train node is doing before its first step (e.g. caching latents)."""
    view = _HISTORY.setdefault(str(node_id), {"node": str(node_id), "losses": [], "step": 0, "total": 0,
                                              "running": True, "samples": []})
    view["phase"] = text
    send(PROGRESS_EVENT, {"node": str(node_id), "phase": text, "running": True})


def phase_stopped(node_id) -> None:
    """The work before the first step ended without a run (Cancel, an error): say where it stopped."""
    view = _HISTORY.get(str(node_id))
    if view is None or not view.get("phase"):
        return
    view.update(running=False, phase=f"{view['phase']}, stopped")
    send(PROGRESS_EVENT, {"node": str(node_id), "phase": view["phase"], "running": False, "done": True})


class LiveRun:
    """Follows one queue run of a training node: rate, ETA, history and events.

    Args:
        node_id: the node's unique id (the editor finds its node by it).
        state: the session's TrainState (its ``losses`` and optimizer are read, never changed).
        steps: steps this run will do at most.
        note: what the session did ("continuing from step 40", "settings changed (...): started a
            new session at step 0"); shown on the node, whose chart restarts with the session.
    """

    def __init__(self, node_id, state, steps: int, note: str = ""):
        self.node = str(node_id)
        self.state = state
        self.total = state.step + steps
        self.times: Deque[Tuple[int, float]] = collections.deque(maxlen=RATE_WINDOW + 1)
        old = _HISTORY.get(self.node, {})
        _HISTORY[self.node] = {"node": self.node, "losses": list(state.losses), "step": state.step,
                               "total": self.total, "lr": self.learning_rate(), "steps_per_s": None,
                               "eta_s": None, "running": True, "samples": old.get("samples", []),
                               "samples_step": old.get("samples_step"), "note": note}
        # Copies: the host sends events later, from its own loop, and the view keeps changing.
        send(PROGRESS_EVENT, dict(_HISTORY[self.node], losses=list(state.losses), reset=True))

    def learning_rate(self) -> float:
        """The optimizer's current learning rate (its first parameter group)."""
        return float(self.state.optimizer.param_groups[0]["lr"])

    def rate(self, step: int) -> Optional[float]:
        """Steps per second over the last ``RATE_WINDOW`` steps, from this run's second step on (the
        first one also pays for warm-up or compiling, and would inflate the ETA); None before."""
        self.times.append((step, time.perf_counter()))
        if len(self.times) < 2:
            return None
        (s0, t0), (s1, t1) = self.times[0], self.times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def on_step(self, step: int, loss: float) -> None:
        """Record one finished step and tell the editor."""
        rate = self.rate(step)
        event = {"node": self.node, "step": step, "total": self.total, "loss": loss, "lr": self.learning_rate(),
                 "steps_per_s": rate, "eta_s": (self.total - step) / rate if rate else None}
        view = _HISTORY[self.node]
        view["losses"].append(loss)
        view.pop("phase", None)
        view.update({k: event[k] for k in ("step", "total", "lr", "steps_per_s", "eta_s")})
        send(PROGRESS_EVENT, event)

    def on_samples(self, step: int, images: List[dict]) -> None:
        """Record the newest samples (``[{filename, subfolder, type, prompt}]``) and tell the editor."""
        _HISTORY[self.node].update(samples=images, samples_step=step)
        send(SAMPLES_EVENT, {"node": self.node, "step": step, "images": images})

    def finish(self) -> None:
        """Mark the run ended (finished, cancelled or failed), with every loss of the session: a
        Cancel can end the run after a step whose own event was not sent."""
        view = _HISTORY[self.node]
        view.update(running=False, eta_s=None, losses=list(self.state.losses), step=self.state.step)
        view.pop("phase", None)
        send(PROGRESS_EVENT, dict(node=self.node, step=view["step"], total=view["total"], losses=list(view["losses"]),
                                  lr=view["lr"], steps_per_s=view["steps_per_s"], eta_s=None, done=True))


def register_routes() -> bool:
    """Add ``GET /sd3lora/history?node=ID`` to the host's server; False when there is none."""
    server = _prompt_server()
    if server is None:
        return False
    from aiohttp import web

    @server.routes.get(HISTORY_ROUTE)
    async def get_history(request):
        node = request.rel_url.query.get("node")
        if node is None:
            return web.json_response({"error": "add ?node=<node id> to the URL"}, status=400)
        view = dict(history(node) or {"node": node, "losses": [], "running": False, "samples": []})
        if node in _DATASETS:
            view["dataset_summary"] = _DATASETS[node]
        return web.json_response(view)

    return True
