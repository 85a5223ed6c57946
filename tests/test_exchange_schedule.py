"""Under torchrun, commands are exchanged every few step boundaries, chosen from the time a step
takes, and apply at one boundary known to every rank. Checked in-process on a one-rank gloo group
with a clock the test moves, so the schedule is exact (tests/test_ddp.py runs it on two ranks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist

from onthefly.engine import distributed
from onthefly.engine.control import Command
from onthefly.engine.distributed import World


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[World, list[float], list[int]]]:
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        clock = [0.0]
        monkeypatch.setattr(distributed.time, "perf_counter", lambda: clock[0])
        monkeypatch.setattr(distributed, "EXCHANGE_SECONDS", 0.05)
        broadcasts: list[int] = []  # the boundary of each broadcast
        world = World(rank=0, size=1, local_rank=0, backend="gloo", control=dist.new_group(backend="gloo"))
        original = distributed.dist.broadcast

        def counted(*args: object, **kwargs: object) -> object:
            broadcasts.append(world._boundary)
            return original(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(distributed.dist, "broadcast", counted)
        yield world, clock, broadcasts
    finally:
        dist.destroy_process_group()


def test_steps_of_10_ms_exchange_every_5_boundaries_and_a_command_applies_at_the_next_exchange(
        one_rank: tuple[World, list[float], list[int]]) -> None:
    world, clock, broadcasts = one_rank
    queued: list[Command] = []
    applied: dict[int, list[str]] = {}
    for boundary in range(1, 61):
        clock[0] += 0.010  # a step of 10 ms
        if boundary == 23:
            queued.append(Command(1, "set_lr", {"lr": 0.1}))

        def take() -> list[Command]:
            taken = list(queued)
            queued.clear()
            return taken

        for command in world.commands(take):
            applied.setdefault(boundary, []).append(command.kind)
    # Every boundary at first (nothing measured yet), then one word every 5 boundaries (50 ms).
    # Rank 0 takes the command at the exchange of boundary 23; every rank applies it at the next
    # (28), where its JSON is the one broadcast; the next word goes at the boundary after.
    assert applied == {28: ["set_lr"]}
    assert broadcasts == [1, 2, 3, 8, 13, 18, 23, 28, 29, 34, 39, 44, 49, 54, 59]


def test_slow_steps_exchange_at_every_boundary(one_rank: tuple[World, list[float], list[int]]) -> None:
    world, clock, broadcasts = one_rank
    for _ in range(20):
        clock[0] += 0.2  # slower than the exchange interval
        assert world.commands(list) == []
    assert broadcasts == list(range(1, 21))


def test_a_wait_receives_the_word_in_flight_at_once(one_rank: tuple[World, list[float], list[int]]) -> None:
    # Paused between two exchanges: the word sent at the last one is received now, not at its boundary.
    world, clock, broadcasts = one_rank
    for _ in range(10):
        clock[0] += 0.001
        world.commands(list)
    assert broadcasts == [1, 2, 3] and world._due == 53  # steps of 1 ms: 50 boundaries apart
    pause = [Command(2, "resume", {})]
    assert [c.kind for c in world.commands(lambda: pause, wait=True)] == ["resume"]
    assert world._in_flight is None and broadcasts == [1, 2, 3, 10, 10]  # the length, then the JSON
