"""The replay log (onthefly.engine.replay_log): the last N batches, oldest first, from storage
written in place."""

from __future__ import annotations

import numpy as np
import torch

from onthefly.engine.replay_log import ReplayLog


def test_keeps_the_last_window_oldest_first() -> None:
    log = ReplayLog(window=3)
    for step in range(5):
        log.append(0, step + 1, [10 * step, 10 * step + 1], "deferred", torch.tensor(float(step)))
    kept = list(log)
    assert len(log) == 3
    assert [b.batch_in_epoch for b in kept] == [3, 4, 5]
    assert [b.indices.tolist() for b in kept] == [[20, 21], [30, 31], [40, 41]]
    assert [float(b.loss) for b in kept] == [2.0, 3.0, 4.0]
    assert {b.kind for b in kept} == {"deferred"}


def test_batches_of_any_size_kinds_and_missing_values() -> None:
    log = ReplayLog(window=4)
    log.append(1, 1, np.arange(2), "per_sample", torch.tensor(1.5))
    log.append(1, 2, list(range(7)), "curated", None)  # wider than any batch before: rows grow
    log.append(2, 1, None, "deferred", torch.tensor([1.0, 2.0]))  # no indices; a loss that is not a scalar
    first, second, third = list(log)
    assert first.indices.tolist() == [0, 1] and float(first.loss) == 1.5 and first.kind == "per_sample"
    assert second.indices.tolist() == list(range(7)) and second.loss is None and second.kind == "curated"
    assert third.indices is None and third.loss is None and third.epoch == 2


def test_a_loss_of_another_dtype_forgets_the_older_ones() -> None:
    log = ReplayLog(window=4)
    log.append(0, 1, [0], "deferred", torch.tensor(1.0))
    log.append(0, 2, [1], "deferred", torch.tensor(2.0, dtype=torch.float64))
    first, second = list(log)
    assert first.loss is None  # its float32 bits are not in the float64 storage
    assert second.loss is not None and second.loss.dtype == torch.float64 and float(second.loss) == 2.0


def test_what_it_returns_is_a_copy() -> None:
    log = ReplayLog(window=1)
    log.append(0, 1, [5, 6], "deferred", torch.tensor(1.0))
    (kept,) = list(log)
    log.append(0, 2, [7, 8], "deferred", torch.tensor(2.0))
    assert kept.indices.tolist() == [5, 6]
    assert float(kept.loss) == 1.0


def test_batches_held_then_written_together_across_the_ring_s_end() -> None:
    # More batches than a settle holds, wrapping the ring several times, with the epoch's last
    # batch smaller, a batch without indices and one whose loss requires grad among them.
    log = ReplayLog(window=100)
    weight = torch.tensor(2.0, requires_grad=True)
    expected = []
    for step in range(1, 331):
        size = 3 if step % 50 else 1
        ids = None if step == 317 else [step * 10 + i for i in range(size)]
        loss = weight * step if step == 320 else torch.tensor(float(step))
        log.append(step // 50, step, ids, "deferred", loss)
        expected.append((step // 50, step, ids, float(loss.detach())))
        assert len(log) == min(step, 100)
    kept = list(log)
    assert [(b.epoch, b.batch_in_epoch, None if b.indices is None else b.indices.tolist(), float(b.loss))
            for b in kept] == expected[-100:]
    assert not any(b.loss.requires_grad for b in kept)
