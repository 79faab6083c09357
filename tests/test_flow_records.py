"""What the flow stage writes around the library's rows: which edges a sample can use, and why not."""

import pandas as pd

from notice.flow.records import LABEL_COLUMNS, SKIPPED_COLUMNS, concat_or_empty, labelled, skipped_table, usable_edges

EDGES = (("image", "question"), ("object", "last"), ("question", "last"), ("object", "question"), ("text", "last"))


def test_edges_with_an_empty_group_are_skipped_with_the_reason_in_order():
    positions = {"image": (1, 2, 3, 4), "object": (), "question": (6, 7), "last": (9,), "text": (0, 5, 8)}
    usable, skipped = usable_edges(EDGES, positions, has_object_mask=False)
    assert usable == [("image", "question"), ("question", "last"), ("text", "last")]
    assert skipped == [
        {"analysis": "knockout", "item": "object:last", "reason": "no object mask"},
        {"analysis": "knockout", "item": "object:question", "reason": "no object mask"},
    ]
    _, skipped = usable_edges(EDGES, positions, has_object_mask=True)
    assert {skip["reason"] for skip in skipped} == {"the object mask covers no image patch"}
    usable, skipped = usable_edges(EDGES, {**positions, "object": (2,), "text": ()}, has_object_mask=True)
    assert ("object", "last") in usable and skipped == [
        {"analysis": "knockout", "item": "text:last", "reason": "no text position in this model's input"}
    ]


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
