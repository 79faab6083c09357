"""The logit lens on image tokens: each layer's residual at the image positions read through the score head.

Per layer, the final norm and unembedding (`VLMAdapter.final_logits`, float32) applied to the layer's output at
every image position of `VLMAdapter.stream_image_grid`: the top tokens there, the answer's rank, and whether the
answer (and the object's name) is among the top tokens. Token-fusion families read the image tokens' own
positions (a language model that reads learned query tokens instead of patches: those, one row with no place
on the image); families whose image reaches the stream only through cross-attention have no residual at image
positions and are refused with the adapter's message (docs/method.md, "Logit lens and token ablation").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from notice.adapters.base import ModelInput, VLMAdapter
from notice.patching.hooks import capture

LOGIT_LENS_COLUMNS: tuple[str, ...] = (
    "layer",
    "position",
    "row",
    "col",
    "top_tokens",
    "answer_rank",
    "answer_in_top5",
    "object_in_top5",
)
LENS_SHARE_COLUMNS: tuple[str, ...] = ("layer", "n_positions", "answer_share", "object_share")
POSITIONS_PER_CHUNK = 256


@torch.no_grad()
def logit_lens(
    adapter: VLMAdapter, inp: ModelInput, answer_token_id: int, object_token_id: int | None, top: int = 5
) -> pd.DataFrame:
    """LOGIT_LENS_COLUMNS, one row per (layer, image position), layers in order, positions in grid order.

    `top_tokens`: the `top` highest-scoring tokens, best first (a list: a token may hold any character);
    `answer_rank`: 1 + the number of tokens scoring above the answer; `answer_in_top5` / `object_in_top5`: that
    token is among the `top` (object: <NA> where `object_token_id` is None). NotImplementedError (the adapter's)
    where the image is not in the stream.
    """
    grid = adapter.stream_image_grid(inp)
    _, states = capture(adapter, inp, [("layer", layer) for layer in range(adapter.n_layers)])
    positions = torch.tensor(grid.keys, device=adapter.device)
    tokenizer = adapter.processor.tokenizer
    n = len(grid.keys)
    columns: dict[str, list] = {name: [] for name in LOGIT_LENS_COLUMNS}
    for layer in range(adapter.n_layers):
        # Positions in chunks: [positions, vocabulary] float32 logits of a large image and vocabulary are large.
        reads = [
            read_through_head(adapter, states[("layer", layer)][chunk], answer_token_id, top)
            for chunk in positions.split(POSITIONS_PER_CHUNK)
        ]
        best, answer_rank = torch.cat([ids for ids, _ in reads]), torch.cat([rank for _, rank in reads])
        columns["layer"] += [layer] * n
        columns["position"] += list(grid.keys)
        columns["row"] += [i // grid.cols for i in range(n)]
        columns["col"] += [i % grid.cols for i in range(n)]
        columns["top_tokens"] += [tokenizer.convert_ids_to_tokens(ids) for ids in best.tolist()]
        columns["answer_rank"] += answer_rank.tolist()
        columns["answer_in_top5"] += (best == answer_token_id).any(-1).tolist()
        columns["object_in_top5"] += (
            [None] * n if object_token_id is None else (best == object_token_id).any(-1).tolist()
        )
    table = pd.DataFrame(columns)
    table["object_in_top5"] = table["object_in_top5"].astype("boolean")
    return table


def read_through_head(
    adapter: VLMAdapter, hidden: torch.Tensor, answer_token_id: int, top: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the `top` best token ids [n, top], the answer's rank [n]) of residuals [n, D] read by the score head."""
    logits = adapter.final_logits(hidden)  # [n, V] float32
    return logits.topk(top, dim=-1).indices, 1 + (logits > logits[:, answer_token_id, None]).sum(-1)


def lens_shares(table: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per `by` group (labels in front of the lens columns, e.g. sample_id) and layer, LENS_SHARE_COLUMNS: the
    number of image positions and the share of them with the answer (the object word) among their top tokens;
    the object's share is over the positions whose object is known (NaN where none is)."""
    keys = [*by, "layer"]
    shares = table.assign(
        answer_share=table["answer_in_top5"].astype(float),
        object_share=table["object_in_top5"].astype("Float64").to_numpy(dtype=float, na_value=np.nan),
    )
    return (
        shares.groupby(keys, sort=True)
        .agg(
            n_positions=("position", "size"),
            answer_share=("answer_share", "mean"),
            object_share=("object_share", "mean"),
        )
        .reset_index()[[*by, *LENS_SHARE_COLUMNS]]
    )
