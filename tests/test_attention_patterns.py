"""The attention_patterns -> head_functions -> overlay library path on tiny random models.

Each model is saved and loaded back through `notice.workflow.runtime.load_model`, as the workflow does, so
the test also shows that the loaded model returns attention weights (eager attention). Images are
noise with a known object mask: the top-left 16×16 quarter of a 32×32 image, i.e. patches
0, 1, 4, 5 of the 4×4 grid every tiny family sees it on (8-pixel patches; LLaVA-NeXT's base view;
Qwen2-VL's 2×2-merged 4-pixel patches).
"""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from toy_adapters import DEFAULT_FAMILIES, QUESTION, noise_image, one_torch_thread, tiny_adapter

from notice.adapters.decoder import DecoderVLMAdapter
from notice.files.tables import PROMPT_COLUMNS
from notice.method.attention import RECORD_INDEX_COLUMNS, choose_samples, load_records, write_records
from notice.method.head_functions import AVERAGE_HEAD, HeadFunctionConfig, grounding_summary, scores_from_records
from notice.present.attention import attention_overlays, overlay_panels
from notice.workflow.runtime import load_image, load_model

OBJECT_PATCHES = [0, 1, 4, 5]


def selected_table(adapter, tmp_path) -> pd.DataFrame:
    """Three colour samples (two with the mask) and one shape sample without a mask."""
    mask = np.zeros((32, 32), np.uint8)
    mask[:16, :16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rows = []
    for i, (task, has_mask) in enumerate([("colour", True), ("colour", True), ("colour", False), ("shape", False)]):
        image = tmp_path / f"image{i}.png"
        noise_image(i).save(image)
        rows.append(
            {
                "sample_id": f"s{i}",
                "task": task,
                "category": "red",
                "image_path": str(image),
                "mask_path": str(tmp_path / "mask.png") if has_mask else "",
                "answer": "red",
                "distractor": "green",
                "correct_first": True,
                "question": QUESTION,
                "prompt": adapter.format_prompt(QUESTION),
                "answer_token_id": adapter.option_token_id("red"),
                "distractor_token_id": adapter.option_token_id("green"),
            }
        )
    return pd.DataFrame(rows, columns=list(PROMPT_COLUMNS))


def test_choose_samples_spreads_over_tasks_masks_first():
    selected = pd.DataFrame(
        {
            "sample_id": [f"c{i}" for i in range(4)] + ["s0", "s1"],
            "task": ["colour"] * 4 + ["shape"] * 2,
            "mask_path": ["", "m1", "", "m3", "", ""],
        }
    )
    chosen = choose_samples(selected, 4, seed=0)
    assert chosen["task"].tolist() == ["colour", "shape", "colour", "shape"]
    assert set(chosen.loc[chosen["task"] == "colour", "sample_id"]) == {"c1", "c3"}  # the masked ones
    pd.testing.assert_frame_equal(chosen, choose_samples(selected.iloc[::-1], 4, seed=0))
    assert len(choose_samples(selected, 10, seed=0)) == 6


@pytest.fixture(scope="module", params=DEFAULT_FAMILIES)
def pipeline(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    with one_torch_thread():
        tiny = tiny_adapter(request.param)
        tiny.model.save_pretrained(tmp_path / "model")
        tiny.processor.save_pretrained(tmp_path / "model")
        adapter = load_model(str(tmp_path / "model"), {"device": "cpu", "dtype": "float32", "prompt_template": None})
        selected = selected_table(adapter, tmp_path)
        index = write_records(adapter, choose_samples(selected, 3, seed=0), load_image, tmp_path / "attention")
    records = load_records(tmp_path / "attention")
    scores = scores_from_records(
        {("m", adapter.head_site, "d"): records}, ["model", "site", "dataset"], HeadFunctionConfig()
    )
    return adapter, index, records, scores, tmp_path


def test_records_hold_normalised_patch_attention(pipeline):
    adapter, index, records, _, _ = pipeline
    assert list(index.columns) == list(RECORD_INDEX_COLUMNS)
    assert index["sample_id"].tolist() == ["s0", "s3", "s1"]  # colour (masked), shape, colour (masked)
    assert index["has_object_mask"].tolist() == [True, False, True]
    for record in records:
        weights = record["weights"]
        assert record["layers"].tolist() == adapter.fusion_layers()
        assert weights.shape == (len(adapter.fusion_layers()), adapter.n_heads, len(record["query_positions"]), 16)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert ((record["mass"] > 0) & (record["mass"] <= 1 + 1e-6)).all()
        np.testing.assert_allclose(record["average"], weights.mean(axis=1), atol=1e-6)
        np.testing.assert_allclose(record["all_heads_average"], weights.mean(axis=(0, 1)), atol=1e-6)
        assert record["image"].shape == (32, 32, 3) and record["site"] == adapter.head_site
        labels = record["query_labels"].tolist()
        # a text encoder's cross-attention fusion: the head position is the answer token in the question; decoders
        # (their cross-attention layers too): the last token
        assert labels[record["head_query_index"]] == (
            "<last>" if isinstance(adapter, DecoderVLMAdapter) else "<answer>"
        )
        assert "<answer>" in labels and "<distractor>" in labels
    assert records[1]["mask"].size == 0
    mask = records[0]["mask"]
    assert mask.shape == (32, 32) and mask[:16, :16].all() and mask.sum() == 256


def test_scores_match_the_records_by_hand(pipeline):
    _, _, records, scores, _ = pipeline
    masked = [r for r in records if r["mask"].size]
    index, head, q = 1, 2, masked[0]["head_query_index"]
    layer = int(masked[0]["layers"][index])  # the second layer with fusion attention
    # detection score = patch attention on the object / object area (1/4), mean over masked samples
    expected = np.mean([r["weights"][index, head, q, OBJECT_PATCHES].sum() / 0.25 for r in masked])
    row = scores[(scores["layer"] == layer) & (scores["head"] == head) & scores["is_head_position"]].iloc[0]
    assert row["detection_score"] == pytest.approx(expected, rel=1e-5)
    assert row["n_samples"] == 3 and row["n_masked"] == 2 and row["has_object_mask"]
    average = scores[(scores["layer"] == layer) & (scores["head"] == AVERAGE_HEAD) & scores["is_head_position"]].iloc[0]
    assert row["object_lift"] == pytest.approx(expected / average["detection_score"], rel=1e-5)
    assert scores["has_object_mask"].all()  # every query has masked samples (same prompt)


def test_without_masks_only_outlier_scores(pipeline):
    _, _, records, _, _ = pipeline
    unmasked = [r for r in records if not r["mask"].size]
    scores = scores_from_records({("m", "x", "d"): unmasked}, ["model", "site", "dataset"], HeadFunctionConfig())
    assert not scores["has_object_mask"].any() and scores["detection_score"].isna().all()
    assert scores["outlier_attention"].notna().all()
    assert set(scores["function"]) <= {"outlier_suppression", "none"}
    assert grounding_summary(scores, ["model", "site", "dataset"]).empty


def test_overlay_figure_from_records(pipeline):
    adapter, _, records, scores, tmp_path = pipeline
    first = adapter.fusion_layers()[0]
    universal = pd.DataFrame({"layer": [first], "head": [1], "kind": ["vision"]})
    panels = overlay_panels(universal, scores, max_heads=4)
    best = scores[scores["head"] >= 0].sort_values("detection_score").iloc[-1]
    assert panels["title"].tolist()[0].startswith(f"L{first}.H1 vision: ")
    assert panels.iloc[-1][["layer", "head", "query"]].tolist() == [best["layer"], best["head"], best["query"]]
    paths = attention_overlays(records, panels, tmp_path / "figures" / "attention_toy", "title")
    assert [p.suffix for p in paths] == [".png", ".svg", ".html"]
    assert all(p.stat().st_size > 1000 for p in paths)
    html = paths[2].read_text()
    assert html.count("data:image/png;base64,") >= len(records) * 2  # overlays are inline, not files


def test_no_records_give_empty_tables_with_columns():
    scores = scores_from_records({}, ["model", "site", "dataset"], HeadFunctionConfig())
    assert scores.empty and {"detection_score", "has_object_mask", "function"} <= set(scores.columns)
    assert grounding_summary(scores, ["model", "site", "dataset"]).empty
