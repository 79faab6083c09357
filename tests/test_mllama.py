"""Llama 3.2 Vision's cross-attention layers (tiny random model): the fast engine runs them on the corrupt run's
image keys and masks (a row that skips them is far off; the decoder engine cannot run them), the default patch set
follows the layers' kinds, and what the model does with the text before the `<|image|>` placeholder."""

import pytest
import torch
from toy_adapters import QUESTION, clean_and_corrupt, noise_image, one_torch_thread, tiny_adapter

from notice.adapters.base import Patch, pre_hook_while_active
from notice.method.screen import image_effects
from notice.patching import corruptions, fast, reference
from notice.patching.attribution import IMAGE_SITE, attribution_estimates
from notice.patching.fast_decoder import DecoderFast
from notice.patching.fast_mllama import MllamaFast
from notice.patching.query_keys import patch_queries_keys
from notice.patching.sites import default_patches


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter("mllama", seed=3)


def image(seed: int):
    return noise_image(seed, size=40, height=24)


def placeholder(adapter, inp) -> int:
    return inp.input_ids[0].tolist().index(adapter.image_token_id)


class CrossAttentionSkipped(MllamaFast):
    """The wrong engine: the cross-attention layers of a patched row are the identity."""

    def run_layer(self, layer, h, entering, first_row, cos_sin, prefix):
        if layer in self.cross_attention_layers:
            return h
        return super().run_layer(layer, h, entering, first_row, cos_sin, prefix)


def test_the_default_patch_set_follows_the_layer_kinds(adapter):
    clean, _ = clean_and_corrupt(adapter, "SIP", image)
    cross = adapter.cross_attention_layers
    assert cross == [1, 3] and adapter.n_layers == 4
    patches = default_patches(adapter, clean, adapter.option_token_id("red"))
    T = clean.input_ids.shape[1]
    module_wise = {(p.site, p.layer) for p in patches if p.head < 0}
    mlp = {("mlp", layer) for layer in range(4)}
    assert module_wise == mlp | {("self_attn", 0), ("self_attn", 2), ("cross_attn", 1), ("cross_attn", 3)}
    # Every position, the placeholder too (the only trace of the image in the prompt).
    assert {p.position for p in patches if p.head < 0} == set(range(T))
    assert placeholder(adapter, clean) in adapter.patch_positions(clean)
    heads = [p for p in patches if p.head >= 0]
    assert {p.position for p in heads} == {T - 1}
    assert {(p.site, p.layer) for p in heads} == {
        ("self_attn_head", 0),
        ("cross_attn_head", 1),
        ("self_attn_head", 2),
        ("cross_attn_head", 3),
    }
    assert len(patches) == (4 + 2 + 2) * T + 4 * adapter.n_heads
    with pytest.raises(ValueError, match="layer 1 has no self_attn"):
        reference.patch_sample(adapter, clean, clean, [Patch("self_attn", 1, 0)], 5, 6)
    with pytest.raises(ValueError, match="layer 0 has no cross_attn"):
        adapter.site_module("cross_attn_head", 0)


@pytest.mark.parametrize("corruption", ["SIP", "noise"])
def test_rows_need_the_cross_attention_layers(adapter, corruption, monkeypatch):
    clean, corrupt = clean_and_corrupt(adapter, corruption, image)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    noise = corruptions.multiplicative_noise(nu=5.0, seed=3) if corruption == "noise" else None
    patches = default_patches(adapter, clean, tau)
    expected = reference.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise)
    rows = fast.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise, batch_size=16)
    assert fast.max_relative_error(rows, expected, floor=1.0) <= 1e-5
    monkeypatch.setattr(fast, "family_engine", lambda _adapter: CrossAttentionSkipped)
    skipped = fast.patch_sample(adapter, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise, batch_size=16)
    assert fast.max_relative_error(skipped, expected, floor=1.0) > 1e-2
    # The decoder engine calls every layer as a self-attention layer, which a cross-attention layer refuses.
    monkeypatch.setattr(fast, "family_engine", lambda _adapter: DecoderFast)
    self_attention_sites = [p for p in patches if p.site in ("mlp", "self_attn") and p.layer == 2]
    with pytest.raises(TypeError, match="cross_attention_states"):
        fast.patch_sample(adapter, clean, corrupt, self_attention_sites, tau, tau_p, corrupt_image_fn=noise)


