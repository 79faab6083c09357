import pandas as pd
import pytest

from notice.files.sharding import gather_tables, save_torch, shard_ids, shard_name, take_shard


def test_shards_partition_the_sorted_ids_into_contiguous_blocks():
    ids = [f"s{i:02d}" for i in (5, 3, 9, 1, 7, 2, 8)]
    shards = [shard_ids(ids, k, 3) for k in range(3)]
    assert set().union(*shards) == set(ids)
    assert sum(len(s) for s in shards) == len(ids)
    assert shards[0] == {"s01", "s02", "s03"} and shards[1] == {"s05", "s07"} and shards[2] == {"s08", "s09"}


def test_rows_of_one_sample_stay_together_and_follow_the_universe():
    selected = ["a", "b", "c", "d"]
    pairs = pd.DataFrame({"sample_id": ["a", "a", "c", "d"], "draw": [0, 1, 0, 0]})  # b was excluded
    first = take_shard(pairs, 0, 2, universe=selected)
    second = take_shard(pairs, 1, 2, universe=selected)
    assert first["sample_id"].tolist() == ["a", "a"]  # shard 0 of the selection is {a, b}
    assert second["sample_id"].tolist() == ["c", "d"]


def test_more_shards_than_samples_gives_empty_shards():
    assert [len(shard_ids(["x"], k, 3)) for k in range(3)] == [1, 0, 0]
    with pytest.raises(ValueError, match="shard index 3"):
        shard_ids(["x"], 3, 3)
    assert shard_name(1, 4) == "shard1-of4"


def test_gather_keeps_shard_order_and_columns(tmp_path):
    paths = []
    for k, ids in enumerate([["a", "b"], [], ["c"]]):
        path = tmp_path / f"{k}.parquet"
        pd.DataFrame({"sample_id": pd.Series(ids, dtype=str), "x": pd.Series(range(len(ids)), dtype=float)}).to_parquet(
            path
        )
        paths.append(path)
    gathered = gather_tables(paths, ["x", "sample_id"])
    assert gathered["sample_id"].tolist() == ["a", "b", "c"] and list(gathered.columns) == ["x", "sample_id"]


def test_save_torch_writes_what_loads_back_and_no_temporary_file(tmp_path):
    import torch

    saved = {"s1": (torch.arange(4.0), {("mlp", 0): torch.ones(2, 3)})}  # a clean cache's shape
    save_torch(saved, tmp_path / "cache.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]
    loaded = torch.load(tmp_path / "cache.pt")
    assert loaded.keys() == saved.keys() and torch.equal(loaded["s1"][0], saved["s1"][0])
    assert torch.equal(loaded["s1"][1][("mlp", 0)], saved["s1"][1][("mlp", 0)])
