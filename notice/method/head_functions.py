"""Head functions scored from attention maps: object detection, object suppression, outlier suppression.

The paper judged head functions by eye (Figs 6, 7, 18, 19). Here they are numbers, computed from
the patch attention of `notice.method.attention` (rows renormalised over the image patches) and, where the
object's mask is known, the object's region on the patch grid. Pure functions on arrays / tidy tables.

Rules (thresholds in HeadFunctionConfig):
- Object region: o_p = fraction of patch p's pixels inside the mask; object area A = mean_p o_p.
- Outlier patches, per (sample, layer): from the layer's average attention over its heads and query
  positions, ā_p. Patch p is an outlier when its robust z-score (ā_p − median) / (1.4826 · MAD)
  exceeds `outlier_z`, ā_p is at least `outlier_min_ratio` × uniform (1/P), and, where the mask is
  known, the patch is not mostly object (o_p < `object_patch_fraction`: an outlier is an
  uninformative patch, "Vision transformers need registers"). Per sample, not over samples, because
  such patches sit at image-dependent positions (redundant background).
- Per (head, query position), averaged over samples:
  detection_score = Σ_p a_p o_p / A (object attention in multiples of uniform attention);
  outlier_attention = Σ_{p outlier} a_p; rest_entropy = entropy of a renormalised over the
  non-outlier patches, divided by log(their number) (1 = uniform over the rest).
  The layer's average head (head = -1: mean of the layer's heads' maps) is the reference:
  object_lift = detection_score / its detection_score, outlier_lift = outlier_attention / its
  outlier_attention, entropy_gain = rest_entropy − its rest_entropy.
- Function (first that applies):
  object_detection: detection_score ≥ detection_threshold and object_lift ≥ lift_threshold;
  object_suppression: object_lift ≤ 1 / lift_threshold and outlier_lift ≥ outlier_lift_threshold;
  outlier_suppression: outlier_lift ≤ 1 / outlier_lift_threshold and entropy_gain ≥ entropy_margin;
  otherwise "none". Object functions need a mask (`has_object_mask`); without one only outlier
  scores exist.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from notice.files.tables import check_columns
from notice.method.heads import head_label, token_label

AVERAGE_HEAD = -1  # `head` of the layer-average rows
FUNCTIONS: tuple[str, ...] = ("object_detection", "object_suppression", "outlier_suppression", "none")
ANSWER_QUERY, DISTRACTOR_QUERY, LAST_QUERY = "<answer>", "<distractor>", "<last>"
MAD_TO_STD = 1.4826  # MAD of a normal distribution × this = its standard deviation

SAMPLE_SCORE_COLUMNS: tuple[str, ...] = (
    "layer",
    "head",
    "query_index",
    "image_mass",
    "object_attention",
    "object_area",
    "object_ratio",
    "outlier_attention",
    "n_outliers",
    "rest_entropy",
)
SCORE_COLUMNS: tuple[str, ...] = (
    "layer",
    "head",
    "label",
    "query",
    "is_head_position",
    "n_samples",
    "n_masked",
    "has_object_mask",
    "image_mass",
    "object_area",
    "detection_score",
    "object_lift",
    "outlier_attention",
    "n_outliers",
    "outlier_lift",
    "rest_entropy",
    "entropy_gain",
    "function",
)

GROUNDING_COLUMNS: tuple[str, ...] = (
    "best_label",
    "best_query",
    "best_tokens",
    "best_detection",
    "best_object_lift",
    "best_function",
    "mean_detection",
    "mean_detection_at_best_query",
    "best_detection_at_head_position",
    "n_detection_heads",
    "grounds_objects",
)


@dataclass(frozen=True)
class HeadFunctionConfig:
    """Outlier rule and classification thresholds (config `analysis.head_functions`)."""

    outlier_z: float = 3.0
    outlier_min_ratio: float = 2.0
    object_patch_fraction: float = 0.5
    detection_threshold: float = 2.0
    lift_threshold: float = 1.5
    outlier_lift_threshold: float = 1.5
    entropy_margin: float = 0.05

    @classmethod
    def from_dict(cls, values: Mapping[str, float] | None) -> HeadFunctionConfig:
        """Only this class's fields; other keys of the config section are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in (values or {}).items() if k in names})


