"""Attention of the fusion heads from text positions to the image patches, for head-function scoring.

Fusion attention per family (registered in FUSION_ATTENTION by `adapter.family`, so callers never
branch on the family):
- BLIP: the text encoder's cross-attention. Its keys are the vision tower's output, [CLS] then the
  patch grid; the [CLS] image token is dropped because it has no place on the image.
- LLaVA: the language model's self-attention; the keys kept are the image-token positions
  (`input_ids == image_token_id`), one per patch in row-major order.

`PatchAttention.weights` is each row *renormalised over the patches* (sums to 1), so heads are
compared on where they look on the image; `PatchAttention.mass` keeps the raw fraction of the row
that went to the patches (BLIP: 1 − attention to the image [CLS]; LLaVA: attention on image tokens
vs text tokens), because taking attention off the image is itself a behaviour. `raw = weights · mass`.

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
from notice.head_functions import query_labels
from notice.tables import check_columns, read_table, write_table


@dataclass(frozen=True)
class FusionAttention:
    """Where one family's fusion attention lives and which of its keys are image patches."""

    modules: Callable[[VLMAdapter], Sequence[torch.nn.Module]]  # per layer; output[1] = probs [B, H, T, K]
    image_keys: Callable[[VLMAdapter, ModelInput], list[int]]   # key indices of the patches, row-major
    query_positions: Callable[[VLMAdapter, ModelInput], list[int]]  # default query positions


FUSION_ATTENTION: dict[str, FusionAttention] = {}


@dataclass
class PatchAttention:
    """Attention of layers × heads × query positions to the image patches of one prompt."""

    weights: torch.Tensor        # [L, H, Q, P] renormalised over the P patches (float32)
    mass: torch.Tensor           # [L, H, Q] raw attention on the patches before renormalising
    layers: list[int]
    heads: list[int]
    query_positions: list[int]
    grid: tuple[int, int]        # (rows, cols); patch p sits at (p // cols, p % cols)

    @property
    def raw(self) -> torch.Tensor:
        """The model's own probabilities on the patches, [L, H, Q, P]."""
        return self.weights * self.mass[..., None]


def patch_grid(adapter: VLMAdapter) -> tuple[int, int]:
    """(rows, cols) of the vision tower's patch grid (square images, as both processors produce)."""
    vision = adapter.model.config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


def patch_attention(
    adapter: VLMAdapter,
    inp: ModelInput,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    query_positions: Sequence[int] | None = None,
) -> PatchAttention:
    """Fusion attention of `layers` × `heads` (default: all) from `query_positions` to the patches.

    Default query positions: BLIP, every text-encoder token ([CLS] and [SEP] included: which token
    localises varies between trained models, BRIEF §6); LLaVA, every text token after the image (the
    last one is "ASSISTANT:"'s ":"; tokens before the image cannot see it under the causal mask).
    """
    spec = FUSION_ATTENTION[adapter.family]
    modules = spec.modules(adapter)
    layers = list(range(len(modules))) if layers is None else list(layers)
    heads = list(range(adapter.n_heads)) if heads is None else list(heads)
    queries = spec.query_positions(adapter, inp) if query_positions is None else list(query_positions)
    keys = spec.image_keys(adapter, inp)
    grid = patch_grid(adapter)
    if len(keys) != grid[0] * grid[1]:
        raise ValueError(f"{adapter.family}: {len(keys)} image keys for a {grid[0]}×{grid[1]} patch grid")

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
    return PatchAttention(
        weights=patches / mass.clamp_min(torch.finfo(torch.float32).tiny)[..., None],
        mass=mass, layers=layers, heads=heads, query_positions=queries, grid=grid,
    )


def register_fusion_attention(family: str, spec: FusionAttention) -> None:
    FUSION_ATTENTION[family] = spec


def _blip_image_keys(adapter: VLMAdapter, inp: ModelInput) -> list[int]:
    rows, cols = patch_grid(adapter)
    return list(range(1, 1 + rows * cols))  # key 0 is the image [CLS]


def _llava_image_keys(adapter: VLMAdapter, inp: ModelInput) -> list[int]:
    keys = torch.nonzero(inp.input_ids[0] == adapter.model.config.image_token_id).flatten().tolist()
    rows, cols = patch_grid(adapter)
    # the "full" feature strategy keeps CLIP's [CLS] as the first image token
    return keys[1:] if len(keys) == rows * cols + 1 else keys


def _llava_queries(adapter: VLMAdapter, inp: ModelInput) -> list[int]:
    last_image = int(torch.nonzero(inp.input_ids[0] == adapter.model.config.image_token_id).max())
    return [p for p in adapter.patch_positions(inp) if p > last_image]


