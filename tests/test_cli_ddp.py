"""More than one process (gloo on the CPU), started by torchrun, accelerate launch or by hand:
2 processes at batch size 1 train the LoRA of 1 process at batch size 2 over the same images
(buckets of odd sizes included), --save_state / --resume continue exactly, and a killed process
stops the others with a clear error instead of a hang."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import sd3_fixtures
from cli_helpers import SCRIPT, TINY, checked, lora, run_cli

TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port")
ACCELERATE = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port")
# Three buckets from the fixture's landscape, portrait and square images: some hold an odd count,
# so a batch of 2 split over 2 processes sometimes leaves one process only a padding row.
BUCKETS = ["--resolution", "96", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "32"]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    """Four captioned images: buckets of 1 and 3 at the sizes below (odd: padding rows happen)."""
    return sd3_fixtures.write_dataset(tmp_path_factory.mktemp("ddp_data"), n=4, seed=0)


def _argv(ckpt, dataset_dir, out, *more):
    return ["--pretrained_model_name_or_path", ckpt, "--train_data_dir", dataset_dir, *TINY, *BUCKETS,
            "--output_dir", out, "--output_name", "ddp", "--max_train_steps", "4", *more]


@pytest.mark.slow
def test_two_processes_train_what_one_trains_at_twice_the_batch(base_dir, sd35m_checkpoint, four_images, tmp_path):
    ckpt, dataset_dir = base_dir / "models" / "checkpoints" / sd35m_checkpoint, four_images
    two = checked(run_cli(_argv(ckpt, dataset_dir, tmp_path / "two", "--train_batch_size", "1",
                                "--save_every_n_steps", "2", "--save_state"), launcher=TORCHRUN + (_free_port(),)))
    assert "all 2 processes hold the same LoRA" in two.stderr
    assert two.stderr.count("saved ") == 1  # only rank 0 writes
    # One thread, as torchrun gives each of its processes (a busy 2-core machine is far slower with two).
    checked(run_cli(_argv(ckpt, dataset_dir, tmp_path / "one", "--train_batch_size", "2"), env={"OMP_NUM_THREADS": "1"}))
    a, b = lora(tmp_path / "two" / "ddp.safetensors"), lora(tmp_path / "one" / "ddp.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    # Resumed from the step-2 state in 2 processes started by accelerate launch (torchrun's variables
    # again): the same LoRA as the uninterrupted run, bitwise.
    checked(run_cli(_argv(ckpt, dataset_dir, tmp_path / "resumed", "--train_batch_size", "1", "--resume",
                          tmp_path / "two" / "ddp-step00000002-state"), launcher=ACCELERATE + (_free_port(),)))
    c = lora(tmp_path / "resumed" / "ddp.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


class _Watched:
    """A process whose stderr is read on a thread, so the test can wait for a line."""

    def __init__(self, command, env=None):
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, **(env or {})), start_new_session=True)
        self.text = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.text += line

    def wait_for(self, fragment, timeout=240):
        end = time.time() + timeout
        while fragment not in self.text:
            assert time.time() < end and self.proc.poll() is None, self.text[-3000:]
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_process_stops_the_others(base_dir, sd35m_checkpoint, tmp_path):
    ckpt = base_dir / "models" / "checkpoints" / sd35m_checkpoint
    data = sd3_fixtures.write_dataset(tmp_path / "data", n=2, seed=1)
    argv = [str(a) for a in _argv(ckpt, data, tmp_path / "out", "--max_train_steps", "100000")]
    # Started as a launcher without a supervisor would (torchrun's agent also stops the others itself):
    # the collective's failure must stop rank 0 with the pack's error, not wait.
    port = _free_port()
    ranks = [_Watched([sys.executable, str(SCRIPT), *argv], {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                                              "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    try:
        ranks[0].wait_for("steps:")
        ranks[1].proc.kill()
        assert ranks[0].proc.wait(timeout=120) == 1
        assert "another process of this run stopped" in ranks[0].text and "--resume" in ranks[0].text
    finally:
        for r in ranks:
            r.stop()


SYNC_SCRIPT = """
import json, sys
sys.path.append(sys.argv[1])
from headless import in_process
in_process.register_pack()
import torch
from sd3_lora_trainer.trainer import distributed
distributed.init_from_env(backend="gloo")
rank = distributed.rank()
params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
params[1].grad = torch.full((3,), float(rank + 1))      # both processes
if rank == 0:
    params[2].grad = torch.ones(3)                     # one process only
distributed.sync_gradients(params)
print("GRADS", json.dumps([None if p.grad is None else p.grad.tolist() for p in params]))
distributed.shutdown()
"""


def test_gradients_are_summed_and_a_gradient_no_process_has_stays_none(tmp_path):
    """What the optimiser sees after the sum: none where no process had a gradient (it skips the
    parameter, as one process would), zeros added where only some had one."""
    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT)
    out = subprocess.run([sys.executable, *TORCHRUN, _free_port(), "--tee", "1", str(script),
                          str(SCRIPT.parents[1])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # Marked lines only: torch's gloo prints "[Gloo] Rank 1 is connected ..." on stdout too
    lines = [line.split("GRADS", 1)[1] for line in out.stdout.splitlines() if "GRADS" in line]
    assert [json.loads(line) for line in lines] == [[None, [3.0] * 3, [1.0] * 3]] * 2
