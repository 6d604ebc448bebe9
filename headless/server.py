"""Start and stop a local ComfyUI server as a subprocess.

The server runs ``main.py`` of a ComfyUI source tree on the CPU, bound to the loopback address,
with its models/, input/, output/, custom_nodes/ and user/ folders under one base directory.
Flags used here all exist in ComfyUI 0.3.75's ``comfy/cli_args.py`` (and in newer releases).
"""
import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import json
import urllib.error
import urllib.request
from pathlib import Path

from . import hosts

LISTEN_ADDRESS = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The server exited, or did not answer, during start-up. The message ends with its log tail."""


class ServerHandle:
    """A running ComfyUI server started by :func:`start_server`.

    Use it as a context manager, or call :meth:`stop`; stopping twice is harmless.
    """

    def __init__(self, process, port, log_path, log_file, scratch_dirs=()):
        self.process = process
        self.port = port
        self.url = f"http://{LISTEN_ADDRESS}:{port}"
        self.log_path = Path(log_path)
        self._log_file = log_file
        self._scratch_dirs = list(scratch_dirs)

    @property
    def pid(self):
        """Process id of the server (also the id of its process group)."""
        return self.process.pid

    def versions(self):
        """``ComfyUI <version>, torch <version>`` as this server reports them."""
        return server_versions(self.url)

    def is_running(self):
        """True while the server process has not exited."""
        return self.process.poll() is None

    def log_tail(self, lines=40):
        """The last ``lines`` lines of the server log."""
        return read_log_tail(self.log_path, lines)

    def stop(self, timeout=15.0):
        """Terminate the server's process group, wait, and kill it if it does not exit in time."""
        # The server was started in its own session, so its process group id is its pid and
        # signalling the group reaches only the server and whatever it spawned.
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        else:
            # The leader is gone; make sure nothing it spawned outlives it.
            _signal_group(self.process.pid, signal.SIGKILL)
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()
        for path in self._scratch_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._scratch_dirs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def __repr__(self):
        state = "running" if self.is_running() else f"exited {self.process.returncode}"
        return f"<ServerHandle {self.url} pid={self.pid} {state}>"


def _signal_group(pgid, sig):
    """Send ``sig`` to one process group, ignoring a group that no longer exists."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def server_versions(url):
    """``ComfyUI <version>, torch <version>`` from a server's ``GET /system_stats`` ('?' where it
    does not say, or does not answer: the caller's next request reports that)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/system_stats", timeout=10) as response:
            system = json.load(response).get("system", {})
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        system = {}
    return f"ComfyUI {system.get('comfyui_version', '?')}, torch {system.get('pytorch_version', '?')}"


def find_free_port(host=LISTEN_ADDRESS):
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def frontend_available(python):
    """Whether ``python`` can import ``comfyui_frontend_package``.

    ComfyUI 0.3.75 calls ``sys.exit(-1)`` at start-up when that package is missing, unless
    ``--front-end-root`` names a directory to serve instead. The check runs in the server's own
    interpreter, which need not be this one.
    """
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('comfyui_frontend_package') is None)"
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def build_command(python, host_dir, base_dir, port, front_end_root=None, extra_args=()):
    """The command line that starts ComfyUI's ``main.py`` headless on the CPU."""
    cmd = [
        str(python), str(Path(host_dir) / "main.py"),
        "--cpu",
        "--listen", LISTEN_ADDRESS,
        "--port", str(port),
        "--base-directory", str(base_dir),
        "--disable-auto-launch",
        # Queue history and assets stay in memory: no database file in the host tree.
        "--database-url", "sqlite:///:memory:",
    ]
    if front_end_root is not None:
        cmd += ["--front-end-root", str(front_end_root)]
    return cmd + [str(a) for a in extra_args]


def read_log_tail(path, lines=40):
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _answers(url, timeout=2.0):
    """True when GET ``url`` returns 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until_ready(handle, timeout):
    """Block until the server answers GET /system_stats; raise ServerStartError otherwise.

    ComfyUI loads all nodes (stock and custom) before it starts listening, so once it answers
    its /object_info is complete.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.is_running():
            raise ServerStartError(
                f"ComfyUI exited with code {handle.process.returncode} during start-up "
                f"(log: {handle.log_path}):\n{handle.log_tail()}")
        if _answers(handle.url + "/system_stats"):
            return
        time.sleep(0.25)
    raise ServerStartError(
        f"ComfyUI did not answer within {timeout:.0f} s (log: {handle.log_path}):\n{handle.log_tail()}")


def start_server(base_dir, port=None, host_dir=None, python=None, extra_args=(), log_path=None, timeout=120,
                 env=None):
    """Start ComfyUI on 127.0.0.1 with ``base_dir`` as its base directory and wait until it answers.

    Args:
        base_dir: ComfyUI base directory (models/, custom_nodes/, input/, output/, user/).
        port: TCP port; a free one is picked when None.
        host_dir: the ComfyUI source tree holding ``main.py``; default ``$COMFYUI_DIR`` or the tree
            ``scripts/setup.sh`` unpacks (:func:`headless.hosts.host_dir`).
        python: interpreter to run it with; default the venv set-up built for that host, else this one.
        extra_args: more ComfyUI command-line flags.
        log_path: file receiving the server's stdout and stderr; default
            ``<base_dir>/comfyui_server_<port>.log``.
        timeout: seconds to wait for the server to answer.
        env: more environment variables for the server (on top of this process's).

    Returns:
        a :class:`ServerHandle`. Raises :class:`ServerStartError` (with the log's tail) when the
        server exits or does not answer in time.
    """
    base_dir = Path(base_dir).resolve()
    # 0.3.75 lists <base>/custom_nodes before anything else and dies if it does not exist.
    (base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
    host_dir = Path(host_dir) if host_dir else hosts.host_dir()
    python = python or hosts.host_python(host_dir)
    if not (host_dir / "main.py").is_file():
        raise ServerStartError(f"no ComfyUI main.py in {host_dir}")
    port = port or find_free_port()
    log_path = Path(log_path) if log_path else base_dir / f"comfyui_server_{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    scratch = []
    front_end_root = None
    if not frontend_available(python):
        # An empty web root: the API works, the editor page is simply not served.
        front_end_root = tempfile.mkdtemp(prefix="comfyui-no-frontend-")
        scratch.append(front_end_root)

    cmd = build_command(python, host_dir, base_dir, port, front_end_root, extra_args)
    env = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1")  # unbuffered: the log tail is current
    log_file = open(log_path, "wb")
    process = subprocess.Popen(cmd, cwd=str(host_dir), stdin=subprocess.DEVNULL, stdout=log_file,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle = ServerHandle(process, port, log_path, log_file, scratch)
    # A server left behind by a crash or Ctrl-C of the caller is stopped at interpreter exit.
    atexit.register(handle.stop)
    try:
        wait_until_ready(handle, timeout)
    except BaseException:
        handle.stop()
        raise
    return handle
