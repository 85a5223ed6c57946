"""Hugging Face models as they are: a tiny ``transformers`` model built from a config (nothing
downloaded) trained through ``quickstart`` and ``start_run`` with a tokenizer-style dict batch
(``input_ids``, ``attention_mask``, ``labels``): its ``SequenceClassifierOutput`` gives the
logits, the batch's keys reach the model by name, the targets are ``labels``; per-sample loss and
margin are recorded, pause and resume work, a resume is bit-identical, and a model with tied
weights checkpoints and loads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import onthefly
from onthefly.engine.batch import logits_of
from onthefly.store import open_session
from onthefly.store.checkpoints import read_checkpoint, write_checkpoint

transformers = pytest.importorskip("transformers")  # a dev dependency; the package never needs it

VOCAB, LENGTH, CLASSES = 50, 8, 3


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH, num_labels=CLASSES)
    return transformers.BertForSequenceClassification(config)


class Tokenized(Dataset):
    """What a tokenizer's collate gives, per sample: ids, a mask (some padding), a label that
    depends on the tokens."""

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
        lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
        self.mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = self.ids[:, 0] % CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def loader(seed: int = 1) -> DataLoader:
    return DataLoader(Tokenized(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def fit(model: nn.Module, epochs: int, **options: Any) -> onthefly.FitSummary:
    return onthefly.quickstart(project="hf", run_name="bert", model=model,
                               optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                               loss_fn=nn.CrossEntropyLoss(), train_loader=loader(),
                               val_loader=DataLoader(Tokenized(32, seed=5), batch_size=16), max_epochs=epochs,
                               dashboard=False, progress=False, autofork="off", **options)


def test_a_transformers_model_through_quickstart_records_per_sample_loss_and_margin() -> None:
    summary = fit(tiny_bert(), 2)
    assert summary.status == "finished" and summary.steps == 12
    assert summary.val["accuracy"] >= 0  # validation went through the same rules
    rows = open_session(summary.session_dir).samples(summary.run_id)
    assert rows.num_rows == 2 * 96
    assert sorted(set(rows.column("index").to_pylist())) == list(range(96))
    margin = rows.column("margin").to_numpy()
    assert margin.size == 2 * 96 and not (margin == 0).all()  # logits were read from the ModelOutput


def test_pause_and_resume_a_transformers_model() -> None:
    paused = threading.Event()

    class PauseAt(onthefly.Callback):
        run: onthefly.Run | None = None

        def on_fit_start(self, run: onthefly.Run) -> None:
            self.run = run
            run.bus.subscribe(lambda e: paused.set() if e.kind == "status" and e.payload.get("status") == "paused"
                              else None)

        def on_step_end(self, run: onthefly.Run) -> None:
            if run.global_step == 3:
                run.request("pause")

    pause = PauseAt()
    result: dict[str, onthefly.FitSummary] = {}
    thread = threading.Thread(target=lambda: result.setdefault("fit", fit(tiny_bert(), 1, callbacks=[pause])))
    thread.start()
    try:
        assert paused.wait(60), "the run should pause after step 3 was asked"
        assert pause.run is not None and pause.run.global_step == 4 and thread.is_alive()  # at the next boundary
    finally:
        if pause.run is not None:
            pause.run.request("resume")
        thread.join(60)
    summary = result["fit"]
    assert summary.status == "finished" and summary.steps == 6
    statuses = [e["payload"]["status"] for e in open_session(summary.session_dir).events(summary.run_id, kind="status")]
    assert statuses == ["running", "paused", "running", "finished"]


def test_a_resumed_transformers_run_is_bit_identical(tmp_path: Path) -> None:
    class SaveAt(onthefly.Callback):
        def on_step_end(self, run: onthefly.Run) -> None:
            if run.global_step == 4:  # mid-epoch: dropout's RNG and the loader's position
                run.save_checkpoint(tmp_path / "ckpt")

    whole = tiny_bert()
    fit(whole, 2, callbacks=[SaveAt()])
    resumed = tiny_bert(seed=9)  # other initial weights: all of it must come from the checkpoint
    summary = fit(resumed, 2, resume_from=tmp_path / "ckpt", callbacks=[SaveAt()])
    assert summary.status == "finished"
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_the_custom_loop_takes_a_model_output_as_logits() -> None:
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = onthefly.start_run(project="hf", run_name="loop", model=model, optimizer=optimizer, dashboard=False)
    for _ in run.epochs(1):
        for batch in run.batches(loader()):
            labels = batch.pop("labels")
            out = model(**batch)  # a SequenceClassifierOutput
            losses = nn.functional.cross_entropy(out.logits, labels, reduction="none")
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
            run.step(losses, logits=out, targets=labels)
    run.close()
    rows = open_session(run.session.dir).samples(run.run_id)
    assert rows.num_rows == 96 and rows.column("pred").null_count == 0


@pytest.mark.parametrize("outputs", [
    {"logits": torch.ones(2, 3), "hidden": torch.zeros(2)},
    (torch.ones(2, 3), torch.zeros(2)),
    [torch.ones(2, 3)],
])
def test_logits_of_outputs(outputs: Any) -> None:
    assert torch.equal(logits_of(outputs), torch.ones(2, 3))


def test_tied_weights_checkpoint_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH)
    model = transformers.BertForMaskedLM(config)  # the decoder shares the word embeddings
    state = model.state_dict()
    tied = [k for k in state if state[k].data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()]
    assert len(tied) >= 2
    write_checkpoint(tmp_path / "tied", state, {"format": 1})
    tensors, _ = read_checkpoint(tmp_path / "tied")
    assert set(tensors) == set(state)
    again = transformers.BertForMaskedLM(config)
    again.load_state_dict(tensors)
    for key, value in state.items():
        assert torch.equal(again.state_dict()[key], value), key
    assert again.cls.predictions.decoder.weight is again.bert.embeddings.word_embeddings.weight  # still tied
