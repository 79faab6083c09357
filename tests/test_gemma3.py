"""Gemma 3: the prompt as the processor builds it, and the block-causal engine against the model's own attention.

The image's tokens (`token_type_ids` 1) attend to each other in both directions, text is causal, and sliding-window
layers alternate with global ones. A patch at an image token therefore reaches the image's earlier tokens one layer
later: an engine that starts a row at the patched position, or applies a causal mask to its recomputed positions,
is wrong there, and the block-causal engine (rows start at the image's first token, the model's masks in the
suffix) equals the reference at every position, also with a window shorter than the prompt or than the image.
"""

from collections.abc import Iterator

import pytest
import torch
from toy_adapters import clean_and_corrupt, noise_image, one_torch_thread, tiny_adapter

from notice.adapters.base import ModelInput, Patch
from notice.patching import fast, hooks, reference
from notice.patching.fast_block_causal import BlockCausalFast, row_starts
from notice.patching.fast_decoder import DecoderFast
from notice.patching.sites import default_patches

RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter("gemma3", seed=5)


def image(seed: int):
    return noise_image(seed, size=40, height=24)


def test_the_processor_wraps_the_image_in_newlines_and_markers_and_types_its_tokens(adapter):
    clean, _ = clean_and_corrupt(adapter, "SIP", image)
    tokens = clean.tokens
    image_positions = adapter.image_positions(clean)
    first, last = image_positions[0], image_positions[-1]
    assert image_positions == list(range(first, last + 1)) and len(image_positions) == 16
    assert tokens[:first] == ["<bos>", "<start_of_turn>", "user", "\n\n\n", "<start_of_image>"]  # "\n" + "\n\n"
    assert tokens[last + 1 : last + 3] == ["<end_of_image>", "\n\n"]
    assert tokens[-5:] == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert not adapter.prompt_template.startswith("<bos>")  # the tokenizer's BOS is the only one
    # token_type_ids reach the model's forward: 1 exactly at the image's tokens.
    assert clean.model_kwargs()["token_type_ids"][0].nonzero().flatten().tolist() == image_positions
    assert {first - 1, last + 1} <= set(adapter.patch_positions(clean))  # the markers are patched text
    patches = default_patches(adapter, clean, adapter.option_token_id("red"))
    assert {p.position for p in patches if p.head < 0} == set(adapter.patch_positions(clean))
    assert {p.position for p in patches if p.head >= 0} == {len(tokens) - 1}
    grid = adapter.image_grid(clean)
    assert (grid.rows, grid.cols) == (4, 4) and grid.keys == tuple(image_positions)


