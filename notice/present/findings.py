"""The report's written findings: universal heads, clean accuracy, and what the heads do (object grounding)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from notice.files.tables import check_columns
from notice.method.head_functions import HeadFunctionConfig
from notice.method.heads import DEFAULT_K_SIGMA, DEFAULT_UNIVERSAL_CORRUPTIONS, KINDS, head_label
from notice.present.accuracy import TOTAL_CATEGORIES
from notice.present.charts import SITE_TITLES
from notice.present.page import escape


def _conditions(df: pd.DataFrame, modality: str) -> str:
    rows = df[df["modality"] == modality].drop_duplicates(["task", "corruption"]).sort_values(["task", "corruption"])
    return ", ".join(f"{t} ({c})" for t, c in zip(rows["task"], rows["corruption"])) or "none"


def _head_phrase(head: pd.Series) -> str:
    n_draws = int(head["n_draws"])
    if head["kind"] in KINDS:
        return f"{head['label']} ({head['kind']} in {head['frac_universal_kind']:.0%} of {n_draws} resamples)"
    return f"{head['label']} (universal in {head['frac_universal']:.0%} of {n_draws} resamples)"


def _significant_note(significant: pd.DataFrame | None, model: str, corruptions: Sequence[str]) -> str:
    """Why a model has no universal head: its significant heads in each defining (task, corruption)."""
    if significant is None:
        return ""
    sig = significant[(significant["model"] == model) & significant["corruption"].isin(list(corruptions))]
    several_sites = sig["site"].nunique() > 1
    parts = []
    for (site, task, corruption), group in sig.groupby(["site", "task", "corruption"], sort=True):
        heads = group[group["significant"].astype(bool)].sort_values(
            ["mean", "layer", "head"], ascending=[False, True, True]
        )
        names = ", ".join(head_label(layer, head) for layer, head in zip(heads["layer"], heads["head"])) or "none"
        where = f"{SITE_TITLES.get(site, site)}, " if several_sites else ""
        parts.append(f"{where}{task} ({corruption}): {names}")
    if not parts:
        return ""
    return "<br><small>" + escape("Significant heads per condition: " + "; ".join(parts) + ".") + "</small>"


def _universal_summary(
    universal_table: pd.DataFrame, models: Sequence[str], significant: pd.DataFrame | None, corruptions: Sequence[str]
) -> list[str]:
    items = []
    for model in sorted(set(models) | set(universal_table["model"])):
        df = universal_table[universal_table["model"] == model]
        if df.empty:
            note = _significant_note(significant, model, corruptions)
            items.append(f"<li><b>{escape(model)}</b>: no universal heads.{note}</li>")
            continue
        for site, sub in df.groupby("site", sort=True):
            heads = sub.drop_duplicates("label")
            kinds = []
            for kind in KINDS:
                chosen = heads[heads["kind"] == kind]
                names = "; ".join(_head_phrase(h) for _, h in chosen.iterrows()) or "none"
                kinds.append(f"{kind}: {names}")
            candidates = heads[heads["kind"] == "none"]
            extra = (
                "<br>"
                + escape(
                    "Not universal on the full data but often under resampling: "
                    + "; ".join(_head_phrase(h) for _, h in candidates.iterrows())
                )
                if len(candidates)
                else ""
            )
            items.append(
                f"<li><b>{escape(model)}</b>, {escape(SITE_TITLES.get(site, site))}: "
                + escape(". ".join(kinds))
                + "."
                + extra
                + f"<br><small>Conditions: image corruption: {escape(_conditions(sub, 'image'))}; "
                f"text corruption: {escape(_conditions(sub, 'text'))}.</small></li>"
            )
    return items


def _accuracy_summary(accuracy_df: pd.DataFrame) -> list[str]:
    groups = accuracy_df.groupby("model", sort=True) if "model" in accuracy_df else [("", accuracy_df)]
    items = []
    for model, df in groups:
        parts = []
        for task, sub in df.groupby("task", sort=True):
            is_total = sub["category"].isin(TOTAL_CATEGORIES)
            total, categories = sub[is_total], sub[~is_total].sort_values(["accuracy", "category"])
            phrase = task
            if len(total):
                t = total.iloc[0]
                phrase += f" {t['accuracy']:.1%} ({int(t['n_correct'])}/{int(t['n'])})"
            if len(categories):
                low = categories.iloc[0]
                phrase += f", lowest category {low['category']} {low['accuracy']:.1%}"
            parts.append(phrase)
        prefix = f"{model}: " if model else ""
        items.append(f"<li>{escape(prefix + '; '.join(parts))}.</li>")
    return items


def summarise_findings(
    universal_table: pd.DataFrame,
    accuracy_df: pd.DataFrame,
    models: Sequence[str] = (),
    k: float = DEFAULT_K_SIGMA,
    significant: pd.DataFrame | None = None,
    corruptions: Sequence[str] = DEFAULT_UNIVERSAL_CORRUPTIONS,
) -> str:
    """An HTML fragment summarising the universal heads (with bootstrap stability) and the accuracy.

    `universal_table` is `notice.method.heads.universal_heads_table`'s output; `accuracy_df` has columns
    task, category, n, n_correct, accuracy (category "all" or "(all)" = task total), optionally model.
    `models` names models to mention even when they have no universal head; `k` is the selection's
    number of standard deviations, for the text. With `significant` (`notice.method.heads.significant_heads`'
    output), a model without universal heads is shown its significant heads per task under each of the
    `corruptions` that define universal heads, so the reader sees why.
    """
    check_columns(
        universal_table,
        [
            "model",
            "site",
            "label",
            "kind",
            "task",
            "corruption",
            "modality",
            "frac_universal",
            "frac_universal_kind",
            "n_draws",
        ],
        "universal heads table",
    )
    check_columns(accuracy_df, ["task", "category", "n", "n_correct", "accuracy"], "accuracy table")
    if significant is not None:
        check_columns(
            significant,
            ["model", "site", "layer", "head", "task", "corruption", "mean", "significant"],
            "significant heads table",
        )
    heads = _universal_summary(universal_table, models, significant, corruptions) or [
        "<li>No universal heads found.</li>"
    ]
    accuracy = _accuracy_summary(accuracy_df) or ["<li>No accuracy rows.</li>"]
    return (
        '<div class="summary"><h3>Universal heads</h3>'
        "<p>A head is significant for a task and corruption when its mean effect exceeds the mean over all "
        f"heads by {k:g} standard deviations; universal when significant for every task under image "
        "corruption (vision), text corruption (text) or both (multimodal). Percentages: how often the "
        "same holds when the samples are resampled with replacement.</p>"
        f"<ul>{''.join(heads)}</ul><h3>Clean accuracy per task</h3><ul>{''.join(accuracy)}</ul></div>"
    )


def _times(value: float) -> str:
    return f"{value:.1f}×" if pd.notna(value) else "n/a"


def _grounding_item(row: pd.Series) -> str:
    site = SITE_TITLES.get(row["site"], row["site"])
    return (
        f"{row['model']} ({site}, {row['dataset']}): best head {row['best_label']} from {row['best_query']} "
        f"(tokens {row['best_tokens']}) puts {_times(row['best_detection'])} uniform attention on the object "
        f"(detection score; {_times(row['best_object_lift'])} its layer's average head); at the head-patching "
        f"position the best is {_times(row['best_detection_at_head_position'])}; mean over all heads and queries "
        f"{_times(row['mean_detection'])}; {int(row['n_detection_heads'])} head(s) are object detectors at some query."
    )


def _function_item(row: pd.Series) -> str:
    return (
        f"{row['model']} {row['label']} ({row['kind']}), {row['dataset']}: {row['function']} at {row['query']} "
        f"(detection {_times(row['detection_score'])} uniform, outlier attention "
        f"{_times(row['outlier_lift'])} the average head's)"
    )


def _verdict(grounding: pd.DataFrame, config: HeadFunctionConfig) -> str:
    """The paper's question answered from the numbers: cross-attention vs self-attention fusion."""
    cross = grounding[grounding["site"] == "cross_attn_head"]
    self_ = grounding[grounding["site"] == "self_attn_head"]
    rule = (
        f"a head is an object detector when its detection score is at least {config.detection_threshold:g}× "
        f"uniform and {config.lift_threshold:g}× its layer's average head"
    )
    if cross.empty or self_.empty:
        present = ", ".join(sorted(SITE_TITLES.get(s, s) for s in grounding["site"].unique())) or "no"
        return f"Cannot be answered from this run: only {present} heads were scored on images with object masks."
    best_cross, best_self = cross.loc[cross["best_detection"].idxmax()], self_.loc[self_["best_detection"].idxmax()]
    numbers = (
        f"best cross-attention head {best_cross['best_label']} ({best_cross['model']}) "
        f"{_times(best_cross['best_detection'])} uniform attention on the object vs best self-attention head "
        f"{best_self['best_label']} ({best_self['model']}) {_times(best_self['best_detection'])}; "
        f"object detectors: {int(cross['n_detection_heads'].sum())} cross-attention, "
        f"{int(self_['n_detection_heads'].sum())} self-attention ({rule})"
    )
    cross_grounds, self_grounds = bool(cross["grounds_objects"].any()), bool(self_["grounds_objects"].any())
    if cross_grounds and not self_grounds:
        answer = "Yes, in this run: cross-attention grounds objects and self-attention does not"
    elif cross_grounds:
        answer = "No, not in this run: both cross-attention and self-attention heads ground objects"
    elif self_grounds:
        answer = "No, the reverse in this run: self-attention heads ground objects and cross-attention heads do not"
    else:
        answer = "No head of either kind grounds objects in this run"
    return f"{answer}: {numbers}."


