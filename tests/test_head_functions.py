"""Head-function scores on constructed attention maps, checked against values computed by hand.

The scene: a 4×4 patch grid (P = 16) on an 8×8 mask, 2×2 pixels per patch. The object covers
patches 5 and 6 fully and half of patch 9, so its area is A = 2.5 / 16. One layer, four heads, one
query position:
- head 0 (detector): 0.4 on patch 5, 0.4 on patch 6, 0.2 on patch 9;
- head 1 (object suppressor): 0.7 on patch 0, 0.3 spread over the 12 patches that are neither
  object nor patch 0;
- head 2 (outlier suppressor): nothing on patch 0, uniform 1/15 on the other 15 patches;
- head 3 (ordinary): 0.3 on patch 0, 0.2 on patches 5 and 6, 0.3 over the 12 other patches.
The layer average is 0.25 on patch 0, 1/6 on patches 5 and 6, 1/15 on patch 9 and 0.35/12 on the
12 others: the median is 0.35/12 and the MAD 0, so every patch above the median with at least
2 × uniform (0.125) is an outlier: patch 0, and patches 5 and 6 only when the mask is unknown.
"""

import math

import numpy as np
import pandas as pd
import pytest

from notice.method.head_functions import (
    AVERAGE_HEAD,
    HeadFunctionConfig,
    grounding_summary,
    head_function_scores,
    object_fraction,
    outlier_patches,
    query_labels,
    rest_entropy,
    robust_z,
    sample_scores,
)

CONFIG = HeadFunctionConfig()
AREA = 2.5 / 16
OTHERS = [1, 2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15]  # neither object nor patch 0


def scene_mask() -> np.ndarray:
    mask = np.zeros((8, 8))
    mask[2:4, 2:6] = 1.0  # patches 5 (row 1, col 1) and 6 (row 1, col 2)
    mask[4, 2:4] = 1.0  # top half of patch 9 (row 2, col 1)
    return mask


def scene_maps() -> np.ndarray:
    """[L=1, H=4, Q=1, P=16]"""
    maps = np.zeros((4, 16))
    maps[0, [5, 6, 9]] = [0.4, 0.4, 0.2]
    maps[1, 0], maps[1, OTHERS] = 0.7, 0.3 / 12
    maps[2, 1:] = 1 / 15
    maps[3, [0, 5, 6]], maps[3, OTHERS] = [0.3, 0.2, 0.2], 0.3 / 12
    return maps[None, :, None, :]


