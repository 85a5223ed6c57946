"""Export a slice to CSV, Parquet or JSON: index, signals, label, and the sample's own data.

Streamed: the signals come from DuckDB in record batches and the data is read from the dataset a
batch of rows at a time, so a slice of millions of samples never sits whole in memory. The file
is written under a temporary name and renamed when complete: a failure leaves no partial file.

Data columns: each tensor, array or number a dataset item holds is flattened into columns
named after its field - ``x_0 .. x_{d-1}`` for the first element of a tuple (the inputs),
``y`` for the second, ``field2...`` for later ones, the key for a dict. Other values (strings,
images objects) are left out.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from ..errors import ConfigError, DataError, StoreError
from ..signals.dynamics import STATS_SCHEMA
from ..store.reader import SessionReader
from .slices import resolve_slice

__all__ = ["EXPORTS_DIR", "FORMATS", "attach", "dataset_note", "export_file", "export_record", "export_slice",
           "format_for", "isolated_rng", "new_export", "run_export", "write_rows"]

FORMATS = ("csv", "parquet", "json")
ROWS_PER_CHUNK = 4096
EXPORTS_DIR = "exports"  # in the session folder: <id>.<format> and its record <id>.record (JSON)
EXPORT_ID = re.compile(r"^[0-9a-f]{32}$")


def format_for(path: str | Path, fmt: str | None = None) -> str:
    """The export format: given, or from the file's suffix."""
    fmt = (fmt or Path(path).suffix.lstrip(".")).lower()
    if fmt == "jsonl":
        fmt = "json"
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt or '(none)'!r}: use one of {', '.join(FORMATS)} "
                          "(or a file name ending in .csv, .parquet or .json)")
    return fmt


def export_slice(session: SessionReader | str | Path, slice_: str | dict[str, Any], path: str | Path, *,
                 format: str | None = None, run_id: int | None = None, epoch: int | None = None,
                 dataset: Any = None) -> dict[str, Any]:
    """Write a slice's rows to ``path``. ``slice_`` is a saved slice's name or a definition (see
    :mod:`onthefly.actions.slices`; then ``run_id`` is needed unless the session has one run).
    With ``dataset`` (map-style: ``dataset[i]``), each row carries the sample's own data.
    Returns {"path", "format", "rows", "columns"}."""
    from ..store.reader import open_session

    reader = session if isinstance(session, SessionReader) else open_session(session)
    fmt = format_for(path, format)
    if isinstance(slice_, str):
        record = reader.slice(slice_)
        run_id, epoch, indices = record["run_id"], record["epoch"], reader.slice_indices(record)
    else:
        if run_id is None:
            runs = reader.runs()
            if len(runs) != 1:
                raise ConfigError(f"the session has {len(runs)} runs: say which with run_id=")
            run_id = runs[0]["id"]
        epoch, indices = resolve_slice(reader, run_id, slice_, epoch)
    target = Path(path)
    _check_writable(target)
    return write_rows(reader, run_id, epoch, indices, target, fmt, dataset)


