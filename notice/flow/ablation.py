"""Object-token ablation: the object's image tokens replaced by the mean image token, against as many random
non-object image tokens.

The image tokens are rows of `VLMAdapter.image_key_states` (token fusion: the language model's input
embeddings at the image positions; cross-attention: the image embeddings the text side attends to), one per
image key of `VLMAdapter.image_grid`; the mean image token is their mean over the whole grid in the same run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from notice.adapters.base import ImageGrid, ModelInput, VLMAdapter, overlapping_cells

ABLATION_COLUMNS: tuple[str, ...] = (
    "ablated",
    "draw",
    "n_tokens",
    "ld_base",
    "ld_ablated",
    "ld_change",
    "correct_base",
    "correct_ablated",
)


def object_keys(grid: ImageGrid, mask_view: np.ndarray) -> tuple[int, ...]:
    """The image keys whose patch overlaps the object (`overlapping_cells`: some pixel of the patch above 0.5),
    in grid order. `mask_view` is [H, W] on the pixels the model sees (`VLMAdapter.mask_view`); an empty mask
    ([0, 0]: no object known) gives no keys."""
    if mask_view.size == 0:
        return ()
    return tuple(grid.keys[cell] for cell in overlapping_cells(mask_view, grid.rows, grid.cols))


def random_keys(grid_keys: Sequence[int], object_keys: Sequence[int], n_draws: int, seed: int) -> list[tuple[int, ...]]:
    """`n_draws` draws of len(object_keys) distinct non-object keys each (sorted), from numpy's generator seeded
    with `seed`; ValueError when draws are asked for and there are not that many non-object keys."""
    pool = sorted(set(grid_keys) - set(object_keys))
    n = len(object_keys)
    if n_draws and n > len(pool):
        raise ValueError(f"the object covers {n} of {len(grid_keys)} image tokens: too few others to draw {n} from")
    rng = np.random.default_rng(seed)
    return [tuple(sorted(pool[i] for i in rng.choice(len(pool), size=n, replace=False))) for _ in range(n_draws)]


@torch.no_grad()
def ablated_logits(adapter: VLMAdapter, inp: ModelInput, keys: Sequence[int]) -> torch.Tensor:
    """Answer logits [V] (float32) with the image tokens of `keys` replaced by the mean over the grid's tokens."""
    grid_keys = torch.tensor(adapter.image_grid(inp).keys)
    ablated = torch.tensor(keys, dtype=torch.long)

    def replace(states: torch.Tensor) -> torch.Tensor:
        mean = states[:, grid_keys.to(states.device)].float().mean(1, keepdim=True).to(states.dtype)
        out = states.clone()
        out[:, ablated.to(states.device)] = mean
        return out

    with adapter.image_key_states(replace):
        return adapter.answer_logits(inp)


def ablation_rows(
    adapter: VLMAdapter,
    inp: ModelInput,
    tau: int,
    tau_p: int,
    object_keys: Sequence[int],
    n_draws: int,
    seed: int,
) -> pd.DataFrame:
    """ABLATION_COLUMNS: the object's tokens ablated (draw 0), then `n_draws` draws of as many random non-object
    tokens (`random_keys`). ld = logit(tau) − logit(tau_p); correct: ld > 0 (the answer preferred)."""
    grid_keys = adapter.image_grid(inp).keys
    strays = sorted(set(object_keys) - set(grid_keys))
    if strays or len(set(object_keys)) != len(object_keys):
        raise ValueError(f"object keys must be distinct image keys of the grid; not: {strays or list(object_keys)}")

    def logit_diff(logits: torch.Tensor) -> float:
        return float(logits[tau] - logits[tau_p])

    ld_base = logit_diff(adapter.answer_logits(inp))
    runs = [("object", 0, tuple(object_keys))]
    runs += [("random", draw, keys) for draw, keys in enumerate(random_keys(grid_keys, object_keys, n_draws, seed))]
    rows = []
    for ablated, draw, keys in runs:
        ld = logit_diff(ablated_logits(adapter, inp, keys))
        rows.append((ablated, draw, len(keys), ld_base, ld, ld - ld_base, ld_base > 0, ld > 0))
    return pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))
