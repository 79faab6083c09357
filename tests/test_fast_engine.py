"""The fast patching engine equals the reference (oracle) engine on tiny random BLIP and LLaVA models.

Every site kind (module sites, the layer output, every head of both attention sites), every layer,
every position (LLaVA: every text position and image positions at the start, middle and end of the
image), both modalities (SIP: other image; STR: other equal-length prompt) and Gaussian noise on the
image embeddings. Patches are given in a shuffled order: rows must come back in that order.

Exactness is checked in float64, where only the algorithm could make the engines differ visibly (they
give identical float32 scores there), and in float32 with float32's rounding: the two engines multiply
matrices of different shapes (many patched rows at once), which rounds logits differently by ~1e-6,
so there an LD or probability below 1 is compared absolutely (`floor=1.0`), above 1 relatively. BLIP
keeps the reference's products, so it is also held to 2e-6 at a trained model's logit scale, where
any other summation order moves the scores by more.
"""

import random

import pytest
import torch
from toy_adapters import (
    blip_adapter,
    clean_and_corrupt,
    llava_adapter,
    one_torch_thread,
    patch_positions_with_image_samples,
)

from notice.adapters.base import Patch
from notice.patching import corruptions, hooks, reference, sites
from notice.patching.engines import ENGINES, get_engine
from notice.patching.fast import chunks, family_engine, max_relative_error, patch_sample
from notice.patching.query_keys import patch_queries_keys
from notice.patching.scores import ROW_COLUMNS

RTOL = 1e-5
FLOAT64_RTOL = 1e-10
TRAINED_SCALE_RTOL = 2e-6  # BLIP in float32 at a trained model's logit scale (well inside RTOL)

CONFIGS = [
    pytest.param((blip_adapter, dict(seed=0)), id="blip-4h-d8"),
    pytest.param((blip_adapter, dict(seed=1, text_heads=2, text_layers=3)), id="blip-2h-d16-3l"),
    pytest.param((blip_adapter, dict(seed=2, text_hidden=48, vision_hidden=48, text_heads=6)), id="blip-6h-d8"),
    pytest.param((llava_adapter, dict(seed=0)), id="llava-gqa-4q2kv"),
    pytest.param((llava_adapter, dict(seed=1, text_heads=8, text_kv_heads=1)), id="llava-mqa-8q1kv-d4"),
    pytest.param((llava_adapter, dict(seed=2, text_kv_heads=4, text_layers=3)), id="llava-mha-3l"),
    pytest.param((llava_adapter, dict(seed=3, text_hidden=48, text_heads=6, text_kv_heads=3)), id="llava-gqa-6q3kv-d8"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=CONFIGS)
def adapter(request):
    make, kwargs = request.param
    return make(**kwargs)


def inputs(adapter, corruption: str):
    return clean_and_corrupt(adapter, corruption)


def every_patch(adapter, inp, seed: int = 0) -> list[Patch]:
    """Every site kind × layer × position (× head), shuffled."""
    head_sites = [f"{site}_head" for site in adapter.module_sites if site != "mlp"]
    patches = [
        Patch(site, layer, pos)
        for site in (*adapter.module_sites, "layer")
        for layer in range(adapter.n_layers)
        for pos in patch_positions_with_image_samples(adapter, inp)
    ] + [
        Patch(site, layer, pos, head)
        for site in head_sites
        for layer in range(adapter.n_layers)
        for pos in patch_positions_with_image_samples(adapter, inp)
        for head in range(adapter.n_heads)
    ]
    random.Random(seed).shuffle(patches)
    return patches


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_fast_equals_reference(adapter, corruption, dtype):
    adapter.model.to(dtype)
    clean, corrupt = inputs(adapter, corruption)
    # The answer token sits at a different question position in each modality.
    options = ("red", "green") if corruption == "SIP" else ("green", "red")
    tau, tau_p = (adapter.option_token_id(o) for o in options)
    patches = every_patch(adapter, clean)
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    rows = patch_sample(adapter, clean, corrupt, patches, tau, tau_p, batch_size=16)
    assert [list(r) for r in rows] == [list(r) for r in expected] == [list(ROW_COLUMNS)] * len(patches)
    if dtype == torch.float64:
        assert max_relative_error(rows, expected) <= FLOAT64_RTOL
    else:
        assert max_relative_error(rows, expected, floor=1.0) <= RTOL
    # The comparison is meaningful: patching moves the score.
    assert max(abs(r["logit_diff"]) for r in expected) > 1e-2


@pytest.mark.parametrize("make", [blip_adapter, llava_adapter], ids=["blip", "llava"])
def test_gaussian_noise_and_cached_clean_run(make):
    adapter = make(seed=4)
    clean, corrupt = inputs(adapter, "noise")
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    noise = corruptions.multiplicative_noise(nu=5.0, seed=3)
    patches = every_patch(adapter, clean)[::3]
    cached = hooks.capture(adapter, clean, [sites.activation_key(p.site, p.layer) for p in patches])
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise)
    rows = patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise, clean=cached)
    assert max_relative_error(rows, expected) <= RTOL
    assert abs(expected[0]["ld_clean"] - expected[0]["ld_corrupt"]) > 1e-3


