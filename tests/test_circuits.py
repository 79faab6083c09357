"""Circuits (notice.circuits): EAP is exact on a linear model; on a tiny model of every family the full circuit is the
clean run and the empty one the corrupt run, and one cut edge equals a hand-written hooked run of the same cut; a
path planted in a tiny LLaVA is what the smallest faithful circuit keeps.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from toy_adapters import QUESTION, STR_QUESTION, noise_image, one_torch_thread, tiny_adapter

from notice.adapters.base import VLMAdapter
from notice.circuits.ablation import Pair, circuit_ld, circuit_logits, faithfulness, record_pair
from notice.circuits.additive import supported
from notice.circuits.additive_runs import circuits_logits
from notice.circuits.attribution import edge_scores
from notice.circuits.faithfulness import edge_table, faithfulness_curve, smallest_faithful
from notice.circuits.graph import EDGE_GROUPS
from notice.circuits.runs import slot_module
from notice.families import family_names
from notice.flow.groups import token_groups
from notice.patching.hooks import hooked
from notice.patching.scores import logit_diff

ALL_FAMILIES = family_names(opt_in=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def image(seed: int):
    return noise_image(seed, size=40, height=24)


def sample(adapter: VLMAdapter, corruption: str, clean_seed: int = 0) -> Pair:
    clean = adapter.prepare(image(clean_seed), adapter.format_prompt(QUESTION))
    if corruption == "STR":
        corrupt = adapter.prepare(image(clean_seed), adapter.format_prompt(STR_QUESTION))
    else:
        corrupt = adapter.prepare(image(clean_seed + 1), adapter.format_prompt(QUESTION))
    return record_pair(adapter, clean, corrupt, token_groups(adapter, clean, QUESTION), 1, 2)


def edge_index(pair: Pair, upstream: str, reader: str, group: str) -> int:
    names = [pair.graph.edge_name(e) for e in range(pair.graph.n_edges)]
    return names.index(f"{upstream}->{reader}[{group}]")


def cut(pair: Pair, *edges: int) -> np.ndarray:
    kept = np.ones(pair.graph.n_edges, dtype=bool)
    kept[list(edges)] = False
    return kept


def hooked_ld(pair: Pair, replacements: dict) -> float:
    """LD of the clean input with each (module, kind) -> fn replacing that tensor: the hand-written run."""
    with ExitStack() as stack, torch.no_grad():
        for (module, kind), fn in replacements.items():
            stack.enter_context(hooked(module, kind, fn))
        return float(logit_diff(pair.adapter.answer_logits(pair.inp), pair.tau, pair.tau_p))


def rows_of(pair: Pair, group: str, n: int) -> torch.Tensor:
    return torch.as_tensor(pair.graph.groups_of_rows(n) == EDGE_GROUPS.index(group))


# -- a linear model: first order is exact ------------------------------------------------------------------------
def linear_llava() -> VLMAdapter:
    """The tiny LLaVA with nothing nonlinear after the image embeddings: norms are identities, queries and keys zero
    (every attention pattern is fixed), each MLP one linear map; float64."""
    adapter = tiny_adapter("llava", seed=3, std=0.2)
    language = adapter.language_model
    for layer in language.layers:
        layer.input_layernorm = torch.nn.Identity()
        layer.post_attention_layernorm = torch.nn.Identity()
        layer.self_attn.q_proj.weight.data.zero_()
        layer.self_attn.k_proj.weight.data.zero_()
        width = layer.mlp.down_proj.out_features
        layer.mlp = torch.nn.Linear(width, width)
    language.norm = torch.nn.Identity()
    adapter.model.double()
    return adapter


@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_eap_equals_exact_single_edge_ablation_on_a_linear_model(corruption):
    pair = sample(linear_llava(), corruption)
    assert supported(pair)  # scored in one backward pass; the per-reader way is checked too
    scores = edge_scores(pair, "eap")
    exact = np.array([circuit_ld(pair, cut(pair, e)) - pair.ld_clean for e in range(pair.graph.n_edges)])
    assert np.abs(exact).max() > 1e-2  # the cuts do something
    tolerance = 1e-5 * max(1.0, np.abs(exact).max())
    np.testing.assert_allclose(scores, exact, rtol=0, atol=tolerance)
    np.testing.assert_allclose(edge_scores(pair, "eap", per_reader=True), exact, rtol=0, atol=tolerance)
    # integrated gradients of a linear function are its gradient
    np.testing.assert_allclose(edge_scores(pair, "eap_ig", ig_steps=3), scores, rtol=0, atol=1e-9)


RESIDUAL_SUM = [name for name in ALL_FAMILIES if name in ("llava", "qwen2_vl", "internvl", "paligemma", "mistral3")]


@pytest.mark.parametrize("name", RESIDUAL_SUM)
@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_one_backward_scores_equal_the_per_reader_scores(name, corruption):
    """The residual-sum way (one backward per step) against the way every family takes (a forward per reader)."""
    pair = sample(tiny_adapter(name, seed=3), corruption)
    assert supported(pair)
    fast = edge_scores(pair, "eap_ig", ig_steps=3)
    reference = edge_scores(pair, "eap_ig", ig_steps=3, per_reader=True)
    assert np.abs(reference).max() > 1e-3
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-5 * max(1.0, np.abs(reference).max()))


@pytest.mark.parametrize("name", RESIDUAL_SUM)
def test_batched_circuit_runs_equal_the_reference_runs(name):
    """Several circuits in one forward (the residual sum's Δ per reader) against one reference run each."""
    pair = sample(tiny_adapter(name, seed=3), "SIP")
    n = pair.graph.n_edges
    rng = np.random.default_rng(0)
    circuits = [np.ones(n, bool), np.zeros(n, bool), *(rng.random(n) < share for share in (0.05, 0.5, 0.95))]
    fast = circuits_logits(pair, circuits)
    reference = torch.stack([circuit_logits(pair, kept) for kept in circuits])
    assert (reference[2:] - reference[0]).abs().max() > 1e-2  # the circuits differ
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5 * max(1.0, float(reference.abs().max())))


