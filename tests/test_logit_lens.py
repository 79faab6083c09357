"""The logit lens on image tokens (notice.flow.logit_lens), on a tiny random model of every family of the family
table (opt-in streams included).

Families whose image reaches the patched stream only through cross-attention are refused with a message naming
the family; for the others: the lens at the last layer is the model's own logits at the image positions (read
in chunks); a residual planted at the image positions of one layer (the unembedding row of a chosen token) is
found there; bfloat16 runs; `lens_shares` counts what the table says.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from toy_adapters import QUESTION, noise_image, one_torch_thread, tiny_adapter

from notice.families import family_names
from notice.flow import logit_lens as logit_lens_module
from notice.flow.logit_lens import LENS_SHARE_COLUMNS, LOGIT_LENS_COLUMNS, lens_shares, logit_lens
from notice.patching.hooks import hooked

TAU = 5  # an arbitrary answer token of the tiny vocabularies


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=family_names())
def adapter(request):
    return tiny_adapter(request.param, seed=3)


def prepared(adapter):
    return adapter.prepare(noise_image(0, size=40, height=24), adapter.format_prompt(QUESTION))


def image_by_cross_attention(adapter) -> bool:
    return adapter.head_site == "cross_attn_head"


def test_families_reading_the_image_by_cross_attention_are_refused_others_read_image_positions(adapter):
    inp = prepared(adapter)
    if image_by_cross_attention(adapter):
        with pytest.raises(NotImplementedError, match=f"{adapter.family}: the image reaches the patched stream"):
            logit_lens(adapter, inp, TAU, None)
        return
    grid = adapter.stream_image_grid(inp)
    assert set(inp.input_ids[0, list(grid.keys)].tolist()) == {adapter.image_token_id}
    table = logit_lens(adapter, inp, TAU, None)
    assert tuple(table.columns) == LOGIT_LENS_COLUMNS
    assert len(table) == adapter.n_layers * grid.rows * grid.cols
    first = table[table.layer == 0]
    assert first.position.tolist() == list(grid.keys)
    assert (first.row * grid.cols + first.col).tolist() == list(range(len(grid.keys)))
    assert table.object_in_top5.isna().all()
    assert (table.answer_in_top5 == (table.answer_rank <= 5)).all()


def test_the_last_layer_is_the_models_own_logits(adapter, monkeypatch):
    if image_by_cross_attention(adapter):
        pytest.skip("no logit lens where the image enters by cross-attention")
    inp = prepared(adapter)
    monkeypatch.setattr(logit_lens_module, "POSITIONS_PER_CHUNK", 3)  # chunks of positions, the last one short
    obj = TAU + 1
    table = logit_lens(adapter, inp, TAU, obj)
    with torch.no_grad():
        own = adapter.model(**inp.model_kwargs()).logits[0].float()  # [T, V], every position
    tokenizer = adapter.processor.tokenizer
    last = table[table.layer == adapter.n_layers - 1]
    for row in last.itertuples():
        logits = own[row.position]
        expected = tokenizer.convert_ids_to_tokens(logits.topk(5).indices.tolist())
        assert row.top_tokens == expected
        # The answer's rank, up to float32 rounding between the two routes (relative 1e-5).
        tol = 1e-5 * max(float(logits.abs().max()), 1.0)
        assert (
            1 + int((logits > logits[TAU] + tol).sum())
            <= row.answer_rank
            <= 1 + int((logits > logits[TAU] - tol).sum())
        )
        assert row.object_in_top5 == (obj in logits.topk(5).indices.tolist())


def test_a_direction_planted_at_the_image_positions_of_one_layer_is_found_there(adapter):
    if image_by_cross_attention(adapter):
        pytest.skip("no logit lens where the image enters by cross-attention")
    inp = prepared(adapter)
    layer = 1
    assert adapter.n_layers > layer
    with torch.no_grad():
        rows = adapter.lm_head.weight.detach()  # [V, D]: the unembedding direction of each token
        scores = adapter.final_logits(rows)  # what the score head makes of each direction
        top2 = scores.topk(2, dim=-1)
        wins = top2.indices[:, 0] == torch.arange(len(rows))
        margin = torch.where(wins, top2.values[:, 0] - top2.values[:, 1], torch.tensor(-1.0))
    token = int(margin.argmax())
    assert wins[token]  # some token's own direction makes it the top token
    positions = list(adapter.stream_image_grid(inp).keys)

    def plant(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[:, positions] = rows[token].to(hidden.dtype)
        return hidden

    module, kind = adapter.site_module("layer", layer)
    with hooked(module, kind, plant):
        table = logit_lens(adapter, inp, token, token)
    planted = table[table.layer == layer]
    assert (planted.answer_rank == 1).all() and planted.object_in_top5.all()
    shares = lens_shares(table).set_index("layer")
    assert shares.loc[layer, "answer_share"] == 1.0 and shares.loc[layer, "object_share"] == 1.0
    assert (table[table.layer == layer - 1].answer_rank > 1).any()  # not there before it was planted


def test_bfloat16_runs(adapter):
    if image_by_cross_attention(adapter):
        pytest.skip("no logit lens where the image enters by cross-attention")
    reference = logit_lens(adapter, prepared(adapter), TAU, TAU + 1)
    half = tiny_adapter(adapter.family, seed=3)
    half.model.to(torch.bfloat16)
    inp = prepared(half)
    assert inp.pixel_values.dtype == torch.bfloat16
    table = logit_lens(half, inp, TAU, TAU + 1)
    key = ["layer", "position", "row", "col"]
    pd.testing.assert_frame_equal(table[key], reference[key])
    assert (table.answer_rank >= 1).all() and (table.answer_in_top5 == (table.answer_rank <= 5)).all()


def test_lens_shares_counts_the_table_per_label_and_layer():
    table = pd.DataFrame(
        {
            "sample_id": ["a", "a", "a", "a", "b", "b"],
            "layer": [0, 0, 1, 1, 0, 0],
            "position": [3, 4, 3, 4, 3, 4],
            "row": [0, 0, 0, 0, 0, 0],
            "col": [0, 1, 0, 1, 0, 1],
            "top_tokens": [["x"]] * 6,
            "answer_rank": [1, 9, 2, 3, 7, 8],
            "answer_in_top5": [True, False, True, True, False, False],
            "object_in_top5": pd.array([True, True, False, True, None, None], dtype="boolean"),
        }
    )
    per_sample = lens_shares(table, by=["sample_id"])
    assert tuple(per_sample.columns) == ("sample_id", *LENS_SHARE_COLUMNS)
    assert per_sample.values.tolist()[:2] == [["a", 0, 2, 0.5, 1.0], ["a", 1, 2, 1.0, 0.5]]
    assert per_sample.iloc[2, :4].tolist() == ["b", 0, 2, 0.0] and np.isnan(per_sample.iloc[2, 4])
    pooled = lens_shares(table)
    assert pooled.values.tolist() == [[0, 4, 0.25, 1.0], [1, 2, 1.0, 0.5]]