def _check_writable(target: Path) -> None:
    if target.is_dir():
        raise ConfigError(f"cannot export to {target}: it is a folder; give a file name")
    if not target.parent.is_dir():
        raise ConfigError(f"cannot export to {target}: the folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ConfigError(f"cannot export to {target}: the folder {target.parent} is not writable")


def write_rows(reader: SessionReader, run_id: int, epoch: int | None, indices: np.ndarray, target: Path,
               fmt: str, dataset: Any = None) -> dict[str, Any]:
    tmp = target.with_name(f".{target.name}.partial")
    rows = 0
    columns: list[str] = []
    try:
        with _Writer(tmp, fmt) as writer:
            for batch in _batches(reader, run_id, epoch, indices, dataset):
                writer.write(batch)
                rows += batch.num_rows
                columns = batch.schema.names
            if writer.empty:  # still a valid file, with the columns
                writer.write(pa.RecordBatch.from_pylist([], schema=STATS_SCHEMA))
                columns = STATS_SCHEMA.names
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"could not write {target}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(target), "format": fmt, "rows": rows, "columns": columns}


def _batches(reader: SessionReader, run_id: int, epoch: int | None, indices: np.ndarray,
             dataset: Any) -> Iterator[pa.RecordBatch]:
    _, stats = reader.iter_sample_stats(run_id, epoch, indices=indices, batch_rows=ROWS_PER_CHUNK)
    data_columns: list[str] | None = None
    for batch in stats:
        if dataset is None or batch.num_rows == 0:
            yield batch
            continue
        index = batch.column("index").to_numpy()
        data = [_flatten(_item(dataset, int(i))) for i in index]
        if data_columns is None:
            data_columns = list(data[0])
        arrays = list(batch.columns)
        names = list(batch.schema.names)
        for i, row in zip(index, data, strict=True):
            if list(row) != data_columns:
                raise DataError(f"sample {i} does not have the same fields and shapes as the first one, so its "
                                "data cannot go into fixed columns; export without the dataset")
        for name in data_columns:
            arrays.append(pa.array([row[name] for row in data]))
            names.append(name if name not in names else f"data_{name}")
        yield pa.RecordBatch.from_arrays(arrays, names=names)


def _item(dataset: Any, i: int) -> Any:
    try:
        return dataset[i]
    except Exception as exc:
        raise DataError(f"reading sample {i} from the dataset failed: {type(exc).__name__}: {exc}") from exc


def _flatten(item: Any) -> dict[str, float | int | bool]:
    if isinstance(item, dict):
        fields = [(str(k), v) for k, v in item.items()]
    elif isinstance(item, (tuple, list)):
        names = ["x", "y"] + [f"field{i}" for i in range(2, len(item))]
        fields = list(zip(names, item, strict=False))
    else:
        fields = [("x", item)]
    out: dict[str, float | int | bool] = {}
    for name, value in fields:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, (bool, int, float, np.number, np.bool_)):
            out[name] = value.item() if isinstance(value, (np.number, np.bool_)) else value
        elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            flat = value.reshape(-1)
            if flat.size == 1:
                out[name] = flat[0].item()
            else:
                for j, v in enumerate(flat.tolist()):
                    out[f"{name}_{j}"] = v
    return out


class _Writer:
    """One output file, written a record batch at a time."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.empty = True
        self._parquet: pq.ParquetWriter | None = None
        self._csv: pacsv.CSVWriter | None = None
        self._json: IO[str] | None = None

    def __enter__(self) -> _Writer:
        if self.fmt == "json":
            self._json = open(self.path, "w", encoding="utf-8")
            self._json.write("[")
        return self

    def write(self, batch: pa.RecordBatch) -> None:
        if self.fmt == "parquet":
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, batch.schema, compression="zstd")
            self._parquet.write_batch(batch, row_group_size=max(batch.num_rows, 1))
        elif self.fmt == "csv":
            if self._csv is None:
                self._csv = pacsv.CSVWriter(self.path, batch.schema)
            self._csv.write_batch(batch)
        else:
            assert self._json is not None
            for i, row in enumerate(batch.to_pylist()):
                self._json.write(("\n" if self.empty and i == 0 else ",\n") + json.dumps(_json_row(row)))
        if batch.num_rows:
            self.empty = False

    def __exit__(self, *exc: object) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()
        if self._json is not None:
            self._json.write("\n]\n")
            self._json.close()


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# ---- exports a dashboard asks for -----------------------------------------------------------
# The server writes an export without sample data itself; one with data is a command the
# training process carries out at a step boundary (the dataset is the user's object: read on
# the training thread, with every RNG put back as it was, so watching never changes training).
# Either way the result is a file and a small JSON record beside it, written when complete.

def new_export(session_dir: Path, *, slice_name: str, run_id: int, epoch: int | None, fmt: str,
               data: bool) -> dict[str, Any]:
    """A pending export's record (its id is random: the download URL cannot be guessed)."""
    export_id = secrets.token_hex(16)
    filename = re.sub(r"[^A-Za-z0-9_.\-]+", "-", slice_name).strip("-") or "slice"
    return {"id": export_id, "slice": slice_name, "run_id": run_id, "epoch": epoch, "format": fmt,
            "data": data, "status": "pending", "rows": None, "error": None, "note": None,
            "filename": f"{filename}.{fmt}"}


