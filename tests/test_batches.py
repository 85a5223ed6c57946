"""Any model, any data: tuple, list and dict batches, several inputs, forward_fn, bad batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import onthefly
from onthefly.errors import DataError

N, FEATURES, CLASSES = 48, 6, 3


class IndexedData(Dataset):
    """Sample i: features x[i] (a: first 4 columns, b: last 2) and label i % CLASSES."""

    def __init__(self, n: int = N) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, FEATURES, generator=gen)
        self.y = torch.arange(n) % CLASSES

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def _stack(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def collate_tuple(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return _stack(items)


def collate_list(items: list[Any]) -> list[torch.Tensor]:
    return list(_stack(items))


def collate_dict_default(items: list[Any]) -> dict[str, torch.Tensor]:
    x, y = _stack(items)
    return {"input": x, "label": y}


def collate_dict_named(items: list[Any]) -> dict[str, torch.Tensor]:
    x, y = _stack(items)
    return {"pixels": x, "cls": y, "extra": torch.zeros(len(y))}


def collate_dict_two_inputs(items: list[Any]) -> dict[str, torch.Tensor]:
    x, y = _stack(items)
    return {"a": x[:, :4], "b": x[:, 4:], "label": y}


def collate_tuple_three(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = _stack(items)
    return x[:, :4], x[:, 4:], y


class TwoInputs(nn.Module):
    """forward(a, b) with different widths: swapping the two fails on shapes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, CLASSES)
        self.b = nn.Linear(2, CLASSES)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


class DictOut(nn.Module):
    """An unusual model: takes a keyword-only scale and returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor, *, scale: float) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x) * scale}


def plain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES)


def fit(model: nn.Module, collate: Any, epochs: int = 2, **options: Any) -> onthefly.FitSummary:
    loader = DataLoader(IndexedData(), batch_size=8, shuffle=True, collate_fn=collate)
    return onthefly.quickstart(
        project="batches", run_name="run", model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=loader, max_epochs=epochs, progress=False, **options,
    )


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("make_model", "collate", "options"),
    [
        (plain_model, collate_tuple, {}),
        (plain_model, collate_list, {}),
        (plain_model, None, {}),  # default collate of (x, y) items
        (plain_model, collate_dict_default, {}),
        (plain_model, collate_dict_named, {"inputs": "pixels", "targets": "cls"}),
        (TwoInputs, collate_dict_two_inputs, {"inputs": ("a", "b")}),
        (TwoInputs, collate_tuple_three, {"inputs": (0, 1), "targets": 2}),
        (DictOut, collate_tuple,
         {"forward_fn": lambda model, batch: (model(batch[0], scale=2.0)["logits"], batch[1])}),
    ],
    ids=["tuple", "list", "default-collate", "dict-default-keys", "dict-named-keys",
         "dict-two-inputs-kwargs", "tuple-two-inputs-positional", "forward_fn"],
)
def test_batch_layout_trains_and_records_every_sample(make_model: Any, collate: Any,
                                                      options: dict[str, Any]) -> None:
    model = make_model()
    before = params(model)
    summary = fit(model, collate, **options)

    assert summary.status == "finished"
    assert summary.steps == 2 * N // 8
    assert all(not torch.equal(a, b) for a, b in zip(before, params(model), strict=True))
    samples = onthefly.open_session(summary.session_dir).samples(summary.run_id)
    for epoch in (0, 1):
        rows = samples.filter(np.asarray(samples.column("epoch")) == epoch)
        index = np.asarray(rows.column("index"))
        np.testing.assert_array_equal(np.sort(index), np.arange(N))
        # The targets were read from the right field: the label of sample i is i % CLASSES.
        np.testing.assert_array_equal(np.asarray(rows.column("label")), index % CLASSES)


class Pair:
    """A batch type On The Fly does not know."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


def only_session(home: Path) -> onthefly.store.SessionReader:
    folders = [p for p in (home / "sessions").iterdir() if p.is_dir()]
    assert len(folders) == 1
    return onthefly.open_session(folders[0])


def test_unsupported_batch_type_fails_at_first_step_with_the_fix(onthefly_home: Path) -> None:
    calls = []

    def collate_pair(items: list[Any]) -> Pair:
        calls.append(len(items))
        return Pair(*_stack(items))

    with pytest.raises(DataError, match=r"Pair; On The Fly understands tuple, list and dict.*forward_fn="):
        fit(plain_model(), collate_pair)

    assert len(calls) == 1  # the first batch, not the end of an epoch
    session = only_session(onthefly_home)
    (run,) = session.runs()
    assert run["status"] == "failed"
    assert len(session.samples(run["id"])) == 0
    (error,) = session.events(kind="error")
    assert error["payload"]["type"] == "DataError"
    assert error["step"] == 0


@pytest.mark.parametrize(
    ("batch_keys", "options", "message"),
    [
        (("feat", "tgt"), {}, r"keys \['feat', 'tgt'\].*which are the inputs.*inputs=<key>"),
        (("feat", "tgt"), {"inputs": "feat"}, r"keys \['feat', 'tgt'\].*which are the targets"),
        (("input", "tgt"), {}, r"keys \['input', 'tgt'\].*which are the targets"),
        (("feat", "tgt"), {"inputs": "pixels", "targets": "tgt"}, r"no field 'pixels'.*\['feat', 'tgt'\]"),
    ],
    ids=["both-unknown", "targets-unknown", "default-input-unknown-target", "named-key-missing"],
)
def test_dict_batch_with_unknown_keys_names_the_keys(onthefly_home: Path, batch_keys: tuple[str, str],
                                                     options: dict[str, Any], message: str) -> None:
    def collate(items: list[Any]) -> dict[str, torch.Tensor]:
        return dict(zip(batch_keys, _stack(items), strict=True))

    with pytest.raises(DataError, match=message):
        fit(plain_model(), collate, **options)
    (run,) = only_session(onthefly_home).runs()
    assert run["status"] == "failed"


def test_tuple_of_three_without_inputs_says_which_items_to_name(onthefly_home: Path) -> None:
    with pytest.raises(DataError, match=r"tuple of 3 items.*inputs=\(0, 1\), targets=2"):
        fit(TwoInputs(), collate_tuple_three)
    (run,) = only_session(onthefly_home).runs()
    assert run["status"] == "failed"


class WholeBatches(Dataset):
    """A dataset that returns whole batches, read with batch_size=None."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(i)
        return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def test_a_loader_without_automatic_batching_over_whole_batches_says_how_to_batch(onthefly_home: Path) -> None:
    model = nn.Linear(4, 3)
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(WholeBatches(), batch_size=None),
                               progress=False, device="cpu")
    with pytest.raises(DataError, match=r"one dataset index for a batch of 8 samples.*batch_size=None.*__getitems__"):
        trainer.fit(1)
    (run,) = only_session(onthefly_home).runs()
    assert run["status"] == "failed"
