import pandas as pd
import pytest

from notice.files.tables import EXCLUSION_COLUMNS, TableError, read_table, write_table


def test_write_then_read_roundtrip(tmp_path):
    df = pd.DataFrame({"sample_id": ["a"], "stage": ["pairs"], "reason": ["no partner"]})
    write_table(df, tmp_path / "x.parquet", EXCLUSION_COLUMNS)
    assert not (tmp_path / "x.parquet.tmp").exists()
    assert read_table(tmp_path / "x.parquet", EXCLUSION_COLUMNS).equals(df)


def test_missing_column_names_file_and_column(tmp_path):
    df = pd.DataFrame({"sample_id": ["a"], "stage": ["pairs"]})
    with pytest.raises(TableError, match=r"x.parquet.*reason"):
        write_table(df, tmp_path / "x.parquet", EXCLUSION_COLUMNS)
    assert not (tmp_path / "x.parquet").exists()