def object_fraction(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch's pixels inside the mask, [rows · cols] row-major.

    `mask` is [H, W] in [0, 1] at the model's input resolution, H and W multiples of the grid.
    """
    rows, cols = grid
    height, width = mask.shape
    if height % rows or width % cols:
        raise ValueError(f"mask {height}×{width} does not tile into a {rows}×{cols} patch grid")
    return mask.reshape(rows, height // rows, cols, width // cols).mean(axis=(1, 3)).ravel()


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x − median) / (1.4826 · MAD) along the last axis; with MAD 0, +inf above the median, else 0."""
    median = np.median(values, axis=-1, keepdims=True)
    mad = MAD_TO_STD * np.median(np.abs(values - median), axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (values - median) / mad
    return np.where(mad > 0, z, np.where(values > median, np.inf, 0.0))


def outlier_patches(
    layer_mean: np.ndarray, config: HeadFunctionConfig, object_frac: np.ndarray | None = None
) -> np.ndarray:
    """Boolean [..., P]: outliers of average attention maps [..., P] (each sums to 1); see module doc."""
    n_patches = layer_mean.shape[-1]
    outliers = (robust_z(layer_mean) > config.outlier_z) & (layer_mean >= config.outlier_min_ratio / n_patches)
    if object_frac is not None:
        outliers &= object_frac < config.object_patch_fraction
    return outliers


def rest_entropy(weights: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Entropy of `weights` [..., P] renormalised over the `keep` [..., P] patches, / log(#kept).

    NaN where fewer than two patches are kept or they get no attention.
    """
    kept = np.where(keep, weights, 0.0)
    total = kept.sum(-1, keepdims=True)
    n_kept = keep.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = kept / total
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
        return np.where((n_kept > 1) & (total[..., 0] > 0), entropy / np.log(n_kept), np.nan)


def sample_scores(
    weights: np.ndarray,
    mass: np.ndarray,
    layers: Sequence[int],
    heads: Sequence[int],
    config: HeadFunctionConfig,
    object_frac: np.ndarray | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Scores of one sample's heads and of each layer's average head, and the outlier patches.

    `weights` [L, H, Q, P] are renormalised patch attentions, `mass` [L, H, Q] their raw image mass,
    `heads` must be all of the layer's heads (the average head is their mean). Returns the tidy
    SAMPLE_SCORE_COLUMNS table (head = AVERAGE_HEAD for the average; object columns NaN without a
    mask) and the outliers [L, P].
    """
    n_layers, n_heads, n_queries, _ = weights.shape
    # the average head is one more head: the mean of the layer's maps
    maps = np.concatenate([weights, weights.mean(axis=1, keepdims=True)], axis=1)  # [L, H+1, Q, P]
    masses = np.concatenate([mass, mass.mean(axis=1, keepdims=True)], axis=1)  # [L, H+1, Q]
    outliers = outlier_patches(weights.mean(axis=(1, 2)), config, object_frac)  # [L, P]
    keep = np.broadcast_to(~outliers[:, None, None, :], maps.shape)
    area = float(object_frac.mean()) if object_frac is not None else 0.0
    if area > 0:
        object_attention = maps @ object_frac
    else:  # no mask, or the object is not in the model's view (cropped away)
        area, object_attention = np.nan, np.full(masses.shape, np.nan)
    table = pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(layers), (n_heads + 1) * n_queries),
            "head": np.tile(np.repeat(np.append(np.asarray(heads), AVERAGE_HEAD), n_queries), n_layers),
            "query_index": np.tile(np.arange(n_queries), n_layers * (n_heads + 1)),
            "image_mass": masses.ravel(),
            "object_attention": object_attention.ravel(),
            "object_area": area,
            "object_ratio": object_attention.ravel() / area,
            "outlier_attention": np.where(~keep, maps, 0.0).sum(-1).ravel(),
            "n_outliers": np.repeat(outliers.sum(-1), (n_heads + 1) * n_queries),
            "rest_entropy": rest_entropy(maps, keep).ravel(),
        }
    )
    return table, outliers


def query_labels(
    token_ids: Sequence[int],
    tokens: Sequence[str],
    positions: Sequence[int],
    answer_ids: Collection[int],
    distractor_ids: Collection[int],
) -> list[str]:
    """A label per query position that means the same thing across samples.

    The correct option's token (any of `answer_ids`: as generated, and as written in the question, which a
    byte-level tokenizer spells apart, "red" and "Ġred") is "<answer>", the incorrect one's "<distractor>", the
    last position of the prompt "<last>"; other tokens are their own text. A label's k-th repeat gets "#k" (the
    two "a" of "is the object a circle or a square?").
    """
    last = len(token_ids) - 1
    seen: dict[str, int] = {}
    labels = []
    for position in positions:
        token_id = token_ids[position]
        base = (
            ANSWER_QUERY
            if token_id in answer_ids
            else DISTRACTOR_QUERY
            if token_id in distractor_ids
            else LAST_QUERY
            if position == last
            else tokens[position]
        )
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def classify(scores: pd.DataFrame, config: HeadFunctionConfig) -> pd.Series:
    """The function of each row of aggregated scores (see module doc); NaN scores never qualify."""
    masked = scores["has_object_mask"].astype(bool)
    detection = (
        masked
        & (scores["detection_score"] >= config.detection_threshold)
        & (scores["object_lift"] >= config.lift_threshold)
    )
    object_suppression = (
        masked
        & (scores["object_lift"] <= 1 / config.lift_threshold)
        & (scores["outlier_lift"] >= config.outlier_lift_threshold)
    )
    outlier_suppression = (scores["outlier_lift"] <= 1 / config.outlier_lift_threshold) & (
        scores["entropy_gain"] >= config.entropy_margin
    )
    function = np.select([detection, object_suppression, outlier_suppression], list(FUNCTIONS[:3]), "none")
    return pd.Series(function, index=scores.index, name="function")


def head_function_scores(
    per_sample: pd.DataFrame, group_keys: Sequence[str], config: HeadFunctionConfig
) -> pd.DataFrame:
    """Aggregate per-sample scores to one row per (group_keys, layer, head, query) and classify.

    `per_sample` has SAMPLE_SCORE_COLUMNS plus `group_keys`, `query` (from `query_labels`),
    `sample_id`, `token` and `is_head_position` (the adapter's head-patching position: the answer
    token for cross-attention fusion, the last token for a decoder). Scores are means over the group's
    samples (object scores over the
    samples with a mask); lifts and entropy gain compare with the layer's average head of the same
    group and query; is_head_position holds for most of the query's samples.
    Columns: group_keys + SCORE_COLUMNS[:5] + tokens + the rest of SCORE_COLUMNS.
    """
    keys = list(group_keys)
    check_columns(
        per_sample,
        keys + list(SAMPLE_SCORE_COLUMNS) + ["query", "sample_id", "token", "is_head_position"],
        "per-sample scores",
    )
    by = keys + ["layer", "head", "query"]
    grouped = per_sample.groupby(by, sort=True)
    out = grouped.agg(
        n_samples=("sample_id", "nunique"),
        n_masked=("object_ratio", "count"),
        image_mass=("image_mass", "mean"),
        is_head_position=("is_head_position", "mean"),
        object_area=("object_area", "mean"),
        detection_score=("object_ratio", "mean"),
        outlier_attention=("outlier_attention", "mean"),
        n_outliers=("n_outliers", "mean"),
        rest_entropy=("rest_entropy", "mean"),
    ).reset_index()
    out["tokens"] = grouped["token"].agg(token_label).to_numpy()
    reference = out.loc[
        out["head"] == AVERAGE_HEAD, keys + ["layer", "query", "detection_score", "outlier_attention", "rest_entropy"]
    ]
    ref = out.merge(reference, on=keys + ["layer", "query"], how="left", suffixes=("", "_avg"))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["object_lift"] = (ref["detection_score"] / ref["detection_score_avg"]).to_numpy()
        out["outlier_lift"] = (ref["outlier_attention"] / ref["outlier_attention_avg"]).to_numpy()
    out["entropy_gain"] = (ref["rest_entropy"] - ref["rest_entropy_avg"]).to_numpy()
    out["is_head_position"] = out["is_head_position"] > 0.5
    out["has_object_mask"] = out["n_masked"] > 0
    out["label"] = [
        head_label(layer, head) if head != AVERAGE_HEAD else f"L{layer}.avg"
        for layer, head in zip(out["layer"], out["head"])
    ]
    out["function"] = classify(out, config)
    columns = keys + list(SCORE_COLUMNS[:5]) + ["tokens"] + list(SCORE_COLUMNS[5:])
    return out[columns]


def grounding_summary(scores: pd.DataFrame, group_keys: Sequence[str]) -> pd.DataFrame:
    """Does this fusion attention ground objects? Per group with object masks, its best head.

    `scores` is `head_function_scores` output. Per group of `group_keys` (e.g. model, site,
    dataset, task): the head and query with the highest detection_score (best_*), the mean
    detection_score over all heads and queries (mean_detection) and over the heads at the best query
    (mean_detection_at_best_query), the best detection_score at the head-patching position (the
    paper's query: the adapter's head position), and how many heads are object detectors
    at some query (n_detection_heads; grounds_objects = at least one).
    """
    keys = list(group_keys)
    heads = scores[(scores["head"] != AVERAGE_HEAD) & scores["has_object_mask"]]
    rows = []
    for group, df in heads.groupby(keys, sort=True):
        best = df.loc[df["detection_score"].idxmax()]
        detectors = df.loc[df["function"] == "object_detection", ["layer", "head"]].drop_duplicates()
        rows.append(
            {
                **dict(zip(keys, group)),
                "best_label": best["label"],
                "best_query": best["query"],
                "best_tokens": best["tokens"],
                "best_detection": best["detection_score"],
                "best_object_lift": best["object_lift"],
                "best_function": best["function"],
                "mean_detection": df["detection_score"].mean(),
                "mean_detection_at_best_query": df.loc[df["query"] == best["query"], "detection_score"].mean(),
                "best_detection_at_head_position": df.loc[df["is_head_position"], "detection_score"].max(),
                "n_detection_heads": len(detectors),
                "grounds_objects": len(detectors) > 0,
            }
        )
    return pd.DataFrame(rows, columns=keys + list(GROUNDING_COLUMNS))


def record_scores(record: Mapping, config: HeadFunctionConfig, labels: Mapping[str, str]) -> pd.DataFrame:
    """Per-sample scores of one attention record (`notice.method.attention.attention_record`).

    Adds what `head_function_scores` needs: sample_id, task, query (label), token, is_head_position,
    and the constant `labels` columns (e.g. model, site, dataset). Object scores need the record's mask.
    """
    mask = np.asarray(record["mask"])
    rows, cols = (int(g) for g in record["grid"])
    frac = object_fraction(mask, (rows, cols)) if mask.size else None
    table, _ = sample_scores(
        np.asarray(record["weights"]),
        np.asarray(record["mass"]),
        list(record["layers"]),
        list(record["heads"]),
        config,
        frac,
    )
    query = table["query_index"].to_numpy()
    return table.assign(
        sample_id=str(record["sample_id"]),
        task=str(record["task"]),
        query=np.asarray(record["query_labels"])[query],
        token=np.asarray(record["query_tokens"])[query],
        is_head_position=query == int(record["head_query_index"]),
        **labels,
    )


def scores_from_records(
    records_by_group: Mapping[tuple, Sequence[Mapping]], group_keys: Sequence[str], config: HeadFunctionConfig
) -> pd.DataFrame:
    """`head_function_scores` over records grouped as {group key values: records}.

    No records (a model that answered no sample correctly has none) give an empty table with the columns.
    """
    per_sample = [
        record_scores(record, config, dict(zip(group_keys, group)))
        for group, records in records_by_group.items()
        for record in records
    ]
    if not per_sample:
        return pd.DataFrame(columns=list(group_keys) + list(SCORE_COLUMNS[:5]) + ["tokens"] + list(SCORE_COLUMNS[5:]))
    return head_function_scores(pd.concat(per_sample, ignore_index=True), group_keys, config)


def universal_head_functions(scores: pd.DataFrame, universal: pd.DataFrame) -> pd.DataFrame:
    """Each universal head's scores at the head-patching position (the paper's query), per dataset.

    `universal` has model, site, layer, head, kind (one row per head or per condition). Columns:
    model, site, dataset, layer, head, label, kind, function and the scores; universal heads
    without attention records (another model, no dataset) do not appear.
    """
    check_columns(scores, ["model", "site", "dataset", "layer", "head", "is_head_position"], "head function scores")
    check_columns(universal, ["model", "site", "layer", "head", "kind"], "universal heads")
    heads = universal[["model", "site", "layer", "head", "kind"]].drop_duplicates()
    at_head = scores[scores["is_head_position"] & (scores["head"] != AVERAGE_HEAD)]
    merged = heads.merge(at_head, on=["model", "site", "layer", "head"], how="inner")
    columns = [
        "model",
        "site",
        "dataset",
        "layer",
        "head",
        "label",
        "kind",
        "function",
        "query",
        "tokens",
        "n_samples",
        "has_object_mask",
        "detection_score",
        "object_lift",
        "outlier_attention",
        "outlier_lift",
        "entropy_gain",
    ]
    return merged[columns].sort_values(["model", "site", "dataset", "layer", "head"]).reset_index(drop=True)


def function_table(functions: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 3: per (model, site, function), the universal heads with that function per dataset.

    `functions` is `universal_head_functions` output. Cells list head labels ("" when none); every
    function of FUNCTIONS gets a row, so an absent function is visible as such.
    """
    check_columns(functions, ["model", "site", "dataset", "label", "function"], "universal head functions")
    rows = []
    for (model, site), df in functions.groupby(["model", "site"], sort=True):
        datasets = sorted(df["dataset"].unique())
        for function in FUNCTIONS:
            cells = {
                d: ", ".join(df.loc[(df["dataset"] == d) & (df["function"] == function), "label"]) for d in datasets
            }
            rows.append({"model": model, "site": site, "function": function, **cells})
    return pd.DataFrame(rows)
