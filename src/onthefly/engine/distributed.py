"""``torchrun``: one session for every rank, the same commands at the same step on every rank.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is started unless
the script started it (gloo on the CPU, nccl on CUDA), and a second, gloo group carries On The
Fly's own messages on the CPU, so that no message waits for the device:

* **the session**: rank 0 owns it and serves the dashboard; every other rank records into a
  session of its own inside it (``ranks/rank-R``): its per-sample rows (global dataset indices,
  so every sample of an epoch is recorded once across ranks, by the rank that trained it), its
  events and its checkpoints (its RNG and sampler state). The session's readers take the rows
  of every rank.
* **commands**: rank 0 receives them; at an exchange boundary it broadcasts one word, the length
  of the commands it took (0: none) and how many boundaries later the exchange after the next
  one comes, without waiting for it to arrive; at the next exchange every rank receives it (long
  arrived), takes the JSON of the commands when there are some, and applies them: the same step
  everywhere. Exchanges are about ``ONTHEFLY_DDP_EXCHANGE_SECONDS`` (0.05 s) apart, at every
  boundary when steps are slower than that: a gloo broadcast costs the ranks 0.1-0.5 ms of CPU
  here, 4 % of an 11 ms step when sent at every one. That one small collective, at most one a
  step, is all On The Fly adds; while paused, the ranks wait in a broadcast (the group's timeout
  is long: a pause is not a hang, and a rank that dies breaks the others' wait at once).
* **epoch ends**: every rank writes its rows before rank 0 closes the epoch (one collective per
  epoch), and the epoch's mean loss is reduced over the ranks, so that ``ReduceLROnPlateau`` and
  the summary see the same value on every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from ..errors import ConfigError
from .control import Command

__all__ = ["RankShare", "World", "distributed_loader", "is_wrapped", "real_samples", "set_epoch", "unwrapped",
           "world"]

# How long a rank waits in On The Fly's broadcast (a pause, a dashboard left open at the end).
CONTROL_TIMEOUT = timedelta(days=7)
# Seconds between command exchanges (0: at every step boundary), and the most boundaries between two.
EXCHANGE_SECONDS = float(os.environ.get("ONTHEFLY_DDP_EXCHANGE_SECONDS", "0.05"))
MAX_GAP = 64

_WORLD: World | None = None


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    backend: str
    control: Any  # the gloo process group of On The Fly's messages
    # The command word sent at the last exchange, not yet received: (work, word, payload).
    _in_flight: tuple[Any, torch.Tensor, bytes] | None = None
    _boundary: int = 0  # step boundaries seen (calls of commands() without wait): the same on every rank
    _due: int = 0  # the boundary at which the word in flight is received
    _gap: int = 1  # boundaries from an exchange to the next, as the last word received said
    _clock: tuple[float, int] | None = None  # rank 0: (time, boundary) of its last exchange

    # ---- messages ------------------------------------------------------------------------------
    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value`` (JSON) on every rank."""
        data = json.dumps(value, default=_plain).encode() if self.rank == 0 else b""
        return json.loads(self._bytes(data).decode())

    def _bytes(self, data: bytes) -> bytes:
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, 0, group=self.control)
        return self._payload(data, int(size.item()))

    def _payload(self, data: bytes, size: int) -> bytes:
        if size == 0:
            return b""
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 \
            else torch.empty(size, dtype=torch.uint8)
        dist.broadcast(buffer, 0, group=self.control)
        return buffer.numpy().tobytes()

    def commands(self, take: Callable[[], list[Command]], wait: bool = False) -> list[Command]:
        """The commands every rank applies now, the same on every rank; rank 0 takes them from
        its queue with ``take``. Without ``wait`` (a step boundary) the exchange is pipelined and
        happens only at exchange boundaries (see the module's docstring; elsewhere nothing is sent
        or received): the word rank 0 sent at the previous exchange (how many bytes of commands
        follow, 0: none) is received now - long arrived, so nothing waits - and the commands it
        announced are applied now, on every rank; then the next word is sent without waiting. A
        command so takes effect at the exchange after the one where rank 0 took it: a (command,
        step) pair every rank knows. With ``wait`` (paused, idle), the word in flight is received
        first, then rank 0 waits for commands and sends them."""
        if not wait:
            self._boundary += 1
            if self._in_flight is not None and self._boundary < self._due:
                return []  # between two exchanges
        held = self._receive_pending()
        if held or wait:
            if held:
                return held
            return self._exchange(take() if self.rank == 0 else [])
        self._post(take() if self.rank == 0 else [])
        return []

    def finish(self) -> None:
        """The word in flight received (its commands dropped: the run is ending)."""
        self._receive_pending()

    def _post(self, commands: list[Command]) -> None:
        data = _encode(commands) if self.rank == 0 else b""
        word = torch.tensor([len(data), self._next_gap() if self.rank == 0 else 0], dtype=torch.int64)
        self._due = self._boundary + self._gap
        self._in_flight = (dist.broadcast(word, 0, group=self.control, async_op=True), word, data)

    def _next_gap(self) -> int:
        """Rank 0: boundaries between the exchanges after this one, from the time a boundary has taken."""
        now = time.perf_counter()
        gap = 1
        if self._clock is not None and EXCHANGE_SECONDS > 0:
            then, boundary = self._clock
            per_boundary = (now - then) / max(1, self._boundary - boundary)
            gap = max(1, min(MAX_GAP, round(EXCHANGE_SECONDS / per_boundary))) if per_boundary > 0 else MAX_GAP
        self._clock = (now, self._boundary)
        return gap

    def _receive_pending(self) -> list[Command]:
        if self._in_flight is None:
            return []
        work, word, data = self._in_flight
        self._in_flight = None
        work.wait()
        size, gap = word.tolist()
        self._gap = max(1, gap)
        return _decode(self._payload(data, size))

    def _exchange(self, commands: list[Command]) -> list[Command]:
        return _decode(self._bytes(_encode(commands) if self.rank == 0 else b""))

    def tensors(self, tensors: dict[str, torch.Tensor] | None, like: dict[str, torch.Tensor]) \
            -> dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` (CPU copies) on every rank; the others pass None and ``like``, a
        state dict with the same keys, shapes and dtypes (their own model's)."""
        out: dict[str, torch.Tensor] = {}
        for name, reference in like.items():
            if self.rank == 0:
                assert tensors is not None
                tensor = tensors[name].detach().to("cpu", copy=True).contiguous()
            else:
                tensor = torch.empty(reference.shape, dtype=reference.dtype)
            dist.broadcast(tensor, 0, group=self.control)
            out[name] = tensor
        return out

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (float64, the same bits on every rank)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.control)
        return tensor.tolist()

    def weights_agree(self, model: nn.Module) -> tuple[bool, list[str]]:
        """Every rank's parameters and buffers hashed and compared; (agree, the hash per rank)."""
        digest = hashlib.blake2b(digest_size=8)
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            data = tensor.detach().cpu().contiguous()
            if data.dtype in (torch.bfloat16, torch.float16):
                data = data.float()
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        mine = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(gathered, mine, group=self.control)
        hashes = [bytes(g.tolist()).hex() for g in gathered]
        return len(set(hashes)) == 1, hashes


def _plain(value: Any) -> Any:
    """A NumPy or torch scalar (or array) as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _encode(commands: list[Command]) -> bytes:
    if not commands:
        return b""
    return json.dumps([{"id": c.id, "kind": c.kind, "args": c.args, "issued": c.issued} for c in commands]).encode()


def _decode(data: bytes) -> list[Command]:
    return [Command(c["id"], c["kind"], c["args"], c["issued"]) for c in json.loads(data)] if data else []


def world() -> World | None:
    """This process's place under ``torchrun`` (the process group started if needed), or None
    for a single process."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        store = _attempt_store(size)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=size)
        atexit.register(_destroy)  # started here, ended here: its threads joined before the interpreter goes
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank, str(dist.get_backend()), control)
    return _WORLD


def _destroy() -> None:
    with contextlib.suppress(Exception):  # at exit: a peer already gone must not turn an exit into an error
        if dist.is_initialized():
            dist.destroy_process_group()


def _attempt_store(size: int) -> Any:
    """Under torchrun, the rendezvous store with this attempt's own prefix. The agent's store
    outlives a restart (``--max-restarts``), and the process group's keys (each rank's address)
    would otherwise be read back from the attempt before: a new rank then connects to a dead one
    ("connectFullMesh failed ... Connection refused"). None outside torchrun (env:// as is)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                          is_master=not hosted_by_agent and int(os.environ["RANK"]) == 0,
                          timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"onthefly/attempt-{attempt}", store)


def is_wrapped(model: nn.Module) -> bool:
    """A model already in DistributedDataParallel or FSDP."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a build without FSDP
        return False
    return isinstance(model, FullyShardedDataParallel) or type(model).__name__.startswith("FSDP")


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP / FSDP wrapper (the model itself when not wrapped)."""
    inner = getattr(model, "module", None) if is_wrapped(model) else None
    return inner if isinstance(inner, nn.Module) else model


class RankShare(Sampler[int]):
    """This rank's share of another sampler's epochs (a fork's draws): the whole order drawn on
    every rank - from the same generator, so the same order everywhere - padded as a
    DistributedSampler pads (its first indices repeated up to a multiple of the ranks), and every
    ``size``-th index from this rank's on. The shares never overlap."""

    def __init__(self, sampler: Sampler[int], where: World) -> None:
        self.sampler, self.rank, self.size = sampler, where.rank, where.size

    @property
    def generator(self) -> torch.Generator | None:
        """The drawing sampler's generator (saved and restored with checkpoints)."""
        found = getattr(self.sampler, "generator", None)
        return found if isinstance(found, torch.Generator) else None

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.size)  # type: ignore[arg-type]

    def own(self) -> int:
        """How many of this rank's indices are its own (the rest is padding)."""
        return len(range(self.rank, len(self.sampler), self.size))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        total = len(self) * self.size
        if order and len(order) < total:
            order = (order * -(-total // len(order)))[:total]
        yield from order[self.rank::self.size]


def distributed_loader(loader: DataLoader, where: World) -> DataLoader:
    """``loader`` with a DistributedSampler (each rank its share of every epoch), unless it has
    one (or a RankShare) or batches by a sampler of its own; shuffled when the loader shuffled,
    with the seed of its generator (the same on every rank: the shares never overlap)."""
    if isinstance(loader.sampler, (DistributedSampler, RankShare)) or isinstance(
            getattr(loader.batch_sampler, "sampler", None), (DistributedSampler, RankShare)):
        return loader
    if loader.batch_size is None or not _default_batching(loader):
        raise ConfigError(
            "under torchrun each rank needs its share of the data: this loader batches with a batch_sampler of "
            "its own; give it a DistributedSampler (torch.utils.data.DistributedSampler) yourself")
    shuffle = isinstance(loader.sampler, RandomSampler)
    seed = loader.generator.initial_seed() if loader.generator is not None else 0
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset, num_replicas=where.size, rank=where.rank, shuffle=shuffle, seed=seed,
        drop_last=loader.drop_last)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
        persistent_workers=loader.persistent_workers)


def _default_batching(loader: DataLoader) -> bool:
    from torch.utils.data import BatchSampler

    return type(loader.batch_sampler) is BatchSampler and type(loader.sampler).__name__ in (
        "RandomSampler", "SequentialSampler")


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """A DistributedSampler's shuffle follows the epoch: told before the epoch's order is drawn."""
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)


def real_samples(loader: DataLoader) -> int | None:
    """How many of this rank's samples per epoch are its own, when its DistributedSampler pads
    the epoch (repeating the first samples so every rank has as many): the rest are trained, not
    recorded, so that each sample of an epoch has one row. None: no padding."""
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if isinstance(sampler, RankShare):
            return sampler.own() if sampler.own() < len(sampler) else None
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            n = len(sampler.dataset)  # type: ignore[arg-type]
            own = len(range(sampler.rank, n, sampler.num_replicas))
            return own if own < sampler.num_samples else None
    return None
