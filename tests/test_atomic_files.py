"""Files are written whole or not at all, with the host's file mode; leftovers of killed writes go,
and a failed or damaged file is named with the fix."""
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from sd3_lora_trainer.trainer import atomic_files, checkpoint
from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.lora_file import save_lora
from sd3_lora_trainer.trainer.state import build_network, new_train_state
from tiny_mmdit import tiny_mmdit


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


def a_state():
    cfg = TrainConfig(network_dim=2).validate()
    return checkpoint.state_dict(new_train_state(cfg, build_network(tiny_mmdit(), cfg)), {"variant": "medium"})


def test_saved_files_get_the_plain_file_mode_and_leave_nothing_else(tmp_path):
    lora = save_lora(tmp_path / "a.safetensors", {"x": torch.ones(3)}, {"k": "v"})
    state = checkpoint.save_state(tmp_path / "s", a_state())
    text = atomic_files.write_text(tmp_path / "a.loss.json", "{}")
    mode = plain_file_mode(tmp_path)
    for path in (lora, state, state.with_suffix(".safetensors"), text):
        assert path.stat().st_mode & 0o777 == mode, (path, oct(path.stat().st_mode))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.loss.json", "a.safetensors", "probe.txt",
                                                          "s.json", "s.safetensors"]


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
    with pytest.raises(OSError, match=r"cannot write .*state.safetensors"):
        checkpoint.save_state(tmp_path / "state", dict(a_state(), lora={"big": torch.zeros(100_000)}))
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]


def test_damaged_or_mixed_state_files_are_named(tmp_path):
    stem = tmp_path / "s"
    checkpoint.save_state(stem, a_state())
    tensors, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    whole = tensors.read_bytes()
    tensors.write_bytes(whole[:-100])
    for check in (checkpoint.check_state_files, checkpoint.load_state):
        with pytest.raises(ValueError, match=r"s.safetensors is damaged .* Resume from another state"):
            check(stem)
    tensors.write_bytes(whole)
    meta_text = meta.read_text()
    meta.write_text(meta_text[: len(meta_text) // 2])
    with pytest.raises(ValueError, match=r"s.json is damaged"):
        checkpoint.check_state_files(stem)
    # The json of one save with the tensors of another (a crash between the two renames).
    checkpoint.save_state(tmp_path / "t", a_state())
    meta.write_text(meta_text)
    tensors.write_bytes((tmp_path / "t.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"s.safetensors and its .json are from different saves"):
        checkpoint.load_state(stem)
    assert json.loads(meta_text)[checkpoint.PROGRESS]["step"] == 0
