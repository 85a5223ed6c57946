"""NumPy <-> Arrow columns without pandas (onthefly.store.columns): the same arrays pyarrow's own
conversions give, nulls and offsets included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onthefly.store.columns import numeric_array, numpy_column, read_parquet, string_array


@pytest.mark.parametrize("type", [pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.bool_()])
def test_numeric_arrays_equal_pyarrows_own(type: pa.DataType) -> None:
    values = np.array([3, 0, -1, 7, 2, 0, 5, 1, 9, 4, 6]) if type != pa.bool_() else np.arange(11) % 3 == 0
    valid = np.arange(11) % 4 != 1
    built = numeric_array(values, type, valid=valid)
    assert built.equals(pa.array(values, type=type, mask=~valid))
    assert built.null_count == int((~valid).sum())
    assert numeric_array(values, type).equals(pa.array(values, type=type))


def test_strings_and_tables_round_trip_through_parquet(tmp_path: Path) -> None:
    table = pa.Table.from_arrays([string_array("train", 5), numeric_array(np.arange(5), pa.int64())],
                                 names=["split", "index"])
    pq.write_table(table, tmp_path / "t.parquet")
    back = read_parquet(tmp_path / "t.parquet")
    assert back.column("split").to_pylist() == ["train"] * 5
    assert back.equals(table)
    assert read_parquet(tmp_path / "t.parquet", ["index"]).column_names == ["index"]
    assert string_array("", 3).to_pylist() == ["", "", ""]


def test_numpy_column_honours_offsets_and_chunks() -> None:
    whole = pa.array(np.arange(10, dtype=np.int64))
    assert numpy_column(whole.slice(3, 4)).tolist() == [3, 4, 5, 6]
    chunked = pa.chunked_array([whole.slice(0, 2), whole.slice(7, 3)])
    assert numpy_column(chunked).tolist() == [0, 1, 7, 8, 9]
    assert numpy_column(pa.chunked_array([], type=pa.float32())).dtype == np.float32


def test_what_has_no_plain_numpy_form_is_refused() -> None:
    with pytest.raises(ValueError, match="nulls"):
        numpy_column(pa.array([1, None], type=pa.int64()))
    with pytest.raises(TypeError, match="numeric"):
        numpy_column(pa.array(["a"]))
    with pytest.raises(TypeError, match="numeric and boolean"):
        numeric_array(np.zeros(2), pa.string())
