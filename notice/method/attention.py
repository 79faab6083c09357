"""Attention of the fusion heads from text positions to the image patches, for head-function scoring.

The adapter says where its family's fusion attention lives (`fusion_attention_modules`: a text encoder's
cross-attention to the vision tower, a decoder VLM's self-attention), which of its keys are image
patches and on which grid (`image_grid`), and which queries can see the image (`attention_queries`).

`ImageAttention.weights` is each row *renormalised over the patches* (sums to 1), so heads are
compared on where they look on the image; `ImageAttention.mass` keeps the raw fraction of the row
that went to the patches (cross-attention: 1 − attention to the image [CLS]; self-attention:
attention on image tokens vs text tokens), because taking attention off the image is itself a
behaviour. `raw = weights · mass`.

Attention probabilities are read from forward hooks on the attention modules (their output[1]),
sliced to the requested heads, queries and image keys inside the hook, so a 7B model never holds
all layers' full T×T maps. Models must be loaded with `attn_implementation="eager"`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from notice.adapters.base import ModelInput, VLMAdapter
from notice.files.tables import check_columns, read_table, write_table
from notice.method.head_functions import query_labels


@dataclass
class ImageAttention:
    """Attention of layers × heads × query positions to the image patches of one prompt."""

    weights: torch.Tensor  # [L, H, Q, P] renormalised over the P patches (float32)
    mass: torch.Tensor  # [L, H, Q] raw attention on the patches before renormalising
    layers: list[int]
    heads: list[int]
    query_positions: list[int]
    grid: tuple[int, int]  # (rows, cols); patch p sits at (p // cols, p % cols)

    @property
    def raw(self) -> torch.Tensor:
        """The model's own probabilities on the patches, [L, H, Q, P]."""
        return self.weights * self.mass[..., None]


