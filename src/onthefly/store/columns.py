"""NumPy columns to Arrow arrays and back, without pyarrow's pandas shim.

Most of pyarrow's conveniences (``pa.array``, ``pa.table`` from a dict, ``pa.repeat``,
``Array.to_numpy``, ``pq.read_table``) import pandas on first use when it is installed: 42 MiB of
the user's resident memory and half a second, in the training process, for nothing the store
needs. What runs there (the store's writer thread, the autofork watcher) builds arrays from their
buffers and reads columns back as NumPy views of theirs, with these few functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["numeric_array", "numpy_column", "read_parquet", "string_array"]

_NUMPY = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
          pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
          pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}


def _bitmap(flags: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(np.asarray(flags, dtype=bool), bitorder="little"))


def numeric_array(values: np.ndarray, type: pa.DataType, *, valid: np.ndarray | None = None) -> pa.Array:
    """``values`` as an Arrow array of the numeric or boolean ``type`` (numbers are not copied when
    already of its dtype), null where ``valid`` is False."""
    n = len(values)
    if type == pa.bool_():
        data = _bitmap(values)
    elif type in _NUMPY:
        data = pa.py_buffer(np.ascontiguousarray(values, dtype=_NUMPY[type]))
    else:
        raise TypeError(f"numeric_array() builds numeric and boolean arrays, not {type}")
    if valid is None:
        return pa.Array.from_buffers(type, n, [None, data], null_count=0)
    valid = np.asarray(valid, dtype=bool)
    return pa.Array.from_buffers(type, n, [_bitmap(valid), data], null_count=n - int(valid.sum()))


def string_array(value: str, n: int) -> pa.Array:
    """A string array of ``value`` repeated ``n`` times."""
    encoded = value.encode()
    offsets = np.arange(n + 1, dtype=np.int64) * len(encoded)
    if offsets[-1] >= 2**31:
        raise ValueError(f"{n} copies of {value!r} do not fit one string array")
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.astype(np.int32)),
                                                  pa.py_buffer(encoded * n)], null_count=0)


def numpy_column(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column without nulls as one NumPy array (a view when it has one chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if column.type not in _NUMPY:
        raise TypeError(f"numpy_column() reads numeric columns, not {column.type}")
    dtype = np.dtype(_NUMPY[column.type])
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError(f"a {column.type} column with {chunk.null_count} nulls has no plain NumPy form")
        parts.append(np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk),
                                   offset=chunk.offset * dtype.itemsize))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (optionally some columns), read on the calling thread: Arrow's thread
    pools would keep their per-thread memory in the process."""
    with pq.ParquetFile(path) as file:
        return file.read(columns=columns, use_threads=False)