def grounding_findings(grounding: pd.DataFrame, functions: pd.DataFrame, config: HeadFunctionConfig) -> str:
    """HTML fragment: what the universal heads do; does cross-attention ground objects where self-attention does not?

    `grounding` is `head_functions.grounding_summary` output over (model, site, dataset);
    `functions` is `head_functions.universal_head_functions` output.
    """
    check_columns(
        grounding,
        [
            "model",
            "site",
            "dataset",
            "best_label",
            "best_query",
            "best_tokens",
            "best_detection",
            "best_object_lift",
            "best_detection_at_head_position",
            "mean_detection",
            "n_detection_heads",
            "grounds_objects",
        ],
        "grounding summary",
    )
    check_columns(
        functions,
        ["model", "site", "dataset", "label", "kind", "function", "query", "detection_score", "outlier_lift"],
        "universal head functions",
    )
    heads = [f"<li>{escape(_function_item(row))}</li>" for _, row in functions.iterrows()]
    items = [f"<li>{escape(_grounding_item(row))}</li>" for _, row in grounding.iterrows()]
    return (
        '<div class="summary"><h3>What the universal heads do</h3>'
        f"<ul>{''.join(heads) or '<li>No universal head has attention records.</li>'}</ul>"
        "<h3>Does cross-attention ground objects while self-attention does not?</h3>"
        f"<p><b>{escape(_verdict(grounding, config))}</b></p>"
        "<p>Detection score: the head's share of patch attention on the object's patches divided by the object's "
        "share of the image (1× = uniform attention), averaged over the samples with an object mask.</p>"
        f"<ul>{''.join(items) or '<li>No images with object masks were scored.</li>'}</ul></div>"
    )
