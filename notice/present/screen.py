"""Figures of the attribution screen: its estimates against exact patching, and where in the image its effects fall."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from notice.files.tables import check_columns
from notice.method.screen import is_unsigned, layer_maps, object_share
from notice.present.charts import SITE_TITLES, save_chart
from notice.present.images import data_uri, overlay_grid, overlay_image


def screen_scatter(paired: pd.DataFrame, out_stem: str | Path, title: str) -> list[Path]:
    """The screen's estimate against the exact effect of the same site (`notice.method.screen.paired_effects`
    rows of one model, dataset and corruption), one panel per site kind; the dashed line is y = x.
    GradDrop's unsigned scores (`notice.method.screen.is_unsigned`) are drawn against |exact|."""
    check_columns(paired, ["site", "estimate", "exact", "method", "layer", "head", "position", "token"], "screen pairs")
    if paired.empty:
        raise ValueError(f"{out_stem}: no site has both a screen estimate and an exact effect")
    df = paired[["site", "layer", "head", "position", "token", "estimate", "exact", "method"]].copy()
    unsigned = df["method"].map(is_unsigned)
    df["exact"] = df["exact"].where(~unsigned, df["exact"].abs())
    df["site"] = df["site"].map(lambda s: SITE_TITLES.get(s, s))
    low = float(min(df["estimate"].min(), df["exact"].min()))
    high = float(max(df["estimate"].max(), df["exact"].max()))
    scale = alt.Scale(domain=[low, high])
    points = (
        alt.Chart()
        .mark_circle(size=14, opacity=0.5)
        .encode(
            x=alt.X("estimate:Q", title="screen estimate", scale=scale),
            y=alt.Y("exact:Q", title="|exact effect|" if unsigned.all() else "exact effect (LD)", scale=scale),
            tooltip=["site:N", "layer:Q", "head:Q", "position:Q", "token:N", "estimate:Q", "exact:Q"],
        )
    )
    diagonal = (
        alt.Chart(pd.DataFrame({"x": [low, high]}))
        .mark_line(strokeDash=[4, 3], color="#888")
        .encode(x=alt.X("x:Q", scale=scale), y=alt.Y("x:Q", scale=scale))
    )
    chart = (
        alt.layer(points, diagonal, data=df)
        .properties(width=200, height=200)
        .facet(column=alt.Column("site:N", title=None))
        .properties(title=alt.TitleParams(title, anchor="start"))
    )
    return save_chart(chart, out_stem)


def screen_image_maps(records: list[dict], out_stem: str | Path, title: str, n_samples: int = 4) -> list[Path]:
    """ "Where in the image": per sample (rows, the first `n_samples`), the image with the object outlined,
    the screen's image-token effect summed over layers (|Σ|) and its maximum over layers, as heat maps; a
    last row averages each map (scaled to its own maximum) over every record. Labels give the share of the
    summed effect on the object and the object's share of the image (`notice.method.screen.object_share`)."""
    if not records:
        raise ValueError(f"{out_stem}: no image maps to draw")
    grid = (int(records[0]["grid"][0]), int(records[0]["grid"][1]))
    cells = []

    def add(
        row: str, order: int, column: str, image: np.ndarray, values: np.ndarray, mask: np.ndarray | None, label: str
    ):
        cells.append(
            {
                "row": row,
                "column": column,
                "order": order,
                "label": label,
                "url": data_uri(overlay_image(image, values, grid, mask)),
            }
        )

    for number, record in enumerate(records[:n_samples]):
        effects, mask = np.asarray(record["effects"]), np.asarray(record["mask"])
        summed, peak = layer_maps(effects)
        row = f"{number + 1}. {record['sample_id']} ({record['task']})"
        share = ""
        if mask.size:
            on_object, area = object_share(effects, mask, grid)
            share = f"{on_object:.0%} on object (area {area:.0%})"
        add(row, 0, "image", record["image"], np.zeros(grid[0] * grid[1]), mask, "object outlined" if mask.size else "")
        add(row, 1, "|Σ over layers|", record["image"], summed, mask, share)
        add(row, 2, "max over layers", record["image"], peak, mask, f"{effects.shape[0]} layer(s)")
    same_grid = [r for r in records if (int(r["grid"][0]), int(r["grid"][1])) == grid]
    unit = [layer_maps(np.asarray(r["effects"])) for r in same_grid]
    mean_sum = np.mean([s / s.max() if s.max() > 0 else s for s, _ in unit], axis=0)
    mean_max = np.mean([m / m.max() if m.max() > 0 else m for _, m in unit], axis=0)
    first = same_grid[0]
    average = f"average of {len(same_grid)}"
    add(average, 0, "image", first["image"], np.zeros(grid[0] * grid[1]), None, "on sample 1's image")
    add(average, 1, "|Σ over layers|", first["image"], mean_sum, None, "each sample scaled to its maximum")
    add(average, 2, "max over layers", first["image"], mean_max, None, "")
    return overlay_grid(cells, out_stem, alt.TitleParams(title, anchor="start"))