def image_attention(
    adapter: VLMAdapter,
    inp: ModelInput,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    query_positions: Sequence[int] | None = None,
) -> ImageAttention:
    """Fusion attention of `layers` × `heads` (default: all: the adapter's `fusion_layers`) from `query_positions`
    to the patches.

    Default query positions: `adapter.attention_queries` (the positions that can see the image).
    """
    modules = dict(zip(adapter.fusion_layers(), adapter.fusion_attention_modules()))
    layers = list(modules) if layers is None else list(layers)
    heads = list(range(adapter.n_heads)) if heads is None else list(heads)
    queries = adapter.attention_queries(inp) if query_positions is None else list(query_positions)
    image = adapter.image_grid(inp)
    keys, grid = list(image.keys), (image.rows, image.cols)

    device = inp.input_ids.device
    head_idx, query_idx, key_idx = (torch.tensor(ix, device=device) for ix in (heads, queries, keys))
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(_module, _args, output):
            probs = output[1]
            if probs is None:
                raise RuntimeError("attention weights are None: load the model with attn_implementation='eager'")
            rows = probs[0].index_select(0, head_idx).index_select(1, query_idx)  # [H, Q, K]
            captured[layer] = rows.index_select(2, key_idx).float()

        return hook

    handles = [modules[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        adapter.answer_logits(inp)
    finally:
        for handle in handles:
            handle.remove()
    patches = torch.stack([captured[layer] for layer in layers]).cpu()  # [L, H, Q, P]
    mass = patches.sum(-1)
    return ImageAttention(
        weights=patches / mass.clamp_min(torch.finfo(torch.float32).tiny)[..., None],
        mass=mass,
        layers=layers,
        heads=heads,
        query_positions=queries,
        grid=grid,
    )


# -- per-sample attention records (rule `attention_patterns`) ----------------------------------------

RECORD_INDEX_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "task",
    "category",
    "answer",
    "distractor",
    "file",
    "has_object_mask",
    "head_query_index",
)


def choose_samples(selected: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to `n` selected samples, spread over the tasks in turn, those with an object mask first.

    Seeded and independent of the table's row order, so a rerun picks the same samples.
    """
    check_columns(selected, ["sample_id", "task", "mask_path"], "selected samples")
    rng = np.random.default_rng(seed)
    queues = []
    for _, group in selected.sort_values("sample_id").groupby("task", sort=True):
        shuffled = group.iloc[rng.permutation(len(group))]
        has_mask = shuffled["mask_path"].fillna("").astype(str) != ""
        queues.append(pd.concat([shuffled[has_mask], shuffled[~has_mask]]))
    rows = []
    for depth in range(max((len(q) for q in queues), default=0)):
        rows += [q.iloc[depth] for q in queues if depth < len(q)]
    return pd.DataFrame(rows[:n], columns=selected.columns).reset_index(drop=True)


def object_mask(adapter: VLMAdapter, mask_path: str, inp: ModelInput) -> np.ndarray:
    """The object mask on the pixels the model sees (`VLMAdapter.mask_view`); empty [0, 0] without a mask."""
    return adapter.mask_view(Image.open(mask_path), inp) if mask_path else np.zeros((0, 0), np.float32)


def option_ids(adapter: VLMAdapter, option: str, token_id: int) -> set[int]:
    """An option's first token as the model generates it (`token_id`) and as a question writes it, after a space."""
    written = adapter.processor.tokenizer(" " + option, add_special_tokens=False)["input_ids"]
    return {token_id, *written[:1]}


def attention_record(adapter: VLMAdapter, row: pd.Series, load_image: Callable[[str], Image.Image]) -> dict:
    """Fusion attention of every head from every default query position of one selected sample.

    The record holds the ImageAttention arrays, `average` [L, Q, P] (the mean over the layer's heads,
    the paper's "average head"), `all_heads_average` [Q, P] (over every fusion head of the model), the
    image as the model sees it, the mask on the same pixels (empty [0, 0] without a mask), the query
    tokens and labels (`head_functions.query_labels`) and which query is the head-patching position.
    """
    inp = adapter.prepare(load_image(row["image_path"]), row["prompt"])
    attention = image_attention(adapter, inp)
    ids = inp.input_ids[0].tolist()
    head_position = adapter.head_position(inp, int(row["answer_token_id"]))
    if head_position not in attention.query_positions:
        raise ValueError(f"sample {row['sample_id']}: head position {head_position} is not a query position")
    mask = object_mask(adapter, str(row["mask_path"] or ""), inp)
    weights = attention.weights.numpy()
    return {
        "sample_id": str(row["sample_id"]),
        "task": str(row["task"]),
        "site": adapter.head_site,
        "weights": weights,
        "mass": attention.mass.numpy(),
        "average": weights.mean(axis=1),
        "all_heads_average": weights.mean(axis=(0, 1)),
        "layers": np.asarray(attention.layers),
        "heads": np.asarray(attention.heads),
        "query_positions": np.asarray(attention.query_positions),
        "grid": np.asarray(attention.grid),
        "query_tokens": np.asarray([inp.tokens[p] for p in attention.query_positions]),
        "query_labels": np.asarray(
            query_labels(
                ids,
                inp.tokens,
                attention.query_positions,
                option_ids(adapter, str(row["answer"]), int(row["answer_token_id"])),
                option_ids(adapter, str(row["distractor"]), int(row["distractor_token_id"])),
            )
        ),
        "head_query_index": attention.query_positions.index(head_position),
        "image": adapter.model_view(inp),
        "mask": mask,
    }


def save_record(record: dict, path: str | Path) -> Path:
    """One sample's record as a compressed .npz, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **record)
    tmp.replace(path)
    return path


def load_record(path: str | Path) -> dict:
    """A record written by `save_record`; scalars come back as Python values."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: attention record not found")
    record = read_npz(path, ("sample_id", "task", "site"))
    record["head_query_index"] = int(record["head_query_index"])
    return record


def read_npz(path: str | Path, text_keys: Sequence[str]) -> dict:
    """Every array of an .npz file, the `text_keys` back as Python strings."""
    with np.load(path) as data:
        record = {key: data[key] for key in data.files}
    for key in text_keys:
        record[key] = str(record[key])
    return record


def write_records(
    adapter: VLMAdapter, chosen: pd.DataFrame, load_image: Callable[[str], Image.Image], out_dir: str | Path
) -> pd.DataFrame:
    """An attention record per row of `chosen` as <sample_id>.npz in `out_dir`, and index.parquet listing them."""
    out = Path(out_dir)
    rows = []
    for _, row in chosen.iterrows():
        record = attention_record(adapter, row, load_image)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", record["sample_id"]) + ".npz"
        save_record(record, out / name)
        rows.append(
            {
                **{key: row[key] for key in ("sample_id", "task", "category", "answer", "distractor")},
                "file": name,
                "has_object_mask": bool(record["mask"].size),
                "head_query_index": record["head_query_index"],
            }
        )
    index = pd.DataFrame(rows, columns=list(RECORD_INDEX_COLUMNS))
    write_table(index, out / "index.parquet", RECORD_INDEX_COLUMNS)
    return index


def load_records(attention_dir: str | Path) -> list[dict]:
    """Every record listed in `attention_dir`/index.parquet (the rule's output directory)."""
    index = read_table(Path(attention_dir) / "index.parquet", RECORD_INDEX_COLUMNS)
    return [load_record(Path(attention_dir) / name) for name in index["file"]]
