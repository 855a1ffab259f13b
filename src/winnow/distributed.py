"""Data-parallel training with ``torch.distributed``: what :func:`winnow.train` does in one of
several processes.

Launch the same script in N processes (``torchrun --nproc-per-node N script.py``, or
``winnow train --nproc N``); :func:`winnow.train` then runs unchanged in each. When
``torch.distributed`` is initialised, or torchrun's environment is there (``WORLD_SIZE`` > 1,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``), :func:`join` initialises the process group itself
(gloo on the CPU, NCCL on CUDA, where ``device="cuda"`` means ``cuda:LOCAL_RANK``), and the
loop wraps the model in ``DistributedDataParallel`` (unless it is wrapped already).

The choices, each the same for every run:

- **Batches.** For a ``DataSplits`` or a pair ``(x, y)``, ``config.batch_size`` is the *global*
  batch of one step and must be divisible by the number of processes. Every rank draws the
  same seeded permutation as a single process, builds the same global batch (augmented the
  same way) and keeps its own contiguous slice (:func:`shard`), so the ranks' slices of a step
  are disjoint and together are the single-process batch of that step. Each rank's mean loss
  is weighted by its share of the batch (an epoch's last, smaller batch may split unevenly), so
  the gradient DDP averages is the gradient of the global batch's mean loss: one step with N
  processes equals the single-process step up to the order of float sums. An iterable (a
  DataLoader) is read as it is on every rank: give it a ``DistributedSampler`` (its
  ``set_epoch`` is called every pass), and its batch size is per rank.
- **Masks.** Every rank must start from the same masks: :func:`check_start` compares SHA-256
  digests of the masks (and the start iteration, the configuration, the number of training
  examples) across ranks and raises naming the ranks that differ. Enforcement is unchanged and
  local: a rank's gradient is masked by its post-accumulate hook before DDP copies it into its
  bucket (the all-reduce carries zeros there; masking sends nothing), and the averaged
  gradient DDP copies back into ``.grad`` is masked again by the optimizer's pre-step check
  (a local multiply), so pruned weights stay exactly zero on every rank.
  RigL's dense gradient is captured after the all-reduce: the dense gradient of the global
  batch, the same on every rank.
- **Pruning decisions.** Every rank runs the pruner on the same weights (its criterion's data,
  the dense gradient and the schedule are the same), so in deterministic arithmetic every rank
  chooses the same masks. :func:`settle` checks this with one digest per rank at each pruning
  step; where ranks differ (nondeterministic GPU kernels, a pruner drawing from the global
  RNG), rank 0's masks are broadcast and enforced everywhere (also set as the pruner's
  ``masks``), with a warning. A pruner must decide *when* it prunes from the iteration alone,
  as winnow's schedules do.
- **Records and files.** Rank 0 evaluates (on the unwrapped model) and broadcasts the row, so
  every rank's ``TrainResult`` holds the same history; the train loss is the mean over the
  global batches. Only rank 0 writes the ``checkpoint=`` file (with every rank's generator
  state); every rank reads it to resume. Callbacks run on every rank: write files in them on
  rank 0 only (:func:`is_main`).

Dropout and other randomness in the model draw from a generator seeded per rank (rank 0 with
the single-process seed), so ranks do not repeat each other's noise.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from winnow.core.masks import Masks

ENVIRONMENT = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")
"""The variables torchrun sets in each process; all present with ``WORLD_SIZE`` > 1 mean a
data-parallel run."""


@dataclass(frozen=True)
class Group:
    """This process's place in a data-parallel run: its rank, the number of processes, and
    the device it trains on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started as one of several by torchrun (or ``--nproc``)."""
    if not all(name in os.environ for name in ENVIRONMENT):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


def is_main() -> bool:
    """Whether this process is rank 0 of a data-parallel run, or the only one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def _local_rank() -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    count = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return dist.get_rank() % max(count, 1)


