"""Token groups and attention knockout (notice.flow), on a tiny random model of every family of the family table.

For each family, opt-in streams included: the groups partition the stream's positions as documented; the fast
knockout engine equals the reference (one forward per row with the blocks in the model's attention) within 1e-5
(float32, relative to max(|ref|, 1)) for every edge kind the family has, with windows at layer 0 and ending at
the last layer (deeper models: windows in the middle too, Gemma 2's soft-capping and sliding windows); a block
of nothing is the base run bit for bit; a block that leaves a query no key is refused; in bfloat16 the fast
engine adds no error of its own. A planted toy: a decoder whose positions exchange information only through
one layer's attention; its image→last curve moves at exactly the windows that contain that layer.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from toy_adapters import QUESTION, knockout_refusal, noise_image, one_torch_thread, tiny_adapter

from notice.adapters.base import ModelInput, VLMAdapter
from notice.families import family_names
from notice.flow.groups import GROUPS, TokenGroups, token_groups
from notice.flow.knockout import (
    DEFAULT_EDGES,
    KNOCKOUT_COLUMNS,
    default_window,
    edge_blocks,
    knocked_logits,
    knockout_rows,
    parse_edges,
)
from notice.flow.knockout_suffix import Knockout

RTOL = 1e-5
# Every edge kind between the groups a query group can be: the default edges, and the image, the object and the
# other text reaching each other text group.
EDGES = DEFAULT_EDGES + ("image:text", "object:text", "text:question", "question:text", "question:last")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=family_names())
def adapter(request) -> VLMAdapter:
    adapter = tiny_adapter(request.param, seed=3)
    if refusal := knockout_refusal(adapter):  # the refusal itself: test_knockout_pair, the family's own tests
        pytest.skip(refusal)
    return adapter


def sample(adapter: VLMAdapter) -> tuple[ModelInput, TokenGroups, int, int]:
    """A prompt on a non-square image, its groups (the object: the image's top-left quarter), τ and τ'."""
    inp = adapter.prepare(noise_image(0, size=40, height=24), adapter.format_prompt(QUESTION))
    height, width = adapter.model_view(inp).shape[:2]
    mask = np.zeros((height, width), dtype=np.float32)
    mask[: height // 2, : width // 2] = 1.0
    groups = token_groups(adapter, inp, QUESTION, mask)
    return inp, groups, adapter.option_token_id("red"), adapter.option_token_id("green")


def edges_of(groups: TokenGroups) -> list[tuple[str, str]]:
    """The edge kinds of EDGES a family can knock out: a cross-attention family's whole image is every key of
    its cross-attention (refused), so its image edges are left to the object's."""
    edges = parse_edges(EDGES)
    return [(s, t) for s, t in dict.fromkeys(edges) if groups.image_keys_are_positions or s != "image"]


def relative_error(rows: pd.DataFrame, expected: pd.DataFrame) -> float:
    assert rows[["source", "target", "layer_start", "window"]].equals(
        expected[["source", "target", "layer_start", "window"]]
    )
    return max(
        float(((rows[c] - expected[c]).abs() / expected[c].abs().clip(lower=1.0)).max())
        for c in ("p_base", "p_knock", "ld_base", "ld_knock")
    )


# -- groups -------------------------------------------------------------------------------------------------------
def test_groups_partition_the_stream(adapter):
    inp, groups, _, _ = sample(adapter)
    stream = adapter.stream_positions(inp)
    in_stream = [g for g in GROUPS if groups.keys_in_stream(g) and g != "object"]
    seen = [p for g in in_stream for p in groups.positions[g]]
    assert sorted(seen) == sorted(stream) and len(seen) == len(set(seen))  # disjoint, every position once
    assert all(list(groups.positions[g]) == sorted(groups.positions[g]) for g in GROUPS)
    assert set(groups.positions["object"]) <= set(groups.positions["image"])
    assert groups.image_keys_are_positions == adapter.image_keys_are_positions
    question = groups.positions["question"]
    if question:  # the question's words, in order
        assert [inp.tokens[p].lstrip("▁Ġ").lower() for p in question] == QUESTION.replace("?", " ?").split()
    if groups.positions["last"]:
        assert groups.positions["last"] == (inp.input_ids.shape[1] - 1,)


class SentencepieceLike:
    """Words as "▁word" pieces when tokenised alone; a prompt may hold the first one without "▁" (after a
    newline), as Llama's tokenizer writes "\nIs" ."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.pieces.index("▁" + word) for word in text.split()]}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ")

    def tokenize(self, text: str) -> list[str]:
        return ["▁" + word for word in text.split()]


def test_the_question_is_found_when_its_first_token_merges_with_the_prompt():
    pieces = ["<s>", "▁USER:", "<0x0A>", "is", "▁is", "▁the", "▁object", "▁red", "▁ASSISTANT:"]
    tokenizer = SentencepieceLike(pieces)
    adapter = SimpleNamespace(processor=SimpleNamespace(tokenizer=tokenizer), family="sentencepiece-like")
    prompt = ["<s>", "▁USER:", "<0x0A>", "is", "▁the", "▁object", "▁red", "▁ASSISTANT:"]
    ids = torch.tensor([[pieces.index(p) for p in prompt]])
    inp = ModelInput(ids, torch.ones_like(ids), torch.zeros(1), prompt)
    assert VLMAdapter.question_positions(adapter, inp, "is the object red") == [3, 4, 5, 6]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a token run"):
        VLMAdapter.question_positions(adapter, inp, "the object is red")  # type: ignore[arg-type]


def test_the_object_is_the_patches_the_mask_overlaps(adapter):
    inp, groups, _, _ = sample(adapter)
    grid = adapter.image_grid(inp)
    if not groups.positions["object"]:  # image keys without a place on the image (query tokens): no object
        assert adapter.object_keys(inp, np.ones(adapter.model_view(inp).shape[:2])) == []
        assert not set(grid.keys) <= set(groups.positions["image"])
        return
    top_left = {grid.keys[r * grid.cols + c] for r in range(grid.rows) for c in range(grid.cols)
                if r < (grid.rows + 1) // 2 and c < (grid.cols + 1) // 2}  # fmt: skip
    assert set(groups.positions["object"]) == top_left


def test_a_group_the_family_has_no_place_for_is_empty():
    blip = tiny_adapter("blip", seed=3)
    inp, groups, _, _ = sample(blip)
    assert groups.positions["last"] == () and not groups.image_keys_are_positions
    qformer = tiny_adapter("blip2_qformer", seed=3)
    inp, groups, tau, tau_p = sample(qformer)
    assert groups.positions["question"] == groups.positions["last"] == ()
    rows = knockout_rows(qformer, inp, tau, tau_p, groups, "object:question,object:last,object:text", 1)
    assert set(rows["target"]) == {"text"}  # edges with an empty group give no rows


# -- edges and windows --------------------------------------------------------------------------------------------
def test_edges_and_windows_parse():
    assert parse_edges("image:question, image:last") == (("image", "question"), ("image", "last"))
    assert parse_edges(["object:last"]) == (("object", "last"),)
    for bad in ("image-question", "image:answer", "pixels:last"):
        with pytest.raises(ValueError, match=bad):
            parse_edges(f"image:last,{bad}")
    assert [default_window(n) for n in (1, 2, 4, 24, 32, 40)] == [1, 1, 1, 6, 8, 10]


# -- the engines ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("whole", [False, True], ids=["window-1", "window-all"])
def test_fast_equals_reference(adapter, whole):
    inp, groups, tau, tau_p = sample(adapter)
    window = adapter.n_layers if whole else 1
    edges = edges_of(groups)
    expected = knockout_rows(adapter, inp, tau, tau_p, groups, edges, window, engine="reference")
    rows = knockout_rows(adapter, inp, tau, tau_p, groups, edges, window, engine="fast", batch_size=5)
    assert list(rows.columns) == list(KNOCKOUT_COLUMNS)
    assert relative_error(rows, expected) <= RTOL
    # The fast engine's base run is the model's own, bit for bit (the suffix engine's capture runs it).
    assert rows["p_base"].equals(expected["p_base"]) and rows["ld_base"].equals(expected["ld_base"])
    live = [e for e in edges if groups.positions[e[0]] and groups.positions[e[1]]]
    assert len(rows) == len(live) * (adapter.n_layers - window + 1)
    assert [tuple(e) for e in rows[["source", "target"]].drop_duplicates().itertuples(index=False)] == live
    assert rows["layer_start"].min() == 0 and (rows["layer_start"] + rows["window"]).max() == adapter.n_layers
    # The comparison is meaningful: knockouts move the score.
    assert float((expected["ld_knock"] - expected["ld_base"]).abs().max()) > 1e-2


@pytest.mark.parametrize(
    "family, overrides",
    [
        pytest.param("llava", {"text_layers": 5}, id="llava-5-layers"),
        pytest.param("qwen2_vl", {"layers": 4}, id="qwen2_vl-4-layers"),
        pytest.param("blip", {"text_layers": 4}, id="blip-4-layers"),
        pytest.param("paligemma", {"layers": 4}, id="paligemma-4-layers"),
        pytest.param(
            "paligemma",
            {"kind": "paligemma2", "layers": 4, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
            id="paligemma2-softcap-window",
        ),
    ],
)
def test_fast_equals_reference_with_windows_in_the_middle(family, overrides):
    adapter = tiny_adapter(family, seed=3, **overrides)
    inp, groups, tau, tau_p = sample(adapter)
    edges = edges_of(groups)
    expected = knockout_rows(adapter, inp, tau, tau_p, groups, edges, 2, engine="reference")
    rows = knockout_rows(adapter, inp, tau, tau_p, groups, edges, 2, engine="fast", batch_size=7)
    assert relative_error(rows, expected) <= RTOL
    assert sorted(set(rows["layer_start"])) == list(range(adapter.n_layers - 1))


def test_a_block_of_nothing_is_the_base_run_bit_for_bit(adapter):
    inp, groups, _, _ = sample(adapter)
    own, fusion = edge_blocks(adapter, inp, groups, [])
    assert not own.any() and (fusion is None or not fusion.any())
    base = adapter.answer_logits(inp)
    for engine in ("fast", "reference"):
        rows = [Knockout(0, adapter.n_layers, own, fusion), Knockout(adapter.n_layers - 1, 1, own, fusion)]
        assert torch.equal(knocked_logits(adapter, inp, rows, engine), base.expand(2, -1))
    # The model's attention with the blocking machinery in place and nothing blocked is the model's own.
    layers = range(adapter.n_layers)
    with adapter.attention_blocks(
        {layer: own[None] for layer in layers}, {} if fusion is None else {layer: fusion[None] for layer in layers}
    ):
        assert torch.equal(adapter.answer_logits(inp), base)


def test_blocking_every_key_of_a_query_is_refused(adapter):
    inp, groups, tau, tau_p = sample(adapter)
    if groups.image_keys_are_positions:
        edge, message = "text:text", "own key"  # a query's own key: it may have no other
    else:
        edge, message = "image:text", "every cross-attention key"
    with pytest.raises(ValueError, match=message):
        knockout_rows(adapter, inp, tau, tau_p, groups, edge, 1)


def test_bad_windows_and_engines_are_refused():
    adapter = tiny_adapter("llava", seed=3)
    inp, groups, tau, tau_p = sample(adapter)
    for window in (0, adapter.n_layers + 1):
        with pytest.raises(ValueError, match="window"):
            knockout_rows(adapter, inp, tau, tau_p, groups, "image:last", window)
    with pytest.raises(ValueError, match="engine"):
        knockout_rows(adapter, inp, tau, tau_p, groups, "image:last", 1, engine="fastest")


@pytest.mark.parametrize("family", family_names())
def test_the_fast_engine_adds_no_error_of_its_own_in_bfloat16(family):
    half = tiny_adapter(family, seed=5)
    if refusal := knockout_refusal(half):
        pytest.skip(refusal)
    half = type(half)(half.model.to(torch.bfloat16), half.processor)
    truth = tiny_adapter(family, seed=5)
    truth = type(truth)(truth.model.to(torch.bfloat16).float(), truth.processor)  # the same weights in float32
    inp, groups, tau, tau_p = sample(half)
    inp32, groups32, _, _ = sample(truth)
    edges = edges_of(groups)
    exact = knockout_rows(truth, inp32, tau, tau_p, groups32, edges, 1, engine="reference")
    reference = knockout_rows(half, inp, tau, tau_p, groups, edges, 1, engine="reference")
    rows = knockout_rows(half, inp, tau, tau_p, groups, edges, 1, engine="fast")
    rounding = float((reference["ld_knock"] - exact["ld_knock"]).abs().max())
    assert rounding > 0  # bfloat16 rounds
    assert float((rows["ld_knock"] - reference["ld_knock"]).abs().max()) <= 2 * rounding


# -- the planted toy ------------------------------------------------------------------------------------------------
PLANTED_LAYER = 2


def planted_llava() -> VLMAdapter:
    """A 5-layer tiny LLaVA whose positions exchange information only in layer PLANTED_LAYER: every other layer's
    attention output projection is zero, so the image reaches the last position through that layer's attention
    and nowhere else."""
    adapter = tiny_adapter("llava", seed=4, text_layers=5)
    with torch.no_grad():
        for layer, block in enumerate(adapter.layers):
            if layer != PLANTED_LAYER:
                block.self_attn.o_proj.weight.zero_()
    return adapter


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_the_planted_layer_is_where_the_image_reaches_the_last_position(window, engine):
    adapter = planted_llava()
    inp, groups, _, _ = sample(adapter)
    # τ: the token the image raises most at the last position through the planted layer; τ': the one it lowers most.
    base = adapter.answer_logits(inp)
    own, _ = edge_blocks(adapter, inp, groups, [("image", "last")])
    blind = knocked_logits(adapter, inp, [Knockout(PLANTED_LAYER, 1, own)], "reference")[0]
    tau, tau_p = int((base - blind).argmax()), int((blind - base).argmax())
    rows = knockout_rows(adapter, inp, tau, tau_p, groups, "image:last", window, engine=engine)
    change = rows["ld_knock"] - rows["ld_base"]
    planted = (rows["layer_start"] <= PLANTED_LAYER) & (PLANTED_LAYER < rows["layer_start"] + window)
    assert bool(planted.any()) and bool((~planted).any())
    assert float(change[planted].max()) < -0.5  # the curve drops at every window holding the planted layer
    assert float(change[~planted].abs().max()) <= 1e-6  # and nowhere else
    assert (rows["relative_change"][planted] < 0).all()
