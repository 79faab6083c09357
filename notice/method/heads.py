"""Head statistics from the results table: effects, two-sigma selection, universal heads, bootstrap.

All functions are pure: they take tidy DataFrames (RESULT_COLUMNS or the outputs below) and return
new ones. A "condition" is one (model, task, corruption, modality, site): head means are compared
only with the other heads of the same condition, so self- and cross-attention heads, and different
corruptions of one modality (SIP vs Gaussian noise), are never mixed.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Collection, Hashable, Sequence

import numpy as np
import pandas as pd

from notice.files.tables import check_columns
from notice.method.precision import AUDITED_METRIC, mark_below_precision

HEAD_SITES: tuple[str, ...] = ("self_attn_head", "cross_attn_head")
MODULE_SITES: tuple[str, ...] = ("mlp", "self_attn", "cross_attn", "layer")
CONDITION_KEYS: tuple[str, ...] = ("model", "task", "corruption", "modality", "site")
HEAD_KEYS: tuple[str, ...] = CONDITION_KEYS + ("layer", "head")
MODULE_KEYS: tuple[str, ...] = CONDITION_KEYS + ("layer", "position")
UNIVERSAL_KEYS: tuple[str, ...] = ("model", "site", "layer", "head")
# "vision" and "text" mean vision-only and text-only: a head universal under both is "multimodal".
KINDS: tuple[str, ...] = ("vision", "text", "multimodal")
# Population std (numpy's default, ddof=0) over the heads of a condition: the heads are the whole
# population being screened, not a sample of one.
THRESHOLD_DDOF = 0
MAX_TOKEN_LABELS = 3
# The defaults of the config's `analysis.metric` and `analysis.k_sigma` (the schema's), for callers outside the
# workflow; the workflow passes the config's values.
DEFAULT_METRIC = "logit_diff"
DEFAULT_K_SIGMA = 2.0
DEFAULT_UNIVERSAL_CORRUPTIONS: tuple[str, ...] = ("sip", "str")  # the paper's semantic corruptions


def head_label(layer: int, head: int) -> str:
    """The paper's notation for a head, e.g. L3.H0."""
    return f"L{int(layer)}.H{int(head)}"


def _per_sample(results_df: pd.DataFrame, keys: Sequence[str], sites: Sequence[str], metric: str) -> pd.DataFrame:
    """Mean of `metric` per (keys, sample_id) over the rows of `sites`.

    Averaging per sample first gives each sample equal weight when a corruption has several noise
    draws per sample (possibly a different number per sample).
    """
    check_columns(results_df, list(keys) + ["sample_id", "site", metric], "results table")
    rows = results_df[results_df["site"].isin(sites)]
    return (
        rows.groupby(list(keys) + ["sample_id"], sort=True, observed=True)[metric].mean().rename("value").reset_index()
    )