def entropy(p) -> float:
    p = np.asarray(p, dtype=float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def per_sample_table(maps: np.ndarray, mask: np.ndarray | None, sample_id: str = "s0") -> pd.DataFrame:
    frac = None if mask is None else object_fraction(mask, (4, 4))
    table, _ = sample_scores(maps, np.ones(maps.shape[:3]), [0], [0, 1, 2, 3], CONFIG, frac)
    return table.assign(
        sample_id=sample_id, model="m", site="cross_attn_head", query="<answer>", token="red", is_head_position=True
    )


def test_object_fraction_averages_pixels_per_patch():
    frac = object_fraction(scene_mask(), (4, 4))
    expected = np.zeros(16)
    expected[[5, 6, 9]] = [1.0, 1.0, 0.5]
    np.testing.assert_allclose(frac, expected)
    assert frac.mean() == pytest.approx(AREA)
    with pytest.raises(ValueError, match="does not tile"):
        object_fraction(np.zeros((9, 8)), (4, 4))


def test_robust_z_by_hand():
    # median 3, absolute deviations 2, 1, 0, 1, 97 -> MAD 1
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    np.testing.assert_allclose(z, np.array([-2, -1, 0, 1, 97]) / 1.4826)
    # MAD 0: anything above the median is infinitely far out
    np.testing.assert_array_equal(robust_z(np.array([1.0, 1.0, 1.0, 2.0])), [0, 0, 0, np.inf])


def test_outliers_are_high_non_object_patches():
    layer_mean = scene_maps()[0, :, 0].mean(0)
    assert layer_mean[0] == pytest.approx(0.25)
    frac = object_fraction(scene_mask(), (4, 4))
    assert np.flatnonzero(outlier_patches(layer_mean, CONFIG, frac)).tolist() == [0]
    assert np.flatnonzero(outlier_patches(layer_mean, CONFIG)).tolist() == [0, 5, 6]
    # a uniform map has no outliers, and neither does one whose peak is under 2 × uniform
    assert not outlier_patches(np.full(16, 1 / 16), CONFIG).any()
    flat_peak = np.full(16, 0.9 / 15)
    flat_peak[3] = 0.1
    assert not outlier_patches(flat_peak / flat_peak.sum(), CONFIG).any()


def test_rest_entropy_by_hand():
    keep = np.ones(16, bool)
    keep[0] = False
    weights = scene_maps()[0, :, 0]
    expected = [entropy([0.4, 0.4, 0.2]), math.log(12), math.log(15), entropy([0.2, 0.2] + [0.3 / 12] * 12)]
    np.testing.assert_allclose(rest_entropy(weights, keep), np.array(expected) / math.log(15))
    assert np.isnan(rest_entropy(np.eye(3)[0], np.array([True, False, False])))


def test_sample_scores_by_hand():
    table, outliers = sample_scores(
        scene_maps(), np.full((1, 4, 1), 0.5), [0], [0, 1, 2, 3], CONFIG, object_fraction(scene_mask(), (4, 4))
    )
    assert outliers.tolist() == [[p == 0 for p in range(16)]]
    assert table["head"].tolist() == [0, 1, 2, 3, AVERAGE_HEAD]
    object_attention = [0.4 + 0.4 + 0.5 * 0.2, 0.0, 2.5 / 15, 0.4]
    np.testing.assert_allclose(table["object_attention"], object_attention + [np.mean(object_attention)])
    np.testing.assert_allclose(table["object_ratio"], np.array(object_attention + [np.mean(object_attention)]) / AREA)
    np.testing.assert_allclose(table["outlier_attention"], [0.0, 0.7, 0.0, 0.3, 0.25])
    assert table["n_outliers"].tolist() == [1] * 5
    np.testing.assert_allclose(table["image_mass"], 0.5)


def test_scores_and_classes_with_mask():
    scores = head_function_scores(per_sample_table(scene_maps(), scene_mask()), ["model", "site"], CONFIG)
    heads = scores.set_index("head")
    detection = np.array([0.9, 0.0, 2.5 / 15, 0.4]) / AREA
    np.testing.assert_allclose(heads.loc[[0, 1, 2, 3], "detection_score"], detection)
    assert heads.loc[AVERAGE_HEAD, "detection_score"] == pytest.approx(detection.mean())
    np.testing.assert_allclose(heads.loc[[0, 1, 2, 3], "object_lift"], detection / detection.mean())
    np.testing.assert_allclose(heads.loc[[0, 1, 2, 3], "outlier_lift"], np.array([0.0, 0.7, 0.0, 0.3]) / 0.25)
    layer_mean = scene_maps()[0, :, 0].mean(0)
    average_rest = entropy(layer_mean[1:]) / math.log(15)
    assert heads.loc[2, "entropy_gain"] == pytest.approx(1.0 - average_rest)
    assert heads.loc[AVERAGE_HEAD, "entropy_gain"] == pytest.approx(0.0)
    assert heads["function"].to_dict() == {
        0: "object_detection",
        1: "object_suppression",
        2: "outlier_suppression",
        3: "none",
        AVERAGE_HEAD: "none",
    }
    assert heads["has_object_mask"].all()
    assert heads.loc[0, "label"] == "L0.H0" and heads.loc[AVERAGE_HEAD, "label"] == "L0.avg"


def test_without_mask_only_outlier_scores():
    scores = head_function_scores(per_sample_table(scene_maps(), None), ["model", "site"], CONFIG)
    heads = scores.set_index("head")
    assert not heads["has_object_mask"].any()
    assert heads["detection_score"].isna().all() and heads["object_lift"].isna().all()
    # without the mask, patches 0, 5 and 6 are outliers: outlier attention is the mass on all three
    u = np.array([0.8, 0.7, 2 / 15, 0.7])
    np.testing.assert_allclose(heads.loc[[0, 1, 2, 3], "outlier_lift"], u / u.mean())
    # The rest is the 13 patches other than 0, 5 and 6: head 2 is uniform there (normalised entropy 1),
    # and so, nearly, is the layer average (1/15 on patch 9, 0.35/12 on the 12 others), so head 2's
    # entropy gain is below the default margin 0.05 and it is no outlier suppressor here.
    rest = [1 / 15] + [0.35 / 12] * 12
    gain = 1.0 - entropy(rest) / math.log(13)
    assert heads.loc[2, "entropy_gain"] == pytest.approx(gain) and gain < CONFIG.entropy_margin
    assert heads["function"].to_dict() == {0: "none", 1: "none", 2: "none", 3: "none", AVERAGE_HEAD: "none"}
    lenient = HeadFunctionConfig.from_dict({"entropy_margin": gain / 2})
    scores = head_function_scores(per_sample_table(scene_maps(), None), ["model", "site"], lenient)
    assert scores.set_index("head").loc[2, "function"] == "outlier_suppression"


def test_scores_average_over_samples_and_thresholds_come_from_config():
    swapped = scene_maps()[:, [3, 1, 2, 0]]  # heads 0 and 3 exchanged
    per_sample = pd.concat(
        [per_sample_table(scene_maps(), scene_mask(), "s0"), per_sample_table(swapped, scene_mask(), "s1")]
    )
    scores = head_function_scores(per_sample, ["model", "site"], CONFIG).set_index("head")
    assert scores.loc[0, "detection_score"] == pytest.approx((0.9 + 0.4) / 2 / AREA)
    assert scores.loc[0, "n_samples"] == 2 and scores.loc[0, "n_masked"] == 2
    strict = HeadFunctionConfig.from_dict({"detection_threshold": 6.0, "unrelated_key": 1})
    single = head_function_scores(per_sample_table(scene_maps(), scene_mask()), ["model", "site"], strict)
    assert single.set_index("head").loc[0, "function"] == "none"  # 5.76 < 6


def test_query_labels():
    tokens = ["[CLS]", "is", "the", "object", "a", "circle", "or", "a", "square", "?", "[SEP]"]
    ids = list(range(len(tokens)))
    assert query_labels(ids, tokens, range(len(tokens)), answer_ids={5}, distractor_ids={8, 99}) == [
        "[CLS]",
        "is",
        "the",
        "object",
        "a",
        "<answer>",
        "or",
        "a#2",
        "<distractor>",
        "?",
        "<last>",
    ]


def test_grounding_summary_names_the_best_head():
    scores = head_function_scores(per_sample_table(scene_maps(), scene_mask()), ["model", "site"], CONFIG)
    summary = grounding_summary(scores, ["model", "site"]).iloc[0]
    assert summary["best_label"] == "L0.H0" and summary["best_query"] == "<answer>"
    assert summary["best_detection"] == pytest.approx(0.9 / AREA)
    assert summary["mean_detection"] == pytest.approx((0.9 + 0 + 2.5 / 15 + 0.4) / 4 / AREA)
    assert summary["best_detection_at_head_position"] == pytest.approx(0.9 / AREA)
    assert summary["n_detection_heads"] == 1 and summary["grounds_objects"]


def test_query_labels_know_an_option_as_generated_and_as_written():
    """A byte-level tokenizer spells the generated answer ("red", after a newline) apart from the question's
    " red": both are the option."""
    tokens = ["is", "Ġit", "Ġred", "Ġor", "Ġgreen", "?", "\n"]
    ids = [10, 11, 12, 13, 14, 15, 16]
    labels = query_labels(ids, tokens, range(len(ids)), answer_ids={7, 12}, distractor_ids={8, 14})
    assert labels == ["is", "Ġit", "<answer>", "Ġor", "<distractor>", "?", "<last>"]