def test_models_that_are_no_residual_sum_take_the_per_reader_way():
    assert not supported(sample(tiny_adapter("blip", seed=3), "SIP"))
    assert not supported(sample(tiny_adapter("gemma3", seed=3), "SIP"))  # post-norms


def test_eap_is_not_exact_on_the_nonlinear_model():
    pair = sample(tiny_adapter("llava", seed=3), "SIP")
    scores = edge_scores(pair, "eap")
    exact = np.array([circuit_ld(pair, cut(pair, e)) - pair.ld_clean for e in range(0, pair.graph.n_edges, 7)])
    assert np.abs(scores[::7] - exact).max() > 1e-3


# -- every family: the full and the empty circuit, one cut edge by hand -------------------------------------------
@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family_adapter(request):
    return tiny_adapter(request.param, seed=3)


@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_full_circuit_is_clean_and_empty_circuit_is_corrupt(family_adapter, corruption):
    pair = sample(family_adapter, corruption)
    n = pair.graph.n_edges
    assert n > 0
    full = circuit_ld(pair, np.ones(n, dtype=bool))
    empty = circuit_ld(pair, np.zeros(n, dtype=bool))
    assert abs(full - pair.ld_clean) <= 1e-5 * max(1.0, abs(pair.ld_clean))
    assert abs(empty - pair.ld_corrupt) <= 1e-5 * max(1.0, abs(pair.ld_corrupt))
    assert abs(faithfulness(full, pair.ld_clean, pair.ld_corrupt) - 1) <= 1e-5
    assert abs(faithfulness(empty, pair.ld_clean, pair.ld_corrupt)) <= 1e-5


def test_cutting_the_last_module_into_the_logits_is_its_corrupt_output_there(family_adapter):
    """The last module node feeds the logits only: cutting its edge at a group is replacing its output at that
    group's rows by the corrupt run's."""
    pair = sample(family_adapter, "SIP")
    graph = pair.graph
    slot = [s for s in graph.order if s[0] == "module"][-1]
    node = f"L{slot[2]}.{slot[1]}"
    edges = [e for e in range(graph.n_edges) if graph.edge_name(e).startswith(f"{node}->logits[")]
    assert edges
    for edge in edges:
        group = EDGE_GROUPS[graph.edge_group[edge]]
        corrupt = pair.corrupt.values[slot]

        def replace(x, corrupt=corrupt, group=group):
            take = rows_of(pair, group, x.shape[-2])[:, None]
            return torch.where(take, corrupt, x)

        expected = hooked_ld(pair, {slot_module(pair.adapter, slot): replace})
        assert abs(circuit_ld(pair, cut(pair, edge)) - expected) <= 1e-5 * max(1.0, abs(expected))
        assert abs(expected - pair.ld_clean) > 1e-6 or group != "last"