@pytest.mark.parametrize("corruption", ["SIP", "STR", "noise"])
def test_blip_float32_rows_equal_reference_at_trained_scale(corruption):
    # Weights at std 0.6 give LDs of several units (logits up to ~9), like a trained model, where
    # the last bits of every product reach the scores: a batched decoder step or a product of fewer
    # rows than the reference's moved LD by 5e-6 to 4e-5. Few-row chunks (3) and the default size.
    adapter = blip_adapter(seed=1, std=0.6)
    clean, corrupt = inputs(adapter, corruption)
    options = ("green", "red") if corruption == "STR" else ("red", "green")
    tau, tau_p = (adapter.option_token_id(o) for o in options)
    noise = corruptions.multiplicative_noise(nu=5.0, seed=3) if corruption == "noise" else None
    patches = every_patch(adapter, clean)
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise)
    assert max(abs(r["ld_patched"]) for r in expected) > 2
    for batch_size in (3, 64):
        rows = patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise, batch_size=batch_size)
        for column in ("ld_patched", "logit_diff"):
            err = max(abs(r[column] - e[column]) / max(abs(e[column]), 1.0) for r, e in zip(rows, expected))
            assert err <= TRAINED_SCALE_RTOL, (batch_size, column, err)


@pytest.mark.parametrize("make", [blip_adapter, llava_adapter], ids=["blip", "llava"])
def test_rows_do_not_depend_on_batching(make):
    adapter = make(seed=5)
    clean, corrupt = inputs(adapter, "SIP")
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    patches = sites.default_patches(adapter, clean, tau)
    one = patch_sample(adapter, clean, corrupt, patches, tau, tau_p, batch_size=1)
    many = patch_sample(adapter, clean, corrupt, patches, tau, tau_p, batch_size=5)
    tiny_memory = patch_sample(adapter, clean, corrupt, patches, tau, tau_p, memory_budget=1)
    # float32: values below 1 compared absolutely, as everywhere in this file (the decoder engine
    # runs the model's own layers, whose products round differently with the number of rows).
    assert max_relative_error(many, one, floor=1.0) <= RTOL and max_relative_error(tiny_memory, one, floor=1.0) <= RTOL


def test_chunks_respect_batch_size_and_memory():
    adapter = llava_adapter(seed=0)
    clean, corrupt = inputs(adapter, "SIP")
    engine = family_engine(adapter)(adapter, clean, corrupt)
    patches = [Patch("mlp", 0, p) for p in adapter.patch_positions(clean)]
    order = list(range(len(patches)))
    sizes = [len(c) for c in chunks(engine, patches, order, 4, 1 << 40)]
    assert set(sizes[:-1]) == {4} and 1 <= sizes[-1] <= 4
    assert all(len(c) == 1 for c in chunks(engine, patches, order, 64, 1))
    assert [i for c in chunks(engine, patches, order, 3, 1 << 40) for i in c] == order


def test_noop_patches_are_detected():
    # Under SIP, LLaVA's text before the image sees the same tokens in both runs.
    adapter = llava_adapter(seed=0)
    clean, corrupt = inputs(adapter, "SIP")
    engine = family_engine(adapter)(adapter, clean, corrupt)
    first_image = int((clean.input_ids[0] == adapter.model.config.image_token_id).nonzero()[0])
    assert all(engine.is_noop(Patch("mlp", 0, p)) for p in range(first_image))
    assert not engine.is_noop(Patch("mlp", 0, clean.input_ids.shape[1] - 1))


def test_invalid_patches_are_rejected():
    adapter = blip_adapter(seed=0)
    clean, corrupt = inputs(adapter, "SIP")
    with pytest.raises(ValueError, match="head"):
        patch_sample(adapter, clean, corrupt, [Patch("cross_attn_head", 0, 1, adapter.n_heads)], 5, 6)
    with pytest.raises(ValueError, match="layer"):
        patch_sample(adapter, clean, corrupt, [Patch("mlp", adapter.n_layers, 1)], 5, 6)
    _, longer = inputs(adapter, "SIP")
    longer.input_ids = torch.cat([longer.input_ids, longer.input_ids[:, -1:]], dim=1)
    with pytest.raises(ValueError, match="token lengths"):
        patch_sample(adapter, clean, longer, [Patch("mlp", 0, 1)], 5, 6)


def test_get_engine_routes_query_and_key_sites_to_the_attention_taps():
    adapter = llava_adapter(seed=0)
    clean, corrupt = inputs(adapter, "SIP")
    last = clean.input_ids.shape[1] - 1
    patches = [
        Patch("mlp", 0, last - 2),
        Patch("self_attn_query", 1, last, 2),
        Patch("self_attn_head", 1, last, 0),
        Patch("self_attn_key", 0, 3, 1),
    ]
    hooked = reference.patch_sample(adapter, clean, corrupt, [patches[0], patches[2]], 5, 6)
    tapped = patch_queries_keys(adapter, clean, corrupt, [patches[1], patches[3]], 5, 6)
    for name in ENGINES:
        rows = get_engine(name, 4)(adapter, clean, corrupt, patches, 5, 6)
        assert [(r["site"], r["layer"], r["position"], r["head"]) for r in rows] == [
            (p.site, p.layer, p.position, p.head) for p in patches
        ]
        assert rows[1] == tapped[0] and rows[3] == tapped[1]
        assert max_relative_error([rows[0], rows[2]], hooked, floor=1.0) <= 1e-5
    assert any(r["ld_patched"] != r["ld_corrupt"] for r in tapped)
    with pytest.raises(ValueError, match="patching.engine"):
        get_engine("nope", 4)
