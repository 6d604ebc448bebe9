"""Files are written whole or not at all, with the host's file mode; leftovers of killed writes go,
and a failed write is named with the fix."""
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from sd3_lora_trainer.trainer import atomic_files
from sd3_lora_trainer.trainer.lora_file import save_lora


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plain_file_mode(tmp_path) -> int:
    """The mode a plain open() gives a new file here (what the host's SaveImage outputs get)."""
    probe = tmp_path / "probe.txt"
    probe.write_text("x")
    return probe.stat().st_mode & 0o777


def test_saved_files_get_the_plain_file_mode_and_leave_nothing_else(tmp_path):
    lora = save_lora(tmp_path / "a.safetensors", {"x": torch.ones(3)}, {"k": "v"})
    text = atomic_files.write_text(tmp_path / "a.loss.json", "{}")
    mode = plain_file_mode(tmp_path)
    for path in (lora, text):
        assert path.stat().st_mode & 0o777 == mode, (path, oct(path.stat().st_mode))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.loss.json", "a.safetensors", "probe.txt"]


def test_leftovers_of_killed_writes_are_removed_at_the_next_save_and_live_ones_kept(tmp_path):
    killed = tmp_path / f"{atomic_files.TEMP_PREFIX}{dead_pid()}-0a1b2c3d-0"
    same_pid_earlier_process = tmp_path / f"{atomic_files.TEMP_PREFIX}{os.getpid()}-ffffffff-3"
    live = tmp_path / f"{atomic_files.TEMP_PREFIX}{os.getppid()}-0a1b2c3d-0"  # pytest's parent is running
    other = tmp_path / ".tmpAbC123"  # not this pack's: never touched
    for folder in (killed, same_pid_earlier_process, live):
        folder.mkdir()
        (folder / "half.safetensors").write_bytes(b"x" * 1000)
    other.write_bytes(b"y")
    save_lora(tmp_path / "next.safetensors", {"x": torch.ones(3)}, {})
    assert not killed.exists() and not same_pid_earlier_process.exists()
    assert live.exists() and other.exists()
    os.utime(live, (0, 0))  # a live pid whose folder is a day old was reused by another process
    save_lora(tmp_path / "next.safetensors", {"x": torch.ones(3)}, {})
    assert not live.exists()


@pytest.fixture
def disk_full():
    """While active, writing past 64 KB fails with EFBIG (File too large), as a full disk fails a write."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_write_names_the_file_and_fix_and_keeps_the_old_file(tmp_path, disk_full):
    target = tmp_path / "big.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match=r"cannot write .*big.safetensors: .*Free disk space there or make .* writable"):
        save_lora(target, {"x": torch.zeros(100_000)}, {})
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