def test_cutting_the_text_into_a_first_attention_query_is_its_corrupt_query_there(family_adapter):
    """Where only the inputs reach the first attention's queries, cutting the text's edge into head 0's query at a
    group is the corrupt prompt's query there (STR: the question differs)."""
    pair = sample(family_adapter, "STR")
    graph = pair.graph
    slot = next(s for s in graph.order if s[0] == "proj" and s[3] == 0)
    earlier = {s[0] for s in graph.order[: graph.order.index(slot)]}
    if earlier != {"input"}:
        pytest.skip(f"{pair.adapter.family}: nodes other than the inputs come before its first attention ({earlier})")
    reader = f"L{slot[2]}.{slot[1]}.H0.q"
    found = [e for e in range(graph.n_edges) if graph.edge_name(e).startswith(f"text->{reader}[")]
    if not found:
        pytest.skip(f"{pair.adapter.family}: the text enters after its stream (only the logits read it)")
    edge = found[0]
    group = EDGE_GROUPS[graph.edge_group[edge]]
    width = graph.reader_widths[slot]
    corrupt = pair.corrupt.values[slot]

    def replace(x):
        take = rows_of(pair, group, x.shape[-2])[:, None] & (torch.arange(x.shape[-1]) < width)
        return torch.where(take, corrupt, x)

    expected = hooked_ld(pair, {slot_module(pair.adapter, slot): replace})
    assert abs(circuit_ld(pair, cut(pair, edge)) - expected) <= 1e-5 * max(1.0, abs(expected))
    assert abs(expected - pair.ld_clean) > 1e-6


def test_cutting_a_head_into_a_later_mlp_by_hand():
    """LLaVA's decoder: an MLP reads the residual stream through its own norm, so cutting head h of layer 0 into
    layer 1's MLP adds W_o,h (z_h corrupt − z_h clean) to that norm's input only, at the group's positions (the
    hand-written run: a hook on the norm's input)."""
    adapter = tiny_adapter("llava", seed=3)
    pair = sample(adapter, "SIP")
    head, width = 1, adapter.head_dim
    layer0, layer1 = adapter.layers[0], adapter.layers[1]
    z_clean = pair.clean.values[("heads", "self_attn", 0, 0)]
    z_corrupt = pair.corrupt.values[("heads", "self_attn", 0, 0)]
    block = slice(head * width, (head + 1) * width)
    delta = (z_corrupt[..., block] - z_clean[..., block]) @ layer0.self_attn.o_proj.weight[:, block].T
    for group in ("image", "last"):
        take = rows_of(pair, group, delta.shape[-2])[:, None]
        expected = hooked_ld(
            pair, {(layer1.post_attention_layernorm, "input"): lambda x, take=take: x + torch.where(take, delta, 0)}
        )
        edge = edge_index(pair, f"L0.self_attn.H{head}", "L1.mlp", group)
        assert abs(circuit_ld(pair, cut(pair, edge)) - expected) <= 1e-5 * max(1.0, abs(expected))
        # the last layer's MLP reaches the answer at the last position only
        assert (abs(expected - pair.ld_clean) > 1e-6) == (group == "last")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_full_and_empty_circuits(dtype):
    adapter = tiny_adapter("llava", seed=3)
    adapter.model.to(dtype)
    pair = sample(adapter, "SIP")
    n = pair.graph.n_edges
    assert circuit_logits(pair, np.ones(n, dtype=bool)).dtype == torch.float32
    assert circuit_ld(pair, np.ones(n, dtype=bool)) == pair.ld_clean
    assert circuit_ld(pair, np.zeros(n, dtype=bool)) == pair.ld_corrupt
    scores = edge_scores(pair, "eap_ig", ig_steps=2)
    assert scores.dtype == np.float64 and np.isfinite(scores).all() and np.abs(scores).max() > 0
    # batched runs: the score head in float32 on every row
    batched = circuits_logits(pair, [np.ones(n, dtype=bool), np.zeros(n, dtype=bool)])
    assert batched.dtype == torch.float32 and batched.shape == (2, pair.clean.logits.shape[-1])
    reference = torch.stack(
        [circuit_logits(pair, np.ones(n, dtype=bool)), circuit_logits(pair, np.zeros(n, dtype=bool))]
    )
    assert (batched - reference).abs().max() <= 0.05 * float(reference.abs().max())  # half precision's rounding