register_fusion_attention("blip", FusionAttention(
    modules=lambda a: [layer.crossattention.self for layer in a.model.text_encoder.encoder.layer],
    image_keys=_blip_image_keys,
    query_positions=lambda a, inp: a.patch_positions(inp),
))
register_fusion_attention("llava", FusionAttention(
    modules=lambda a: [layer.self_attn for layer in a.model.model.language_model.layers],
    image_keys=_llava_image_keys,
    query_positions=_llava_queries,
))


def model_view(adapter: VLMAdapter, inp: ModelInput) -> np.ndarray:
    """The image as the model sees it (after resize / crop), uint8 [H, W, 3]: the processor's
    normalisation undone, so overlays line up with the patch grid exactly."""
    processor = adapter.processor.image_processor
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    pixels = inp.pixel_values[0].float().cpu() * std + mean
    return (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def mask_view(adapter: VLMAdapter, mask: Image.Image) -> np.ndarray:
    """An object mask (0/255) through the same resize / crop as the image, as a float [H, W] in [0, 1].

    Pixels count as object above 0.5, so interpolated edges (and a processor's padding with the mean
    colour, ~0.46) do not.
    """
    out = adapter.processor.image_processor(images=mask.convert("RGB"), return_tensors="pt", do_normalize=False)
    return (out["pixel_values"][0].float().mean(0) > 0.5).float().numpy()


# -- per-sample attention records (rule `attention_patterns`) ----------------------------------------

RECORD_INDEX_COLUMNS: tuple[str, ...] = (
    "sample_id", "task", "category", "answer", "distractor", "file", "has_object_mask", "head_query_index",
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


def attention_record(adapter: VLMAdapter, row: pd.Series, load_image: Callable[[str], Image.Image]) -> dict:
    """Fusion attention of every head from every default query position of one selected sample.

    The record holds the PatchAttention arrays, `average` [L, Q, P] (the mean over the layer's heads,
    the paper's "average head"), `all_heads_average` [Q, P] (over every fusion head of the model), the
    image as the model sees it, the mask on the same pixels (empty [0, 0] without a mask), the query
    tokens and labels (`head_functions.query_labels`) and which query is the head-patching position.
    """
    inp = adapter.prepare(load_image(row["image_path"]), row["prompt"])
    attention = patch_attention(adapter, inp)
    ids = inp.input_ids[0].tolist()
    head_position = adapter.head_position(inp, int(row["answer_token_id"]))
    if head_position not in attention.query_positions:
        raise ValueError(f"sample {row['sample_id']}: head position {head_position} is not a query position")
    mask_path = str(row["mask_path"] or "")
    mask = mask_view(adapter, Image.open(mask_path)) if mask_path else np.zeros((0, 0), np.float32)
    weights = attention.weights.numpy()
    return {
        "sample_id": str(row["sample_id"]), "task": str(row["task"]), "site": adapter.head_site,
        "weights": weights, "mass": attention.mass.numpy(),
        "average": weights.mean(axis=1), "all_heads_average": weights.mean(axis=(0, 1)),
        "layers": np.asarray(attention.layers), "heads": np.asarray(attention.heads),
        "query_positions": np.asarray(attention.query_positions), "grid": np.asarray(attention.grid),
        "query_tokens": np.asarray([inp.tokens[p] for p in attention.query_positions]),
        "query_labels": np.asarray(query_labels(ids, inp.tokens, attention.query_positions,
                                                int(row["answer_token_id"]), int(row["distractor_token_id"]))),
        "head_query_index": attention.query_positions.index(head_position),
        "image": model_view(adapter, inp), "mask": mask,
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
    with np.load(path) as data:
        record = {key: data[key] for key in data.files}
    for key in ("sample_id", "task", "site"):
        record[key] = str(record[key])
    record["head_query_index"] = int(record["head_query_index"])
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
        rows.append({**{key: row[key] for key in ("sample_id", "task", "category", "answer", "distractor")},
                     "file": name, "has_object_mask": bool(record["mask"].size),
                     "head_query_index": record["head_query_index"]})
    index = pd.DataFrame(rows, columns=list(RECORD_INDEX_COLUMNS))
    write_table(index, out / "index.parquet", RECORD_INDEX_COLUMNS)
    return index


def load_records(attention_dir: str | Path) -> list[dict]:
    """Every record listed in `attention_dir`/index.parquet (the rule's output directory)."""
    index = read_table(Path(attention_dir) / "index.parquet", RECORD_INDEX_COLUMNS)
    return [load_record(Path(attention_dir) / name) for name in index["file"]]
