"""Attention figures (paper Fig. 6/7): chosen heads against the average head, overlaid on sample images."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

from notice.files.tables import check_columns
from notice.method.head_functions import object_fraction
from notice.method.heads import KINDS, head_label
from notice.present.images import data_uri, overlay_grid, overlay_image


def _query_index(record: dict, query: str) -> int | None:
    labels = [str(label) for label in record["query_labels"]]
    return labels.index(query) if query in labels else None


def attention_overlays(
    records: list[dict], panels: pd.DataFrame, out_stem: str | Path, title: str, subtitle: str = ""
) -> list[Path]:
    """Paper Fig. 6/7: attention of chosen heads vs the average head, overlaid on sample images.

    One row per record (`notice.method.attention.attention_record`); columns: the image with the object's
    mask outlined, the average over all fusion heads at the head-patching position, then one per
    row of `panels` (columns layer, head, query, title: the head's attention from the query with
    that label; a sample without that query leaves the cell empty). Each cell's label gives the
    share of patch attention on the object (×uniform = share / object area) where a mask exists.
    """
    check_columns(panels, ["layer", "head", "query", "title"], "overlay panels")
    cells = []
    for number, record in enumerate(records):
        grid = (int(record["grid"][0]), int(record["grid"][1]))
        mask = np.asarray(record["mask"])
        frac = object_fraction(mask, grid) if mask.size else None
        row = f"{number + 1}. {record['sample_id']} ({record['task']})"
        head_query = int(record["head_query_index"])
        maps = [
            ("image", None, ""),
            ("average head", record["all_heads_average"][head_query], f"from {record['query_labels'][head_query]}"),
        ]
        layers, heads = list(record["layers"]), list(record["heads"])
        for panel in panels.itertuples():
            q = _query_index(record, str(panel.query))
            attention = None if q is None else record["weights"][layers.index(panel.layer), heads.index(panel.head), q]
            maps.append((panel.title, attention, f"from {panel.query}"))
        for column, (name, attention, note) in enumerate(maps):
            if name != "image" and attention is None:
                continue
            shown = np.zeros(grid[0] * grid[1]) if attention is None else attention
            label = note
            if attention is not None and frac is not None and frac.mean() > 0:
                share = float(attention @ frac)
                label = f"{note}: {share:.0%} on object ({share / frac.mean():.1f}× uniform)"
            elif attention is None:
                label = "object outlined" if frac is not None else "no object mask"
            cells.append(
                {
                    "row": row,
                    "column": name,
                    "order": column,
                    "label": label,
                    "url": data_uri(overlay_image(record["image"], shown, grid, mask)),
                }
            )
    if not cells:
        raise ValueError(f"{out_stem}: no attention records to draw")
    return overlay_grid(cells, out_stem, alt.TitleParams(title, subtitle=subtitle, anchor="start"))


def overlay_panels(universal_df: pd.DataFrame, scores: pd.DataFrame, max_heads: int = 4) -> pd.DataFrame:
    """Heads to overlay for one (model, site, dataset): its universal heads, then the best detector.

    `universal_df` (model, site, layer, head, kind) and `scores` (`head_function_scores`) are already
    restricted to that model, site and dataset. Universal heads (at most `max_heads`, vision / text /
    multimodal order) are shown at the head-patching query with their function there; the head with
    the highest detection score (any query) is added as "best detector", so the figure answers the
    grounding question even when no head is universal. Columns: layer, head, query, title.
    """
    check_columns(
        scores,
        ["layer", "head", "label", "query", "is_head_position", "detection_score", "function"],
        "head function scores",
    )
    heads = scores[scores["head"] >= 0]
    at_head = heads[heads["is_head_position"]]
    head_query = at_head["query"].mode().iloc[0] if len(at_head) else None
    rank = {kind: i for i, kind in enumerate(KINDS)}
    chosen = universal_df[["layer", "head", "kind"]].drop_duplicates(["layer", "head"])
    chosen = chosen.assign(rank=chosen["kind"].map(rank)).sort_values(["rank", "layer", "head"]).head(max_heads)
    rows = []
    if head_query is not None:
        for head in chosen.itertuples():
            found = at_head[(at_head["layer"] == head.layer) & (at_head["head"] == head.head)]
            function = found["function"].iloc[0] if len(found) else "not scored"
            rows.append(
                {
                    "layer": head.layer,
                    "head": head.head,
                    "query": head_query,
                    "title": f"{head_label(head.layer, head.head)} {head.kind}: {function}",
                }
            )
    scored = heads.dropna(subset=["detection_score"])
    if len(scored):
        best = scored.loc[scored["detection_score"].idxmax()]
        rows.append(
            {
                "layer": int(best["layer"]),
                "head": int(best["head"]),
                "query": best["query"],
                "title": f"{best['label']} best detector: {best['function']}",
            }
        )
    return pd.DataFrame(rows, columns=["layer", "head", "query", "title"])