def head_effects(results_df: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Per head and condition: mean, std (over samples, ddof=1) and n (samples) of `metric`.

    Columns: model, task, corruption, modality, site, layer, head, metric, mean, std, n.
    The patched position is ignored: it may differ between samples (e.g. an answer-token head position).
    """
    per_sample = _per_sample(results_df, HEAD_KEYS, HEAD_SITES, metric)
    stats = per_sample.groupby(list(HEAD_KEYS), sort=True)["value"].agg(["mean", "std", "count"])
    out = stats.rename(columns={"count": "n"}).reset_index()
    out.insert(len(HEAD_KEYS), "metric", metric)
    return out


def _threshold(means: np.ndarray, k: float) -> np.ndarray:
    """Mean + k·std over the last axis (one threshold per row of head means)."""
    return means.mean(axis=-1) + k * means.std(axis=-1, ddof=THRESHOLD_DDOF)


def significant_heads(effects_df: pd.DataFrame, k: float = DEFAULT_K_SIGMA) -> pd.DataFrame:
    """Add `threshold` and `significant` (mean > mean over the condition's heads + k·std) to every head.

    std is the population std over the condition's head means (ddof=0, numpy's default). Where the effects
    have `below_precision` (a half-precision run's, `mark_precision`), a head below precision is never
    significant.
    """
    check_columns(effects_df, list(HEAD_KEYS) + ["mean"], "head effects")
    out = effects_df.copy()
    out["threshold"] = out.groupby(list(CONDITION_KEYS), sort=False)["mean"].transform(
        lambda m: float(_threshold(m.to_numpy(dtype=float), k))
    )
    out["significant"] = out["mean"] > out["threshold"]
    if "below_precision" in out:
        out["significant"] &= ~out["below_precision"].astype(bool)
    return out


def mark_precision(
    effects_df: pd.DataFrame,
    results_df: pd.DataFrame,
    floors: pd.DataFrame,
    keys: Sequence[str],
    sites: Sequence[str],
    metric: str = DEFAULT_METRIC,
) -> pd.DataFrame:
    """Head or module effects of `metric` (`head_effects`: HEAD_KEYS, HEAD_SITES; `module_effects`: MODULE_KEYS,
    MODULE_SITES) with `below_precision`: the row's mean logit_diff effect is not above its condition's
    precision floor (`notice.method.precision.precision_floors`). The audit measures logit_diff, so with
    another metric the row's mean logit_diff is computed from `results_df`, as its mean is."""
    if metric == AUDITED_METRIC:
        return mark_below_precision(effects_df, floors, "mean")
    audited = _per_sample(results_df, keys, sites, AUDITED_METRIC).groupby(list(keys), sort=False)["value"].mean()
    with_audited = effects_df.merge(audited.rename("audited_mean").reset_index(), on=list(keys), how="left")
    return mark_below_precision(with_audited, floors, "audited_mean").drop(columns="audited_mean")


def _only(df: pd.DataFrame, corruptions: Collection[str] | None) -> pd.DataFrame:
    return df if corruptions is None else df[df["corruption"].isin(list(corruptions))]


def universal_heads(significant_df: pd.DataFrame, corruptions: Collection[str] | None = None) -> pd.DataFrame:
    """Heads significant in every condition of a modality, per (model, site).

    Every (task, corruption) present for that model, site and modality must have the head
    significant. `corruptions` restricts which corruptions count (the paper: SIP and STR, not
    Gaussian noise); None counts all present. Columns: model, site, layer, head, kind.
    """
    check_columns(significant_df, list(HEAD_KEYS) + ["significant"], "significant heads")
    sig = _only(significant_df, corruptions)
    cond, keys = ["model", "site", "modality"], list(UNIVERSAL_KEYS)
    n_conditions = sig.drop_duplicates(cond + ["task", "corruption"]).groupby(cond).size().rename("n_conditions")
    counts = sig.groupby(cond + ["layer", "head"])["significant"].sum().rename("n_significant").reset_index()
    counts = counts.merge(n_conditions.reset_index(), on=cond)
    universal = counts[counts["n_significant"] == counts["n_conditions"]]
    image = universal.loc[universal["modality"] == "image", keys]
    text = universal.loc[universal["modality"] == "text", keys]
    both = image.merge(text, on=keys, how="outer", indicator=True)
    kind = both["_merge"].astype(str).map({"both": "multimodal", "left_only": "vision", "right_only": "text"})
    return both[keys].assign(kind=kind).sort_values(keys).reset_index(drop=True)


def bootstrap_indices(seed: int, condition: Sequence[Hashable], n_samples: int, n_draws: int) -> np.ndarray:
    """Resampled sample indices, shape (n_draws, n_samples), for one condition.

    The generator is seeded from `seed` and the condition's key, so a condition's draws do not
    change when other models, tasks or corruptions are added to the table.
    """
    key = zlib.crc32("\x1f".join(map(str, condition)).encode())
    return np.random.default_rng([seed, key]).integers(0, n_samples, size=(n_draws, n_samples))


def _resampled_means(matrix: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Head means per draw, shape (n_draws, n_heads), from a samples × heads matrix."""
    n_draws, n = idx.shape
    flat = (np.arange(n_draws)[:, None] * n + idx).ravel()
    counts = np.bincount(flat, minlength=n_draws * n).reshape(n_draws, n)
    return counts @ matrix / n  # a count matrix avoids materialising draws × samples × heads


def bootstrap_heads(
    results_df: pd.DataFrame,
    n_draws: int,
    seed: int = 0,
    k: float = DEFAULT_K_SIGMA,
    metric: str = DEFAULT_METRIC,
    corruptions: Collection[str] | None = None,
    floors: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Resample samples with replacement per condition and redo the selection in every draw.

    One row per (model, task, corruption, modality, site, layer, head) with:
    frac_significant (fraction of draws where the head passes the k-sigma threshold in this
    condition), ci_low / ci_high (2.5 / 97.5 percentiles of its resampled mean), and, per
    (model, site, layer, head), frac_universal_vision / _text / _multimodal (fraction of draws in
    which it is universal of that kind, using `corruptions` as in `universal_heads`),
    frac_universal (any kind) and n_draws. With the precision `floors` of a half-precision run
    (`notice.method.precision.precision_floors`), a head is significant in a draw only if its resampled
    mean logit_diff is also above its condition's floor, as in `significant_heads` after `mark_precision`.
    """
    per_sample = _per_sample(results_df, HEAD_KEYS, HEAD_SITES, metric)
    floor_of = {} if floors is None else _floors_by_condition(floors)
    # The per-sample logit_diff by condition, where the metric is another (None: the metric's own values).
    audited: dict[tuple, pd.DataFrame] | None = None
    if floor_of and metric != AUDITED_METRIC:
        audited_rows = _per_sample(results_df, HEAD_KEYS, HEAD_SITES, AUDITED_METRIC)
        audited = dict(iter(audited_rows.groupby(list(CONDITION_KEYS), sort=True)))
    rows: list[pd.DataFrame] = []
    # (model, site) -> modality -> list of (heads, significance per draw)
    by_model: dict[tuple, dict[str, list[tuple[pd.MultiIndex, np.ndarray]]]] = {}
    selected = None if corruptions is None else set(corruptions)
    for condition, group in per_sample.groupby(list(CONDITION_KEYS), sort=True):
        matrix = _head_matrix(group)
        if matrix.isna().to_numpy().any():
            raise ValueError(f"bootstrap: condition {condition} lacks some heads for some samples")
        idx = bootstrap_indices(seed, condition, len(matrix), n_draws)
        means = _resampled_means(matrix.to_numpy(dtype=float), idx)
        sig = means > _threshold(means, k)[:, None]
        model, task, corruption, modality, site = condition
        floor = floor_of.get((model, task, corruption, site))
        if floor is not None:
            if audited is not None:
                ld = _head_matrix(audited[condition]).reindex(index=matrix.index, columns=matrix.columns)
                means_ld = _resampled_means(ld.to_numpy(dtype=float), idx)
            else:
                means_ld = means
            sig &= np.abs(means_ld) > floor
        low, high = np.percentile(means, [2.5, 97.5], axis=0)
        frame = pd.DataFrame(
            {"frac_significant": sig.mean(axis=0), "ci_low": low, "ci_high": high}, index=matrix.columns
        ).reset_index()
        rows.append(frame.assign(**dict(zip(CONDITION_KEYS, condition))))
        if selected is None or corruption in selected:
            by_model.setdefault((model, site), {}).setdefault(modality, []).append((matrix.columns, sig))
    if not rows:
        raise ValueError("bootstrap: the results table has no head rows")
    out = pd.concat(rows, ignore_index=True)
    universal = pd.concat([_universal_fractions(key, mods, n_draws) for key, mods in by_model.items()])
    out = out.merge(universal, on=list(UNIVERSAL_KEYS), how="left")
    fractions = [f"frac_universal_{kind}" for kind in KINDS] + ["frac_universal"]
    out[fractions] = out[fractions].fillna(0.0)
    out["n_draws"] = n_draws
    return out[list(HEAD_KEYS) + ["frac_significant", "ci_low", "ci_high"] + fractions + ["n_draws"]]


def _floors_by_condition(floors: pd.DataFrame) -> dict[tuple, float]:
    check_columns(floors, ["model", "task", "corruption", "site", "floor"], "precision floors")
    keys = zip(floors["model"], floors["task"], floors["corruption"], floors["site"])
    return dict(zip(keys, floors["floor"].astype(float)))


def _head_matrix(per_sample: pd.DataFrame) -> pd.DataFrame:
    """One condition's per-sample values as a samples × (layer, head) matrix."""
    return per_sample.pivot(index="sample_id", columns=["layer", "head"], values="value").sort_index(axis=1)


def _universal_fractions(
    key: tuple, by_modality: dict[str, list[tuple[pd.MultiIndex, np.ndarray]]], n_draws: int
) -> pd.DataFrame:
    """Per head of one (model, site): fraction of draws in which it is universal of each kind."""
    heads = pd.MultiIndex.from_tuples(
        sorted({h for conditions in by_modality.values() for cols, _ in conditions for h in cols}),
        names=["layer", "head"],
    )

    def all_conditions(modality: str) -> np.ndarray:
        # a modality with no condition contributes no universal head
        result = np.zeros((n_draws, len(heads)), dtype=bool)
        conditions = by_modality.get(modality, [])
        if conditions:
            result[:] = True
        for cols, sig in conditions:
            aligned = np.zeros_like(result)
            aligned[:, heads.get_indexer(cols)] = sig
            result &= aligned
        return result

    image, text = all_conditions("image"), all_conditions("text")
    kinds = {"vision": image & ~text, "text": text & ~image, "multimodal": image & text}
    frame = pd.DataFrame({f"frac_universal_{kind}": flags.mean(axis=0) for kind, flags in kinds.items()}, index=heads)
    frame["frac_universal"] = (image | text).mean(axis=0)
    return frame.reset_index().assign(model=key[0], site=key[1])


def universal_heads_table(
    significant_df: pd.DataFrame,
    universal_df: pd.DataFrame,
    bootstrap_df: pd.DataFrame,
    min_frac_universal: float = 0.5,
) -> pd.DataFrame:
    """The universal heads with their per-condition effects and bootstrap stability, long format.

    Rows: every head universal on the full data (kind = its kind) plus every head universal (any
    kind) in at least `min_frac_universal` of the bootstrap draws but not on the full data
    (kind = "none"), once per condition. Columns: model, site, layer, head, label, kind, task,
    corruption, modality, metric, mean, std, n, threshold, significant, below_precision (only where
    `significant_df` has it: a half-precision run's), frac_significant, ci_low, ci_high,
    frac_universal_vision / _text / _multimodal, frac_universal, frac_universal_kind (the fraction
    for the head's own kind; NaN for "none"), n_draws.
    """
    check_columns(universal_df, list(UNIVERSAL_KEYS) + ["kind"], "universal heads")
    check_columns(significant_df, list(HEAD_KEYS) + ["metric", "mean", "threshold", "significant"], "significant heads")
    keys = list(UNIVERSAL_KEYS)
    frequent = bootstrap_df.loc[bootstrap_df["frac_universal"] >= min_frac_universal, keys].drop_duplicates()
    heads = frequent.merge(universal_df[keys + ["kind"]], on=keys, how="outer")
    heads["kind"] = heads["kind"].fillna("none")
    merged = heads.merge(significant_df, on=keys, how="left").merge(bootstrap_df, on=list(HEAD_KEYS), how="left")
    own = np.full(len(merged), np.nan)
    for kind in KINDS:
        mask = (merged["kind"] == kind).to_numpy()
        own[mask] = merged.loc[mask, f"frac_universal_{kind}"]
    merged["frac_universal_kind"] = own
    merged["label"] = [head_label(layer, head) for layer, head in zip(merged["layer"], merged["head"])]
    rank = {kind: i for i, kind in enumerate(KINDS + ("none",))}
    order = ["model", "site", "kind", "layer", "head", "task", "corruption", "modality"]
    merged = merged.sort_values(order, key=lambda s: s.map(rank) if s.name == "kind" else s).reset_index(drop=True)
    columns = keys[:4] + [
        "label",
        "kind",
        "task",
        "corruption",
        "modality",
        "metric",
        "mean",
        "std",
        "n",
        "threshold",
        "significant",
        *(["below_precision"] if "below_precision" in significant_df else []),
        "frac_significant",
        "ci_low",
        "ci_high",
    ]
    columns += [f"frac_universal_{kind}" for kind in KINDS] + ["frac_universal", "frac_universal_kind", "n_draws"]
    return merged[columns]


def token_label(tokens: Sequence[str], max_tokens: int = MAX_TOKEN_LABELS) -> str:
    """Label of one position across samples: its tokens, most common first, joined by "/".

    More than `max_tokens` distinct tokens are cut to the first `max_tokens` followed by "/…".
    """
    ranked = sorted(Counter(map(str, tokens)).items(), key=lambda item: (-item[1], item[0]))
    names = [name for name, _ in ranked]
    return "/".join(names[:max_tokens]) + ("/…" if len(names) > max_tokens else "")


def module_effects(results_df: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Mean of `metric` per (model, task, corruption, modality, site, layer, position) over samples.

    Module sites only (mlp, self_attn, cross_attn, layer). Positions are aligned by index; `token`
    labels each position with the tokens found there (see `token_label`).
    Columns: model, task, corruption, modality, site, layer, position, token, metric, mean, n.
    """
    check_columns(results_df, ["token"], "results table")
    per_sample = _per_sample(results_df, MODULE_KEYS, MODULE_SITES, metric)
    rows = results_df[results_df["site"].isin(MODULE_SITES)]
    # one token per (sample, position), whatever the number of noise draws
    tokens = rows.drop_duplicates(["model", "task", "corruption", "modality", "sample_id", "position"])
    labels = (
        tokens.groupby(["model", "task", "corruption", "modality", "position"], sort=True)["token"]
        .agg(token_label)
        .reset_index()
    )
    stats = per_sample.groupby(list(MODULE_KEYS), sort=True)["value"].agg(["mean", "count"]).reset_index()
    out = stats.rename(columns={"count": "n"}).merge(
        labels, on=["model", "task", "corruption", "modality", "position"], how="left"
    )
    out["metric"] = metric
    return out[list(MODULE_KEYS) + ["token", "metric", "mean", "n"]]


KIND_MODALITIES: dict[str, tuple[str, ...]] = {
    "vision": ("image",),
    "text": ("text",),
    "multimodal": ("image", "text"),
    "none": ("image", "text"),
}


def universal_heads_summary(universal_table: pd.DataFrame, corruptions: Collection[str] | None = None) -> pd.DataFrame:
    """Paper Table 1 with stability: one row per head of `universal_heads_table`.

    The conditions that define a head's kind are those of its modalities (vision: image, text: text,
    multimodal and "none": both) whose corruption counts for universality (`corruptions`; None: all).
    Over them: frac_significant_min (the least stable condition), mean_effect (mean of the condition
    means), ci_low_min / ci_high_max (widest bounds of the 95% intervals), and `conditions`, one
    "task/corruption: mean [low, high], significant in x%" per condition. frac_universal is the
    fraction of resamples in which the head is universal of its own kind (any kind for "none").
    """
    check_columns(
        universal_table,
        [
            "model",
            "site",
            "layer",
            "head",
            "label",
            "kind",
            "task",
            "corruption",
            "modality",
            "mean",
            "frac_significant",
            "ci_low",
            "ci_high",
            "frac_universal",
            "frac_universal_kind",
            "n_draws",
        ],
        "universal heads table",
    )
    rows = []
    for (model, site, layer, head), df in universal_table.groupby(list(UNIVERSAL_KEYS), sort=True):
        kind = df["kind"].iloc[0]
        own = _only(df[df["modality"].isin(KIND_MODALITIES[kind])], corruptions).sort_values(
            ["modality", "task", "corruption"]
        )
        frac = df["frac_universal_kind"].iloc[0]
        rows.append(
            {
                "model": model,
                "site": site,
                "layer": layer,
                "head": head,
                "label": head_label(layer, head),
                "kind": kind,
                "frac_universal": df["frac_universal"].iloc[0] if pd.isna(frac) else frac,
                "frac_significant_min": own["frac_significant"].min(),
                "mean_effect": own["mean"].mean(),
                "ci_low_min": own["ci_low"].min(),
                "ci_high_max": own["ci_high"].max(),
                "n_conditions": len(own),
                "n_draws": int(df["n_draws"].iloc[0]),
                "conditions": "; ".join(
                    f"{r.task}/{r.corruption}: {r.mean:.3g} [{r.ci_low:.3g}, {r.ci_high:.3g}], "
                    f"significant in {r.frac_significant:.0%}"
                    for r in own.itertuples()
                ),
            }
        )
    rank = {kind: i for i, kind in enumerate(KINDS + ("none",))}
    out = pd.DataFrame(
        rows,
        columns=[
            "model",
            "site",
            "layer",
            "head",
            "label",
            "kind",
            "frac_universal",
            "frac_significant_min",
            "mean_effect",
            "ci_low_min",
            "ci_high_max",
            "n_conditions",
            "n_draws",
            "conditions",
        ],
    )
    return out.sort_values(
        ["model", "site", "kind", "layer", "head"], key=lambda s: s.map(rank) if s.name == "kind" else s
    ).reset_index(drop=True)


def universal_heads_by_kind(summary: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 1's layout: one row per (model, site), the head labels of each kind in a column."""
    check_columns(summary, ["model", "site", "label", "kind"], "universal heads summary")
    rows = []
    for (model, site), df in summary.groupby(["model", "site"], sort=True):
        rows.append(
            {
                "model": model,
                "site": site,
                **{f"{kind} heads": ", ".join(df.loc[df["kind"] == kind, "label"]) for kind in KINDS},
            }
        )
    return pd.DataFrame(rows, columns=["model", "site"] + [f"{kind} heads" for kind in KINDS])