# -- a planted path ------------------------------------------------------------------------------------------------
def planted_llava() -> VLMAdapter:
    """The tiny LLaVA (2 layers, 4 query heads, 2 key/value heads, width 32) wired so that the image reaches the
    answer through two heads only: the image embeddings live in dims 0-7, the text in 24-31; head 0 of layer 0
    reads dims 0-7 as values and writes dims 8-15; head 2 of layer 1 reads 8-15 and writes 16-23, the only dims the
    unembedding reads. Every other head writes nothing, MLPs write nothing, attention is uniform."""
    adapter = tiny_adapter("llava", seed=5, std=0.5)
    dims = {name: slice(8 * i, 8 * (i + 1)) for i, name in enumerate(("image", "a", "b", "text"))}

    def only_rows(weight: torch.Tensor, keep: slice) -> None:
        mask = torch.zeros(weight.shape[0], dtype=torch.bool)
        mask[keep] = True
        weight.data[~mask] = 0

    with torch.no_grad():
        projector = adapter.model.model.multi_modal_projector.linear_2
        only_rows(projector.weight, dims["image"])
        only_rows(projector.bias, dims["image"])
        embed = adapter.language_model.embed_tokens.weight
        embed.data[:, : dims["text"].start] = 0
        for layer, (head, kv, read, write) in enumerate([(0, 0, "image", "a"), (2, 1, "a", "b")]):
            attention = adapter.layers[layer].self_attn
            attention.q_proj.weight.zero_()
            attention.k_proj.weight.zero_()
            values = attention.v_proj.weight
            rows = slice(kv * 8, (kv + 1) * 8)
            keep = values[rows, dims[read]].clone()
            values.zero_()
            values[rows, dims[read]] = keep
            out = attention.o_proj.weight
            block = slice(head * 8, (head + 1) * 8)
            keep = out[dims[write], block].clone()
            out.zero_()
            out[dims[write], block] = keep
            adapter.layers[layer].mlp.down_proj.weight.zero_()
        head_weight = adapter.model.lm_head.weight
        head_weight.data[:, : dims["b"].start] = 0
        head_weight.data[:, dims["b"].stop :] = 0
    return adapter


def test_a_planted_path_is_in_the_smallest_faithful_circuit():
    adapter = planted_llava()
    pairs = []
    for seed in range(3):
        clean = adapter.prepare(image(10 * seed), adapter.format_prompt(QUESTION))
        corrupt = adapter.prepare(image(10 * seed + 1), adapter.format_prompt(QUESTION))
        clean_logits, corrupt_logits = adapter.answer_logits(clean), adapter.answer_logits(corrupt)
        tau = int(clean_logits.argmax())
        tau_p = int((corrupt_logits - 1e9 * (torch.arange(len(corrupt_logits)) == tau)).argmax())
        pairs.append(record_pair(adapter, clean, corrupt, token_groups(adapter, clean, QUESTION), tau, tau_p))
    assert all(abs(p.ld_clean - p.ld_corrupt) > 1e-2 for p in pairs)
    scores = {"eap_ig": [edge_scores(p, "eap_ig", 5) for p in pairs]}
    table = edge_table(pairs, scores)
    curve = faithfulness_curve(pairs, table, "score_eap_ig", 8)
    n, value = smallest_faithful(pairs, table, "score_eap_ig", curve, 0.9)
    assert value >= 0.9 and n < len(table) / 4
    ranked = table.reindex(table["score_eap_ig"].abs().sort_values(ascending=False, kind="stable").index)
    circuit = set(ranked["edge"].head(n))
    assert "image->L0.self_attn.H0.v[image]" in circuit  # key/value head 0 serves query head 0
    assert any(e.startswith("L0.self_attn.H0->L1.self_attn.H1.v[") for e in circuit)  # kv head 1: query head 2
    assert "L1.self_attn.H2->logits[last]" in circuit