def export_record(session_dir: Path, export_id: str) -> dict[str, Any] | None:
    """The finished (ready or failed) export's record, None while it is not written."""
    if not EXPORT_ID.match(export_id):
        return None
    path = session_dir / EXPORTS_DIR / f"{export_id}.record"
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record


def export_file(session_dir: Path, record: dict[str, Any]) -> Path:
    return session_dir / EXPORTS_DIR / f"{record['id']}.{record['format']}"


def run_export(reader: SessionReader, record: dict[str, Any], dataset: Any = None, *,
               note: str | None = None) -> dict[str, Any]:
    """Write the export ``record`` describes (rows with ``dataset``'s data when given), then its
    finished record; returns that record. Failures are recorded, not raised."""
    folder = reader.dir / EXPORTS_DIR
    result = {**record, "note": note}
    try:
        folder.mkdir(exist_ok=True)
        saved = reader.slice(record["slice"])
        written = write_rows(reader, saved["run_id"], saved["epoch"], reader.slice_indices(saved),
                             export_file(reader.dir, record), record["format"], dataset)
        result.update(status="ready", rows=written["rows"], epoch=saved["epoch"])
    except Exception as exc:
        result.update(status="failed", error=str(exc) or type(exc).__name__)
    tmp = folder / f".{record['id']}.record.partial"
    try:
        tmp.write_text(json.dumps(result), encoding="utf-8")
        os.replace(tmp, folder / f"{record['id']}.record")
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        result.update(status="failed", error=f"could not write the export's record: {exc}")
    return result


def dataset_note(dataset: Any, *, given: bool) -> tuple[Any, str | None]:
    """The dataset rows can be read from (None if none), and what a user should know about it."""
    if dataset is None:
        return None, "rows carry no sample data: the run has no dataset to read them from (give export_dataset=)"
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None, (f"rows carry no sample data: the dataset ({type(dataset).__name__}) cannot be read by "
                      "index (an IterableDataset); give export_dataset= (a map-style view) for data")
    if not given and getattr(dataset, "transform", None) is not None:
        return dataset, ("rows were read from the training dataset, whose transform applies (augmented "
                         "rows); give export_dataset= for rows without augmentation")
    return dataset, None


def attach(run: Any) -> None:
    """Let ``run`` (a live engine Run) carry out "export" commands at a step boundary: the
    slice's rows with the data of ``run.export_dataset`` (else the training dataset)."""

    def handle(args: dict[str, Any]) -> dict[str, Any]:
        record = {"id": args["export_id"], "slice": args["slice"], "run_id": args["run_id"], "epoch": args["epoch"],
                  "format": args["format"], "data": True, "status": "pending", "rows": None, "error": None,
                  "note": None, "filename": args["filename"]}
        given = getattr(run, "export_dataset", None)
        dataset, note = dataset_note(given if given is not None else run.train_dataset, given=given is not None)
        run.session.flush()  # the slice's record and the signals are in the files before they are read
        with isolated_rng():
            result = run_export(SessionReader(run.session.dir), record, dataset, note=note)
        return {"export": result["id"], "status": result["status"], "rows": result["rows"]}

    run.register_action("export", handle)


class isolated_rng:
    """Every global RNG (Python, NumPy, torch CPU and CUDA) restored on exit: reading a
    dataset's rows (random augmentations) leaves the training's random streams untouched."""

    def __enter__(self) -> None:
        self._python = random.getstate()
        self._numpy = np.random.get_state()
        self._torch = torch.random.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    def __exit__(self, *exc: object) -> None:
        random.setstate(self._python)
        np.random.set_state(self._numpy)
        torch.random.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
