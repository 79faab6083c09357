"""Image panels: a per-patch map (attention, screen effect) as a heatmap over the image, and a grid of them."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from notice.present.charts import save_chart

# "inferno"-like ramp (dark → bright) for attention overlays; written out so no plotting library is needed
OVERLAY_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)
MASK_EDGE_COLOUR = np.array([0, 255, 255], dtype=float)
OVERLAY_PIXELS = 160


def _ramp(values: np.ndarray) -> np.ndarray:
    """Colours [..., 3] of values in [0, 1] on OVERLAY_RAMP."""
    stops = np.linspace(0, 1, len(OVERLAY_RAMP))
    return np.stack([np.interp(values, stops, OVERLAY_RAMP[:, c]) for c in range(3)], axis=-1)


def overlay_image(
    image: np.ndarray,
    attention: np.ndarray,
    grid: tuple[int, int],
    mask: np.ndarray | None = None,
    size: int = OVERLAY_PIXELS,
) -> Image.Image:
    """The image (greyed) with the per-patch attention as a heatmap on top, the mask's edge in cyan.

    `attention` [rows · cols] (row-major patches) is scaled to its maximum, so each panel shows where
    its own head looks; the numbers are in the panel's label. `image` is uint8 [H, W, 3] at the
    model's input resolution, `mask` [H, W] in [0, 1] on the same pixels (or None / empty).
    """
    rows, cols = grid
    height, width = image.shape[:2]
    if height % rows or width % cols:
        raise ValueError(f"image {height}×{width} does not tile into a {rows}×{cols} patch grid")
    peak = float(attention.max())
    heat = np.asarray(attention, dtype=float).reshape(rows, cols) / (peak if peak > 0 else 1.0)
    heat = np.repeat(np.repeat(heat, height // rows, axis=0), width // cols, axis=1)
    grey = np.repeat(image.astype(float).mean(axis=-1, keepdims=True), 3, axis=-1)
    alpha = 0.8 * heat[..., None]
    out = (1 - alpha) * grey + alpha * _ramp(heat)
    if mask is not None and np.size(mask):
        inside = np.asarray(mask) > 0.5
        padded = np.pad(inside, 1)  # outside the image counts as background: a border object is outlined
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        out[inside & ~interior] = MASK_EDGE_COLOUR
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    return picture.resize((size, size * height // width), Image.Resampling.NEAREST)


def data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_grid(cells: list[dict], out_stem: str | Path, title: alt.TitleParams) -> list[Path]:
    """Image panels in a grid: `cells` have row, column, order (of the columns), label and url (a data URI);
    rows in the order they first appear."""
    df = pd.DataFrame(cells).assign(x=0.5, y=0.5)
    order = list(df.sort_values("order")["column"].drop_duplicates())
    axis: dict[str, Any] = dict(scale=alt.Scale(domain=[0, 1]), axis=None)
    base = alt.Chart().properties(width=OVERLAY_PIXELS, height=OVERLAY_PIXELS + 14)
    images = base.mark_image(width=OVERLAY_PIXELS, height=OVERLAY_PIXELS).encode(
        x=alt.X("x:Q", **axis), y=alt.Y("y:Q", **axis), url="url:N", tooltip=["row:N", "column:N", "label:N"]
    )
    labels = base.mark_text(fontSize=9, baseline="top", dy=OVERLAY_PIXELS / 2 + 2).encode(
        x=alt.X("x:Q", **axis), y=alt.Y("y:Q", **axis), text="label:N"
    )
    chart = (
        alt.layer(images, labels, data=df)
        .facet(
            row=alt.Row(
                "row:N",
                title=None,
                sort=list(df["row"].drop_duplicates()),
                header=alt.Header(labelAngle=0, labelAlign="left"),
            ),
            column=alt.Column("column:N", title=None, sort=order),
        )
        .properties(title=title)
    )
    return save_chart(chart, out_stem)
