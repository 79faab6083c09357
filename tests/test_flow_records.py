"""What the flow stage writes around the library's rows: labels, empty shards, skipped rows."""

import pandas as pd

from notice.flow.records import (
    LABEL_COLUMNS,
    SKIPPED_COLUMNS,
    labelled,
    no_object_reason,
    skipped_table,
)
from notice.patching.experiment import concat_or_empty


def test_a_missing_object_says_whether_a_mask_was_known():
    assert no_object_reason(False) == "no object mask"
    assert no_object_reason(True) == "the object mask covers no image patch"


def test_labels_go_in_front_and_an_empty_shard_keeps_its_columns():
    rows = pd.DataFrame({"layer": [0, 1], "value": [0.5, 0.25]})
    labels = {"model": "m", "dataset": "d", "task": "colour", "sample_id": "s1"}
    table = labelled(rows, labels, ["layer", "value"])
    assert list(table.columns) == [*LABEL_COLUMNS, "layer", "value"]
    assert table["sample_id"].tolist() == ["s1", "s1"] and table["value"].tolist() == [0.5, 0.25]
    both = concat_or_empty([table, table.iloc[:0], table], [*LABEL_COLUMNS, "layer", "value"])
    assert len(both) == 4
    empty = concat_or_empty([], [*LABEL_COLUMNS, "layer"])
    assert list(empty.columns) == [*LABEL_COLUMNS, "layer"] and empty.empty
    skipped = skipped_table([{**labels, "analysis": "ablation", "item": "object", "reason": "no object mask"}])
    assert list(skipped.columns) == list(SKIPPED_COLUMNS) and skipped.iloc[0]["reason"] == "no object mask"
    assert list(skipped_table([]).columns) == list(SKIPPED_COLUMNS)
