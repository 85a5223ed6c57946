"""Hot-path rule: every torch operation of a run happens on the training thread.

A torch operation on another thread (the engine's transfer or store thread) gives that thread its
own OpenMP team on CPU; with more OpenMP threads than cores, GNU OpenMP stops spinning between
parallel regions and every region of the training loop pays a wake-up (measured 1.28x slower
training). The profiler, told to watch every thread, sees which thread ran each operation.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.store.reader import SessionReader
from test_custom_loop import loader, new_run, train_step


def _threads_running_torch(work: Any) -> dict[int, set[str]]:
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
        work()
    threads: dict[int, set[str]] = {}
    for event in prof.events():
        threads.setdefault(event.thread, set()).add(event.name)
    return threads


def _probe_sees_other_threads() -> None:
    """The profiler does see a second thread's operations (so the tests below can fail)."""
    def other() -> None:
        torch.ones(4).add_(1)

    def work() -> None:
        torch.zeros(4).add_(1)
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()

    assert len(_threads_running_torch(work)) == 2


def test_trainer_runs_every_torch_operation_on_the_training_thread() -> None:
    _probe_sees_other_threads()
    model = toy_model()
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=torch.nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True),
        val_loader=DataLoader(toy_data(64, seed=1), batch_size=32),
        test_loader=DataLoader(toy_data(64, seed=2), batch_size=32),
        progress=False, device="cpu", grad_norm=True, val_samples=True)

    threads = _threads_running_torch(lambda: trainer.fit(2, do_test_after=True))

    assert len(threads) == 1, {t: sorted(names)[:8] for t, names in threads.items()}
    reader = SessionReader(trainer.run.session.dir)  # the rows still arrive
    assert reader.samples(trainer.run.run_id).num_rows == 2 * 256
    assert reader.samples(trainer.run.run_id, split="val").num_rows == 2 * 64


def test_custom_loop_runs_every_torch_operation_on_the_training_thread() -> None:
    def loop() -> None:
        run, model, opt = new_run()
        with run:
            for _ in run.epochs(2):
                for batch in run.batches(loader()):
                    train_step(run, model, opt, batch)

    threads = _threads_running_torch(loop)

    assert len(threads) == 1, {t: sorted(names)[:8] for t, names in threads.items()}
