"""Half precision (docs/method.md, §6 "Precision"): on the tiny model of every family (opt-in streams too) in
bfloat16 and float16, the answer logits are the float32 score head applied to the model's own last hidden
state, and the fast engine adds no error beyond the reference engine's own in that dtype (against float32)."""

from __future__ import annotations

import random

import pytest
import torch
from toy_adapters import clean_and_corrupt, one_torch_thread, tiny_adapter

from notice.adapters.base import VLMAdapter
from notice.families import family_names
from notice.patching import fast, reference
from notice.patching.sites import default_patches

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def in_dtype(family: str, dtype: torch.dtype, truth: bool = False) -> VLMAdapter:
    """The family's tiny model (seed 5) with its weights rounded to `dtype`, in `dtype` (or with `truth`, those
    weights back in float32: the same model computed in full precision). Built afresh, not copied: a copy of a
    model would carry the hooks its first adapter installed."""
    adapter = tiny_adapter(family, seed=5)
    model = adapter.model.to(dtype)
    return type(adapter)(model.float() if truth else model, adapter.processor)


@pytest.fixture(scope="module", params=family_names())
def family_models(request) -> dict[tuple[torch.dtype, bool], VLMAdapter]:
    """(dtype, truth) -> the family's tiny model in bfloat16 / float16, and its full-precision truth."""
    return {(dtype, truth): in_dtype(request.param, dtype, truth) for dtype in HALF for truth in (False, True)}


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_scores_are_the_float32_head_on_the_models_own_hidden_state(family_models, dtype):
    adapter, full = family_models[dtype, False], family_models[dtype, True]
    assert adapter.upcast_scores and not full.upcast_scores
    clean, _ = clean_and_corrupt(adapter, "SIP")
    seen: list[torch.Tensor] = []
    handle = adapter.head_input_module().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        scores = adapter.answer_logits(clean)
    finally:
        handle.remove()
    assert scores.dtype == torch.float32 and len(seen) == 1 and seen[0].dtype == dtype
    # The float32 unembedding of the same hidden state: the head of the same model in float32.
    hidden = seen[0][:, -1].float()
    with torch.no_grad():
        expected = full.final_logits(hidden)[0]
        rounded = expected.to(dtype).float()  # what a score read from half-precision logits would be
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    assert not torch.equal(rounded, expected)


def test_full_precision_scores_are_the_models_own_logits():
    adapter = tiny_adapter("llava", seed=5)
    assert not adapter.upcast_scores and adapter.float32_module(adapter.lm_head) is adapter.lm_head
    clean, _ = clean_and_corrupt(adapter, "SIP")
    with torch.no_grad():
        own = adapter.forward(clean).logits[0, -1].float()  # the model's own head, as the adapter runs it
    assert torch.equal(adapter.answer_logits(clean), own)


def max_ld_error(rows: list[dict], truth: list[dict]) -> float:
    return max(
        abs(r[column] - t[column]) for r, t in zip(rows, truth) for column in ("ld_patched", "ld_clean", "ld_corrupt")
    )


@pytest.mark.parametrize("corruption", ["SIP", "STR"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fast_engine_adds_no_error_of_its_own_in_half_precision(family_models, dtype, corruption):
    adapter, truth_adapter = family_models[dtype, False], family_models[dtype, True]
    clean, corrupt = clean_and_corrupt(adapter, corruption)
    clean32, corrupt32 = clean_and_corrupt(truth_adapter, corruption)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    patches = default_patches(adapter, clean, tau)
    patches = random.Random(0).sample(patches, min(48, len(patches)))
    truth = reference.patch_sample(truth_adapter, clean32, corrupt32, patches, tau, tau_p)
    half_reference = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    half_fast = fast.patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    reference_error = max_ld_error(half_reference, truth)
    assert reference_error > 0  # half precision rounds
    assert max_ld_error(half_fast, half_reference) <= 2 * reference_error
