"""Files written whole or not at all, with the mode the host's own outputs get, and no leftovers.

Every file this pack writes goes through :func:`staged`: it is written inside a private temporary
folder next to its destination (``.sd3lora-tmp-<pid>-<token>-<n>``), given the mode a plain
``open()`` gives a new file (0666 minus the umask: what the host's SaveImage files get), flushed to
disk and moved into place with one rename. A write that fails removes its folder; a process killed
mid-write leaves only that folder, and the next write into the same folder removes it.

Writing inside a folder of our own also catches the temporary files that safetensors itself makes
next to its target (``.tmpXXXXXX``, mode 0600), which could not be told apart from anyone else's.

Example:
    >>> with staged(["out/a.safetensors", "out/a.json"]) as (tensor_tmp, json_tmp):
    ...     safetensors.torch.save_file(tensors, str(tensor_tmp))
    ...     json_tmp.write_text("{}")
    # both files are in place (a.json last), or neither changed
"""
from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator, List, Sequence

TEMP_PREFIX = ".sd3lora-tmp-"
STALE_AFTER_S = 24 * 3600  # a folder of a live process that is this old is abandoned (its pid was reused)
CLEAN_EVERY_S = 60.0       # a cache folder is searched for leftovers at most this often (it gets many files)
# Tells this process's folders from a killed one's that had the same pid (pids repeat after restarts).
_TOKEN = secrets.token_hex(4)
_COUNTER = itertools.count()
_IN_FLIGHT: set = set()
_LAST_CLEANED: dict = {}  # folder -> time.monotonic() of its last search for leftovers


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file here: 0o666 without the process's umask bits."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def is_stale(name: str, age_s: float) -> bool:
    """Whether a temporary folder named ``name`` (made by :func:`staged`) belongs to no running write.

    Example:
        >>> is_stale(".sd3lora-tmp-999999-0a1b2c3d-0", 5.0)   # no process 999999: left by a kill
        True
    """
    try:
        pid_text, token, _ = name[len(TEMP_PREFIX):].split("-", 2)
        pid = int(pid_text)
    except ValueError:
        return False  # not one of ours
    if pid == os.getpid():
        return token != _TOKEN or name not in _IN_FLIGHT
    return not _pid_alive(pid) or age_s > STALE_AFTER_S


def remove_stale(folder: str | os.PathLike) -> List[Path]:
    """Delete the temporary folders of writes into ``folder`` that were killed; returns them."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if is_stale(entry.name, age):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _clean(folder: Path, every_s: float) -> None:
    """:func:`remove_stale` on ``folder`` unless this process did so less than ``every_s`` ago."""
    key, now = str(folder.resolve()), time.monotonic()
    if every_s <= 0 or now - _LAST_CLEANED.get(key, -every_s) >= every_s:
        _LAST_CLEANED[key] = now
        remove_stale(folder)


def _flush(path: Path, mode: int, durable: bool) -> None:
    """Give ``path`` the host's file mode and (``durable``) push its bytes to the disk before it is
    renamed, so a power cut cannot leave an empty file under the final name."""
    os.chmod(path, mode)
    if not durable:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, error: BaseException) -> OSError:
    """An OSError for a failed write that names the file, the reason and the fix."""
    reason = getattr(error, "strerror", None) or str(error)
    return OSError(f"cannot write {path}: {reason}. Free disk space there or make {path.parent} writable "
                   f"(nothing was replaced: a previous file of that name is unchanged)")


def _is_write_failure(error: BaseException) -> bool:
    # safetensors reports a failed write as its own SafetensorError (an IoError inside).
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError"


@contextlib.contextmanager
def staged(paths: Sequence[str | os.PathLike], durable: bool = True) -> Iterator[List[Path]]:
    """Temporary paths to write ``paths`` to (all in one folder); when the block ends without an
    error they replace ``paths`` in the given order (so the last one is the commit point).
    ``durable=False`` (for caches, whose damaged entries are rebuilt anyway) skips the fsync and
    searches the folder for leftovers at most every CLEAN_EVERY_S; other writes search it each time.

    Raises:
        OSError: naming the file and the fix when the disk is full or the folder is not writable
            (nothing is replaced; the temporary files are removed).
    """
    targets = [Path(p) for p in paths]
    folder = targets[0].parent
    if any(t.parent != folder for t in targets):
        raise ValueError(f"staged() writes into one folder, got {[str(t) for t in targets]}")
    name = f"{TEMP_PREFIX}{os.getpid()}-{_TOKEN}-{next(_COUNTER)}"
    temp_dir = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _clean(folder, 0 if durable else CLEAN_EVERY_S)
        _IN_FLIGHT.add(name)
        temp_dir.mkdir()
    except OSError as e:
        _IN_FLIGHT.discard(name)
        raise write_error(targets[0], e) from e
    try:
        temps = [temp_dir / t.name for t in targets]
        try:
            yield temps
            mode = file_mode()
            for temp in temps:
                _flush(temp, mode, durable)
            for temp, target in zip(temps, targets):
                os.replace(temp, target)
        except Exception as e:
            if _is_write_failure(e):
                raise write_error(targets[0], e) from e
            raise
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        _IN_FLIGHT.discard(name)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with staged([path]) as (temp,):
        temp.write_text(text, encoding="utf-8")
    return Path(path)
