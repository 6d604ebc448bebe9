"""Training in several processes (GPUs, or CPU processes) with ``torch.distributed``.

Every process holds the whole dataset and the same session generator. Each optimiser step's
batch is drawn for all processes alike (``train_batch_size`` x processes images), and each
process trains its rows of it (:class:`RankShard`); noise, timesteps and dropouts are drawn for
the whole batch too, so a sample gets the same ones however the batch is split. After backward
the LoRA gradients are summed over the processes (each weighted by its part of the batch), so
every process takes the same optimiser step and holds the same LoRA after it: N processes at
batch size b train what one process trains at N x b.

The run is started by ``torchrun`` or ``accelerate launch``; both set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. In a single process (no process group)
every function here is a no-op, so the loop calls them unconditionally.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .batches import Share


class PeerLostError(RuntimeError):
    """Another process of the run stopped (killed, crashed, or its machine went away)."""


def env_ranks() -> Tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun and accelerate launch set them; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(backend: Optional[str] = None, timeout_minutes: Optional[float] = None) -> bool:
    """Join the process group the launcher set up (NCCL on CUDA, gloo on the CPU by default).

    Returns False (and does nothing) in a single process. ``timeout_minutes`` bounds how long a
    collective waits for a process that hangs without dying (sd-scripts' --ddp_timeout; a process
    that dies is noticed at once).
    """
    rank, world, local_rank = env_ranks()
    if world <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
    kwargs = {"timeout": timeout} if timeout else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return True


def active() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and samples (rank 0, or the only process)."""
    return rank() == 0


def shutdown() -> None:
    """Leave the process group (at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where collectives need their tensors: the GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _peers(what: str):
    """Turn a collective that failed because a process is gone into one clear error."""
    try:
        yield
    except (RuntimeError, ConnectionError) as e:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError)
        raise PeerLostError(
            f"rank {rank()} of {world_size()}: another process of this run stopped while {what} ({e}). "
            f"All processes stop; start the run again, with --resume on the newest --save_state folder "
            f"to continue from it") from e


def sync_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the processes (each loss was already weighted by its
    process's part of the batch, so the sum is the whole batch's gradient).

    The gradients travel as one flat buffer per dtype (one collective each, not one per tensor).
    A parameter no process has a gradient for (a module every process dropped) keeps none, so the
    optimiser skips it as in one process; one that only some processes have counts as zeros on the others.
    """
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    device = _device()
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    with _peers("summing gradients"):
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    by_dtype = {}
    for p, anywhere in zip(params, has_grad.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    with _peers("summing gradients"):
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group]).to(device)
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n


def sum_over_ranks(value: float) -> float:
    """``value`` summed over the processes (e.g. each one's weighted part of the batch loss)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    with _peers("summing the loss"):
        dist.all_reduce(t)
    return float(t.item())


def sync_generator(generator: torch.Generator) -> None:
    """Give every process rank 0's generator state. The draws of a step are the same on every
    process, except those a LoRA dropout makes for its own rows; this keeps data order, noise
    and timesteps of later steps identical everywhere."""
    if not active():
        return
    state = generator.get_state().to(_device())
    with _peers("sharing the random state"):
        dist.broadcast(state, src=0)
    generator.set_state(state.cpu())


def same_on_all_ranks(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every process holds the same values (a float64 checksum compared by min and max)."""
    if not active():
        return True
    total = sum(float(t.detach().double().abs().sum()) + float(t.detach().double().sum()) for t in tensors)
    lo = torch.tensor([total], dtype=torch.float64, device=_device())
    hi = lo.clone()
    with _peers("comparing the LoRA"):
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(lo.item() == hi.item())


def barrier(what: str = "waiting for the other processes") -> None:
    if active():
        with _peers(what):
            dist.barrier()


def broadcast_json(obj=None):
    """Rank 0's ``obj`` (JSON-able) on every process."""
    if not active():
        return obj
    device = _device()
    with _peers("sharing the encoded data"):
        data = json.dumps(obj).encode() if is_main() else b""
        size = torch.tensor([len(data)], dtype=torch.long, device=device)
        dist.broadcast(size, src=0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if is_main()
               else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
        dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode()) if not is_main() else obj


def broadcast_tensor(tensor: Optional[torch.Tensor], shape=None, dtype=None) -> torch.Tensor:
    """Rank 0's ``tensor`` on every process (the others pass its shape and dtype); returned on the CPU."""
    device = _device()
    buf = tensor.to(device) if is_main() else torch.empty(shape, dtype=dtype, device=device)
    with _peers("sharing the encoded data"):
        dist.broadcast(buf, src=0)
    return tensor if is_main() else buf.cpu()


class RankShard:
    """This process's part of a batch source: each epoch's order is drawn for batches of
    ``batch_size`` x processes (the same on every process), and ``collate`` keeps this process's
    rows of each batch, with the :class:`~trainer.batches.Share` that tells the loop which rows
    of the noise and timesteps are its own.

    A batch too short to give every process a row (the end of a bucket) gives the processes
    without one a padding row of weight 0: they run the model, so every process takes part in
    every collective, and add nothing to the gradient.

    Everything else (``validation``, ``latent_sizes``, ``records``...) is the wrapped source's.
    """

    def __init__(self, data, rank_: int, world: int):
        self.data, self.rank, self.world = data, rank_, world

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self) -> int:
        return len(self.data)

    @contextlib.contextmanager
    def _scaled_batch_sizes(self):
        """Per-dataset batch sizes (a TOML's batch_size) times the processes, while drawing."""
        sizes = getattr(self.data, "batch_sizes", None)
        if sizes is None:
            yield
            return
        self.data.batch_sizes = {k: v * self.world if v else v for k, v in sizes.items()}
        try:
            yield
        finally:
            self.data.batch_sizes = sizes

    def num_batches(self, batch_size: int) -> int:
        """Optimiser micro-steps per epoch (batches of batch_size x processes)."""
        with self._scaled_batch_sizes():
            return self.data.num_batches(batch_size * self.world)

    def epoch_batches(self, generator: torch.Generator, batch_size: int) -> List[List[int]]:
        with self._scaled_batch_sizes():
            order = self.data.epoch_batches(generator, batch_size * self.world)
        rng = getattr(self.data, "rng", None)
        if isinstance(rng, random.Random) and self.rank:
            # Flips and caption choices are drawn per image in collate: give each process its own
            # stream (seeded from the shared one), or every process would draw the same choices.
            self.data.rng = random.Random(f"{rng.getrandbits(64)}:{self.rank}")
        return order

    def share(self, size: int) -> Share:
        """This process's rows of a batch of ``size``."""
        per = -(-size // self.world)
        start = self.rank * per
        rows = max(0, min(per, size - start))
        if rows == 0:
            return Share(size - 1, 1, size, 0.0)
        return Share(start, rows, size, rows / size)

    def collate(self, indices: List[int]):
        share = self.share(len(indices))
        batch = self.data.collate(indices[share.offset:share.offset + share.rows])
        batch.share = share
        return batch