def test_text_before_the_placeholder_attends_to_the_image_but_its_mlp_output_is_masked(adapter):
    """Positions before `<|image|>` see no tile in the processor's mask; the model then lifts their whole mask (they
    attend to every image key, padding tiles included) and zeroes only the cross-attention layers' MLP output."""
    clean, corrupt = clean_and_corrupt(adapter, "SIP", image)
    first = placeholder(adapter, clean)
    assert clean.tokens[:first] == ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>"]
    tiles = clean.extra["aspect_ratio_mask"][0, 0]
    seen = clean.extra["cross_attention_mask"][0, :, 0]
    assert (seen[:first] == 0).all() and (seen[first:] == tiles).all() and 0 < int(tiles.sum()) < len(tiles)

    layer = adapter.cross_attention_layers[0]
    block = adapter.layers[layer]
    record: dict = {}

    def on_layer(_module, args, kwargs):
        record["input"] = args[0][0]
        record["rows"] = kwargs["full_text_row_masked_out_mask"][0, 0, :, 0]

    def on_attention(_module, _args, output):
        record["attention"], record["probs"] = output[0][0], output[1][0]

    handle = block.cross_attn.register_forward_hook(on_attention)
    try:
        with pre_hook_while_active(block, on_layer), torch.no_grad():
            adapter.forward(clean)
    finally:
        handle.remove()
    assert record["rows"].tolist() == [0.0] * first + [1.0] * (len(seen) - first)
    # Attention over every key before the placeholder (padding tiles too), over the real tiles' keys after it.
    per_tile = adapter.model.model.vision_model.num_patches  # 16 patches and the [CLS]
    on_tile = record["probs"].sum(0).view(len(seen), len(tiles), per_tile).sum(-1)  # [T, tiles], summed over heads
    padding = tiles == 0
    assert (on_tile[:first][:, padding] > 0).all() and (on_tile[first:][:, padding] == 0).all()
    # Before the placeholder the layer adds only the gated attention: its MLP output is masked out.
    with torch.no_grad():
        after_attention = record["input"] + block.cross_attn_attn_gate.tanh() * record["attention"]
        mlp = block.mlp(block.post_attention_layernorm(after_attention))
        expected = after_attention + block.cross_attn_mlp_gate.tanh() * mlp * record["rows"][:, None]
    outputs = []  # the layer's output: the next layer's input
    with pre_hook_while_active(adapter.layers[layer + 1], lambda _m, args, _k: outputs.append(args[0][0])):
        with torch.no_grad():
            adapter.forward(clean)
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[0][:first], after_attention[:first], rtol=0, atol=1e-6)
    assert not torch.allclose(outputs[0][first:], after_attention[first:], atol=1e-3)
    # So the text before the image depends on the image: under SIP its cross-attention sites differ, and patching
    # one of them moves the score (not a no-op, unlike a token-fusion decoder's positions before its image).
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    patch = Patch("cross_attn", layer, 0)
    [row] = fast.patch_sample(adapter, clean, corrupt, [patch], tau, tau_p)
    assert abs(row["ld_patched"] - row["ld_corrupt"]) > 1e-4
    [expected_row] = reference.patch_sample(adapter, clean, corrupt, [patch], tau, tau_p)
    assert fast.max_relative_error([row], [expected_row], floor=1.0) <= 1e-5


@pytest.mark.parametrize(("width", "height", "tiles"), [(40, 24, (1, 2)), (64, 64, (2, 2)), (32, 64, (2, 1))])
def test_the_grid_is_the_canvas_of_tiles(adapter, width, height, tiles):
    inp = adapter.prepare(noise_image(0, size=width, height=height), adapter.format_prompt(QUESTION))
    rows, cols = tiles
    grid = adapter.image_grid(inp)
    side = 4  # 32-pixel tiles of 8-pixel patches
    assert (grid.rows, grid.cols) == (rows * side, cols * side)
    assert adapter.model_view(inp).shape == (rows * 32, cols * 32, 3)
    # Key of the patch at canvas row r, col c: its tile's [CLS] and patches (17 keys per tile) before it.
    r, c = grid.rows - 1, grid.cols - 1
    assert grid.keys[r * grid.cols + c] == (rows * cols - 1) * 17 + 1 + (side - 1) * side + (side - 1)
    assert max(grid.keys) < len(adapter.image_keys(inp)) == 4 * 17
    # The canvas is the tiles, row-major.
    last = adapter.pixels_view(inp.pixel_values[0, 0, rows * cols - 1])
    assert (adapter.model_view(inp)[-32:, -32:] == last).all()


def test_the_screen_covers_each_layer_kinds_sites_and_the_cross_attention_keys(adapter):
    clean, corrupt = clean_and_corrupt(adapter, "SIP", image)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    estimates = attribution_estimates(adapter, clean, corrupt, tau, tau_p)
    stream = {key for key in estimates.values if key[0] != IMAGE_SITE}
    assert stream == {
        *{("mlp", layer) for layer in range(4)},
        *{(site, layer) for site in ("self_attn", "self_attn_head") for layer in (0, 2)},
        *{
            (site, layer)
            for site in ("cross_attn", "cross_attn_head", "cross_attn_query", "cross_attn_key")
            for layer in (1, 3)
        },
    }
    assert estimates.values[("cross_attn_key", 1)].shape == (len(adapter.image_keys(clean)), 2)  # key/value heads
    effects = image_effects(adapter, estimates, clean)
    assert effects is not None and effects.shape == (2, len(adapter.image_grid(clean).keys))
    # A key site is patched exactly by one forward with that key clean; a key the last position cannot see (a
    # padding tile's) changes nothing.
    padding_key = len(adapter.image_keys(clean)) - 1
    [row] = patch_queries_keys(adapter, clean, corrupt, [Patch("cross_attn_key", 3, padding_key, 0)], tau, tau_p)
    assert row["ld_patched"] == row["ld_corrupt"]
    with pytest.raises(ValueError, match="layer 2 has no fusion attention"):
        patch_queries_keys(adapter, clean, corrupt, [Patch("cross_attn_key", 2, 0, 0)], tau, tau_p)
