"""Reading parquet: several files, max_samples, origins, and the errors for bad paths/columns."""

from __future__ import annotations

import pytest

from sft.data.files import ParquetSource, normalize_paths


def rows(start: int, n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "response": f"r{i}", "extra": i} for i in range(start, start + n)]


def prompts(source: ParquetSource) -> list[str]:
    return [p for _, _, cols in source.iter_batches(2) for p in cols["prompt"]]


def test_several_files_concatenate_in_order(write_parquet):
    a, b = write_parquet(rows(0, 3), "a"), write_parquet(rows(3, 2), "b")
    src = ParquetSource([a, b], {"prompt": "data.prompt_key"}, optional=["missing"])
    assert src.num_rows == 5
    assert prompts(src) == ["p0", "p1", "p2", "p3", "p4"]
    assert src.origin(3) == (b, 0)
    assert src.where(2) == f"{a} row 2"
    # Only the needed columns are read; absent optional ones are simply left out.
    assert [list(cols) for _, _, cols in src.iter_batches(2)] == [["prompt"]] * 3


@pytest.mark.parametrize(("max_samples", "expected"), [(-1, 5), (2, 2), (4, 4), (10, 5)])
def test_max_samples_keeps_the_first_rows_across_files(write_parquet, max_samples, expected):
    a, b = write_parquet(rows(0, 3), "a"), write_parquet(rows(3, 2), "b")
    src = ParquetSource([a, b], {"prompt": "data.prompt_key"}, max_samples=max_samples)
    assert prompts(src) == [f"p{i}" for i in range(expected)]


def test_home_is_expanded(tmp_path, monkeypatch, write_parquet):
    write_parquet(rows(0, 1), "h")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert normalize_paths("~/h.parquet") == [str(tmp_path / "h.parquet")]
    assert ParquetSource("~/h.parquet", {"prompt": "data.prompt_key"}).num_rows == 1


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(ValueError, match=f"data.train_files / data.val_files: file not found: {missing}"):
        ParquetSource([str(missing)], {"prompt": "data.prompt_key"})


def test_not_parquet(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        ParquetSource(str(bad), {"prompt": "data.prompt_key"})


def test_missing_column_lists_available_ones(write_parquet):
    path = write_parquet(rows(0, 1))
    with pytest.raises(
        ValueError,
        match=r"column 'question' \(data.prompt_key\) not found; available columns: \['prompt', 'response', 'extra'\]",
    ):
        ParquetSource(path, {"question": "data.prompt_key"})


def test_chat_data_read_as_single_turn_hints_multiturn(write_parquet):
    path = write_parquet([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="data.multiturn.enable=true"):
        ParquetSource(path, {"prompt": "data.prompt_key"})
