"""The clean accuracy per task and category as a chart (paper Table 2)."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from notice.files.tables import check_columns
from notice.present.charts import safe_stem, save_chart

# `category` of an accuracy table's per-task total row (notice.method.evaluate writes "(all)")
TOTAL_CATEGORIES: tuple[str, ...] = ("all", "(all)")


def accuracy_chart(accuracy_df: pd.DataFrame, out_dir: str | Path, model: str | None = None) -> list[Path]:
    """Paper Table 2 as a chart: one model's accuracy per category, a panel per task, the total highlighted.

    The total is the row whose category is "all" or "(all)".

    Files: accuracy[_<model>].{png,svg,html}.
    """
    check_columns(accuracy_df, ["task", "category", "n", "n_correct", "accuracy"], "accuracy table")
    df = accuracy_df.copy()
    title = "Clean accuracy per task and category" + (f" of {model}" if model else "")
    total = df["category"].isin(TOTAL_CATEGORIES)
    df["scope"] = np.where(total, "all categories", "one category")
    df["count"] = df["n_correct"].astype(int).astype(str) + "/" + df["n"].astype(int).astype(str)
    # the task total last in every panel
    order = sorted(df.loc[~total, "category"].unique()) + sorted(df.loc[total, "category"].unique())
    base = alt.Chart().encode(
        x=alt.X("category:N", title="Category", sort=order),
        y=alt.Y(
            "accuracy:Q", title="Accuracy (exact match)", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")
        ),
    )
    bars = base.mark_bar().encode(
        color=alt.Color(
            "scope:N",
            title=None,
            scale=alt.Scale(domain=["one category", "all categories"], range=["#9ecae1", "#08519c"]),
        ),
        tooltip=["task:N", "category:N", "count:N", alt.Tooltip("accuracy:Q", format=".1%")],
    )
    counts = base.mark_text(dy=-6, fontSize=9).encode(text="count:N")
    chart = (
        alt.layer(bars, counts, data=df)
        .properties(width=max(120, 28 * df["category"].nunique()), height=200)
        .facet(column=alt.Column("task:N", title="Task"))
        .resolve_scale(x="independent")
        .properties(
            title=alt.TitleParams(
                title,
                subtitle="Labels: correct / asked. Only correctly answered samples are patched.",
                anchor="start",
            )
        )
    )
    return save_chart(chart, Path(out_dir) / (safe_stem("accuracy", model) if model else "accuracy"))