def join(device: torch.device) -> Group | None:
    """The data-parallel run this process belongs to, or None for a single process.

    Initialises the process group from torchrun's environment when it is there and no group
    exists yet (gloo for the CPU, NCCL for CUDA; destroyed when the process exits). A CUDA
    device without an index becomes ``cuda:LOCAL_RANK``.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not launched():
            return None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", _local_rank())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    world = dist.get_world_size()
    if world == 1:
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", _local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif dist.get_backend() == "nccl":
        raise ValueError(
            f"the process group uses NCCL, which cannot train on {device}: use the gloo "
            "backend or a CUDA device"
        )
    return Group(dist.get_rank(), world, device)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Group) -> None:
    """Wait until every rank is here (at the end of a run, so no rank tears the process group
    down while another still finishes its last collective)."""
    if group.device.type == "cuda":
        dist.barrier(device_ids=[group.device.index])
    else:
        dist.barrier()


def wrap(model: nn.Module, group: Group) -> tuple[nn.Module, nn.Module]:
    """``(module, wrapper)``: the plain model on the rank's device and the
    ``DistributedDataParallel`` wrapper its forward and backward passes go through (the
    model itself when it is one already). Wrapping makes every rank start from rank 0's
    weights and buffers."""
    if isinstance(model, DistributedDataParallel):
        return model.module, model
    module = model.to(group.device)
    ids = [group.device.index] if group.device.type == "cuda" else None
    return module, DistributedDataParallel(module, device_ids=ids)


def shard(batch: tuple[Tensor, Tensor], group: Group) -> tuple[tuple[Tensor, Tensor], float]:
    """This rank's slice of a step's global batch ``(x, y)`` and the weight of its mean loss.

    Rank r of N keeps examples ``[r*m//N, (r+1)*m//N)`` of the batch's m; its mean loss is
    weighted by ``n_r * N / m`` (1.0 when the batch divides evenly), so that DDP's average of
    the ranks' gradients is the gradient of the whole batch's mean loss. A rank left without an
    example (a last batch smaller than N) computes the whole batch with weight 0: it still
    joins the all-reduce and adds nothing to it.
    """
    x, y = batch
    m = len(y)
    lo, hi = group.rank * m // group.world, (group.rank + 1) * m // group.world
    if lo == hi:
        return batch, 0.0
    return (x[lo:hi], y[lo:hi]), (hi - lo) * group.world / m


def digest(masks: Masks | None) -> str:
    """SHA-256 over the masks' names, shapes and bits (``"none"`` for no masks)."""
    if masks is None:
        return "none"
    sha = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name]
        sha.update(f"{name}\0{tuple(mask.shape)}\0".encode())
        sha.update(mask.detach().to("cpu", torch.bool).contiguous().numpy().tobytes())
    return sha.hexdigest()


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (a picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks (a new tensor; ``tensor`` is unchanged)."""
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def check_start(group: Group, masks: Masks | None, **facts: Any) -> None:
    """Raise ``ValueError`` unless every rank starts from the same masks and ``facts``.

    One all-gather of a digest per rank; the error, raised on every rank, names the ranks
    whose masks (or facts: the start iteration, the configuration, the number of examples)
    differ from rank 0's.
    """
    mine = {"masks": digest(masks), **{k: repr(v) for k, v in facts.items()}}
    everyone = gather(mine)
    problems = []
    for key in mine:
        differ = [r for r, theirs in enumerate(everyone) if theirs[key] != everyone[0][key]]
        if differ:
            ranks = ", ".join(str(r) for r in differ)
            problems.append(f"{key.replace('_', ' ')} on rank(s) {ranks}")
    if problems:
        raise ValueError(
            f"the {group.world} processes do not start alike: {'; '.join(problems)} "
            "differ from rank 0's (give every rank the same masks, e.g. from one mask file, "
            "the same configuration and data)"
        )


def settle(group: Group, masks: Masks | None) -> tuple[Masks | None, list[int]]:
    """The masks every rank enforces after a pruning step, and the ranks that chose others.

    Compares one digest per rank; when they all agree (deterministic pruning), each keeps its
    own masks and nothing more is sent. Otherwise rank 0's masks are broadcast and returned
    on every rank, on the devices of this rank's masks.
    """
    digests = gather(digest(masks))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if not differ:
        return masks, []
    chosen = broadcast(None if masks is None or not group.main else masks.cpu())
    if chosen is not None and masks is not None:
        devices = {name: masks[name].device for name in masks if name in chosen}
        chosen = Masks(
            {n: m.to(devices.get(n, m.device)) for n, m in chosen.items()}, chosen.patterns
        )
    return chosen, differ


def warn_settled(differ: Sequence[int], iteration: int) -> None:
    warnings.warn(
        f"pruning at iteration {iteration} chose other masks on rank(s) "
        f"{', '.join(str(r) for r in differ)} than on rank 0 (nondeterministic kernels, or a "
        "pruner drawing from the global random generator); rank 0's masks are enforced on "
        "every rank",
        RuntimeWarning,
        stacklevel=3,
    )


def seed_for(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s generator: ``seed`` itself on rank 0 (as a single process),
    a seed apart from it on the others."""
    if rank == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def launch(function: Callable[..., Any], nproc: int, args: Sequence[Any] = ()) -> None:
    """Run ``function(*args)`` in ``nproc`` new processes on this machine, as torchrun would.

    Each process gets torchrun's environment (``RANK`` = ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT``), so :func:`winnow.train` inside ``function`` joins
    the run. As under torchrun, this process hosts the rendezvous store, on a port the system
    chooses and held from the start (no other program can take it in between), and the
    processes connect to it; without ``OMP_NUM_THREADS`` set, each uses its share of the CPU
    cores. ``function`` must be importable (a module-level function). Returns when
    every process has finished; raises ``RuntimeError`` naming the first that failed (the
    others are stopped).
    """
    if nproc < 1:
        raise ValueError(f"the number of processes must be >= 1, got {nproc}")
    import torch.multiprocessing as mp

    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timedelta(minutes=30), wait_for_workers=False
    )  # fmt: skip
    port = store.port
    try:
        mp.start_processes(
            _child, args=(function, nproc, port, tuple(args)), nprocs=nproc, join=True,
            start_method="spawn",
        )  # fmt: skip
    except mp.ProcessRaisedException as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise RuntimeError(
            f"process {err.error_index} of {nproc} failed: {lines[-1] if lines else err}"
        ) from None
    except mp.ProcessExitedException as err:
        raise RuntimeError(
            f"process {err.error_index} of {nproc} failed (exit status {err.exit_code}"
            f"{', signal ' + err.signal_name if err.signal_name else ''})"
        ) from None


def _child(local_rank: int, function, nproc: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
    )  # fmt: skip
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    function(*args)
    if dist.is_available() and dist.is_initialized():  # done: leave together, then tear down
        dist.barrier()
        dist.destroy_process_group()