def layer_outputs(adapter, inp: ModelInput, patch: Patch, clean_acts) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's output [L, T, D] of `inp`, as it is and with `patch` (clean values `clean_acts`)."""
    sites = [("layer", layer) for layer in range(adapter.n_layers)]
    _, plain = hooks.capture(adapter, inp, sites)
    module, kind = adapter.site_module(patch.site, patch.layer)
    value = clean_acts[(patch.site, patch.layer)][patch.position]

    def overwrite(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[0, patch.position] = value
        return x

    with hooks.hooked(module, kind, overwrite):
        _, patched = hooks.capture(adapter, inp, sites)
    return torch.stack([plain[s] for s in sites]), torch.stack([patched[s] for s in sites])


def test_a_patch_at_an_image_token_reaches_the_images_earlier_tokens_one_layer_later(adapter):
    clean, corrupt = clean_and_corrupt(adapter, "SIP", image)
    image_positions = adapter.image_positions(clean)
    position = image_positions[len(image_positions) // 2]
    patch = Patch("mlp", 0, position)
    clean_acts = hooks.capture(adapter, clean, [("mlp", 0)])[1]
    plain, patched = layer_outputs(adapter, corrupt, patch, clean_acts)
    changed = [
        torch.nonzero((patched[layer] - plain[layer]).abs().amax(-1) > 1e-6).flatten().tolist() for layer in (0, 1)
    ]
    assert changed[0] == [position]
    assert changed[1] == list(range(image_positions[0], clean.input_ids.shape[1]))  # the whole image, then the text
    assert torch.equal(patched[:, : image_positions[0]], plain[:, : image_positions[0]])  # nothing before the image


def test_rows_start_at_the_patched_text_position_or_the_first_token_of_its_image(adapter):
    clean, corrupt = clean_and_corrupt(adapter, "SIP", image)
    engine = BlockCausalFast(adapter, clean, corrupt)
    image_positions = adapter.image_positions(clean)
    expected = [image_positions[0] if p in image_positions else p for p in range(clean.input_ids.shape[1])]
    assert engine.starts == expected


def test_row_starts_follow_the_masks_closure():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    blocks = causal.clone()
    blocks[1:3, 1:3] = True  # positions 1-2 one block
    blocks[4:6, 4:6] = True  # positions 4-5 another
    prefix = causal.clone()
    prefix[:4, :4] = True  # a bidirectional prefix of 4
    window = causal & ~causal.tril(-2)  # a window of 2, no block
    assert row_starts([causal]) == [0, 1, 2, 3, 4, 5]
    assert row_starts([blocks, causal]) == [0, 1, 1, 3, 4, 4]
    assert row_starts([prefix]) == [0, 0, 0, 0, 4, 5]
    assert row_starts([window, causal]) == [0, 1, 2, 3, 4, 5]
    # A chain of blocks that overlap, over two layers: each reaches back to the first.
    chained = causal.clone()
    chained[1:3, 1:3] = True
    chained[2:5, 2:5] = True
    assert row_starts([causal, chained]) == [0, 1, 1, 1, 1, 5]


class PatchedPositionStart(BlockCausalFast):
    """Wrong: a row starts at its patched position, as under causal attention."""

    def row_start(self, patch: Patch) -> int:
        return patch.position


class CausalSuffix(BlockCausalFast):
    """Wrong: rows start at the image's first token, but the recomputed positions attend causally."""

    def take_masks(self, masks) -> None:
        super().take_masks(masks)
        assert self.suffix_allowed is not None
        self.suffix_allowed = [allowed & allowed.tril() for allowed in self.suffix_allowed]


def logits_error(adapter, engine_class, clean, corrupt, patches) -> float:
    """The largest |logit − reference logit| / max(|reference logit|, 1) of the engine's rows for `patches`, over the
    whole vocabulary."""
    _, acts = hooks.capture(adapter, clean, sorted({(p.site, p.layer) for p in patches}))
    expected = torch.stack([reference.run_patched(adapter, corrupt, p, acts) for p in patches])
    logits = engine_class(adapter, clean, corrupt).run_rows(patches)
    return float(((logits - expected).abs() / expected.abs().clamp(min=1.0)).max())


def image_patches(adapter, inp: ModelInput) -> list[Patch]:
    """Every module site at every image position, in layer 0 (layer 1 carries them back, layer 2 to the score)."""
    return [Patch(site, 0, p) for site in ("mlp", "self_attn", "layer") for p in adapter.image_positions(inp)]


def test_treating_the_image_as_causal_is_wrong_and_the_block_causal_engine_is_exact(adapter):
    clean, corrupt = clean_and_corrupt(adapter, "SIP", image)
    patches = image_patches(adapter, clean)
    assert logits_error(adapter, BlockCausalFast, clean, corrupt, patches) <= RTOL
    assert logits_error(adapter, PatchedPositionStart, clean, corrupt, patches) > 1e-2  # 0.019
    assert logits_error(adapter, CausalSuffix, clean, corrupt, patches) > 1e-2  # 0.16


def test_the_causal_decoder_engine_refuses_the_image_blocks(adapter):
    clean, corrupt = clean_and_corrupt(adapter, "SIP", image)
    with pytest.raises(ValueError, match="attends to later positions .*fast_block_causal:BlockCausalFast"):
        DecoderFast(adapter, clean, corrupt)


@pytest.mark.parametrize("window", [4, 24, 512], ids=["shorter-than-the-image", "shorter-than-the-prompt", "longer"])
@pytest.mark.parametrize("corruption", ["SIP", "STR"])
def test_the_engine_is_exact_at_every_position_under_any_sliding_window(window, corruption):
    adapter = tiny_adapter("gemma3", seed=5, sliding_window=window)
    clean, corrupt = clean_and_corrupt(adapter, corruption, image)
    T = clean.input_ids.shape[1]
    masks = BlockCausalFast(adapter, clean, corrupt).suffix_allowed
    assert masks is not None
    sliding, full = masks[0], masks[1]  # the layer types alternate, a sliding one first
    assert bool((sliding != full).any()) == (window < T)  # the window masks something when shorter than the prompt
    options = ("green", "red") if corruption == "STR" else ("red", "green")
    tau, tau_p = (adapter.option_token_id(o) for o in options)
    patches = [Patch(site, layer, p) for site in ("mlp", "self_attn", "layer") for layer in range(3) for p in range(T)]
    patches += [Patch("self_attn_head", layer, p, h) for layer in range(3) for p in range(0, T, 5) for h in range(4)]
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p)
    rows = fast.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, batch_size=16)
    assert fast.max_relative_error(rows, expected, floor=1.0) <= RTOL
    assert max(abs(r["logit_diff"]) for r in expected) > 1e-2  # the patches move the score


def test_a_cache_that_drops_positions_is_refused():
    """The model's generation cache keeps only a window's last keys of a sliding layer; the engine keeps them all,
    and refuses a cache that does not."""
    adapter = tiny_adapter("gemma3", seed=5, sliding_window=4)
    clean, corrupt = clean_and_corrupt(adapter, "SIP", image)

    class GenerationCache(BlockCausalFast):
        def key_value_cache(self):
            return DecoderFast.key_value_cache(self)

    T = clean.input_ids.shape[1]
    with pytest.raises(NotImplementedError, match=f"layer 0's cache holds 3 of the prompt's {T} keys"):
        GenerationCache(adapter, clean, corrupt)
    assert {keys.shape[2] for keys in BlockCausalFast(adapter, clean, corrupt).prefix.keys} == {T}
