"""Live view of a training run: websocket events for the editor and a history route for page reloads.

Events (``PromptServer.instance.send_sync``, broadcast so that every open tab and a reloaded page
see them): ``sd3lora.progress`` once per step and ``sd3lora.samples`` when samples are made.
``GET /sd3lora/history?node=ID`` returns what a fresh page needs to redraw the chart.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

log = logging.getLogger(__name__)

PROGRESS_EVENT = "sd3lora.progress"
SAMPLES_EVENT = "sd3lora.samples"
HISTORY_ROUTE = "/sd3lora/history"
# node id -> the newest run's view; kept after the run ends, so a reload still shows the chart.
_HISTORY: Dict[str, dict] = {}


def _prompt_server():
    """The host's running PromptServer, or None in-process (tests, scripts) where there is none."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send(event: str, data: dict) -> None:
    """Broadcast one JSON event to every connected editor (a no-op with no server)."""
    server = _prompt_server()
    if server is not None:
        server.send_sync(event, data)


def history(node_id: str) -> Optional[dict]:
    """The newest view of ``node_id``'s training (losses, step, rate...), or None."""
    return _HISTORY.get(str(node_id))


class LiveRun:
    """Follows one queue run of a training node: rate, ETA, history and events.

    Args:
        node_id: the node's unique id (the editor finds its node by it).
        state: the session's TrainState (its ``losses`` and optimizer are read, never changed).
        steps: steps this run will do at most.
    """

    def __init__(self, node_id, state, steps: int):
        self.node = str(node_id)
        self.state = state
        self.first_step = state.step
        self.total = state.step + steps
        self.t0 = time.perf_counter()
        old = _HISTORY.get(self.node, {})
        _HISTORY[self.node] = {"node": self.node, "losses": list(state.losses), "step": state.step,
                               "total": self.total, "lr": self.learning_rate(), "steps_per_s": None,
                               "eta_s": None, "running": True, "samples": old.get("samples", [])}

    def learning_rate(self) -> float:
        """The optimizer's current learning rate (its first parameter group)."""
        return float(self.state.optimizer.param_groups[0]["lr"])

    def rate(self, step: int) -> Optional[float]:
        """Steps per second over this run so far."""
        done, elapsed = step - self.first_step, time.perf_counter() - self.t0
        return done / elapsed if done > 0 and elapsed > 0 else None

    def on_step(self, step: int, loss: float) -> None:
        """Record one finished step and tell the editor."""
        rate = self.rate(step)
        event = {"node": self.node, "step": step, "total": self.total, "loss": loss, "lr": self.learning_rate(),
                 "steps_per_s": rate, "eta_s": (self.total - step) / rate if rate else None}
        view = _HISTORY[self.node]
        view["losses"].append(loss)
        view.update({k: event[k] for k in ("step", "total", "lr", "steps_per_s", "eta_s")})
        send(PROGRESS_EVENT, event)

    def on_samples(self, step: int, images: List[dict]) -> None:
        """Record the newest samples (``[{filename, subfolder, type, prompt}]``) and tell the editor."""
        _HISTORY[self.node]["samples"] = images
        send(SAMPLES_EVENT, {"node": self.node, "step": step, "images": images})

    def finish(self) -> None:
        """Mark the run ended (finished, cancelled or failed)."""
        view = _HISTORY[self.node]
        view.update(running=False, eta_s=None)
        send(PROGRESS_EVENT, dict(node=self.node, step=view["step"], total=view["total"], loss=None,
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
        view = history(node)
        return web.json_response(view or {"node": node, "losses": [], "running": False, "samples": []})

    return True
