"""BLIP-2 / InstructBLIP: the opt-in Q-Former stream (the contract test covers the language-model stream),
choosing it by name, OPT's sites, the head-function attention carried onto the patch grid, and the refusal
of encoder-decoder language models."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_adapters import QUESTION, STR_QUESTION, clean_and_corrupt, noise_image, one_torch_thread, reinit
from transformers import Blip2Config, Blip2ForConditionalGeneration

from notice.__main__ import main
from notice.adapters.base import HEAD_SITE_PARENT, Patch
from notice.adapters.blip2 import (
    Blip2Adapter,
    Blip2QFormerAdapter,
    InstructBlipAdapter,
    InstructBlipQFormerAdapter,
    QFormerStreamAdapter,
)
from notice.adapters.loading import load_adapter
from notice.files.tables import RESULT_COLUMNS, read_table
from notice.method.attention import image_attention
from notice.patching import corruptions, fast, hooks, reference
from notice.testing import tiny_blip2
from notice.workflow.runtime import load_model

STREAMS = {
    "blip2_qformer": ("blip2", Blip2QFormerAdapter),
    "instructblip_qformer": ("instructblip", InstructBlipQFormerAdapter),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def tiny(kind: str, adapter_cls: type, seed: int = 3):
    model, processor = tiny_blip2.build(kind, seed=seed)
    return adapter_cls(reinit(model, 0.3, seed), processor)


@pytest.fixture(scope="module", params=sorted(STREAMS))
def qformer(request) -> QFormerStreamAdapter:
    kind, adapter_cls = STREAMS[request.param]
    return tiny(kind, adapter_cls)


def image(seed: int):
    return noise_image(seed, size=40, height=24)


def every_patch(adapter, inp) -> list[Patch]:
    positions = adapter.patch_positions(inp)
    patches = [
        Patch(site, layer, p)
        for site in (*adapter.module_sites, "layer")
        for layer in range(adapter.n_layers)
        for p in positions
    ]
    patches += [
        Patch(adapter.head_site, layer, p, head)
        for layer in range(adapter.n_layers)
        for p in positions
        for head in range(adapter.n_heads)
    ]
    random.Random(0).shuffle(patches)
    return patches


def test_qformer_stream_layout(qformer):
    clean, _ = clean_and_corrupt(qformer, "SIP", image)
    # Cross-attention every 2nd layer of the 3-layer Q-Former; the queries are the prompt's first 4 tokens.
    assert qformer.stream_layers == [0, 2] and qformer.n_layers == 2
    assert qformer.patch_positions(clean) == [0, 1, 2, 3] and clean.tokens[:4] == ["<image>"] * 4
    assert qformer.head_position(clean, qformer.option_token_id("red")) == 0
    sites = [(site, layer) for site in (*qformer.module_sites, "layer") for layer in range(qformer.n_layers)]
    _, acts = hooks.capture(qformer, clean, sites)
    for site, layer in sites:
        assert acts[(site, layer)].shape[-1] == qformer.site_width(site) == 32, (site, layer)
        assert acts[(site, layer)].shape[0] >= 4
    grid = qformer.image_grid(clean)
    assert (grid.rows, grid.cols, grid.keys[0]) == (4, 4, 1)  # key 0 is the image [CLS]


def test_qformer_self_patch_and_heads(qformer):
    clean, corrupt = clean_and_corrupt(qformer, "SIP", image)
    patches = every_patch(qformer, clean)[::5]
    logits, acts = hooks.capture(qformer, clean, [(p.site, p.layer) for p in patches])
    for patch in patches:
        assert torch.equal(reference.run_patched(qformer, clean, patch, acts), logits), patch
    parent = HEAD_SITE_PARENT[qformer.head_site]
    _, acts = hooks.capture(qformer, clean, [(parent, layer) for layer in range(qformer.n_layers)])
    for layer in range(qformer.n_layers):
        site = reference.run_patched(qformer, corrupt, Patch(parent, layer, 0), acts)
        heads = [Patch(qformer.head_site, layer, 0, h) for h in range(qformer.n_heads)]
        torch.testing.assert_close(reference.run_patched(qformer, corrupt, heads, acts), site, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("corruption", ["SIP", "STR", "noise"])
def test_qformer_fast_equals_reference(qformer, corruption):
    clean, corrupt = clean_and_corrupt(qformer, corruption, image)
    options = ("green", "red") if corruption == "STR" else ("red", "green")
    tau, tau_p = (qformer.option_token_id(o) for o in options)
    noise = corruptions.multiplicative_noise(nu=5.0, seed=3) if corruption == "noise" else None
    patches = every_patch(qformer, clean)
    expected = reference.patch_sample(qformer, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise)
    rows = fast.patch_sample(qformer, clean, corrupt, patches, tau, tau_p, corrupt_image_fn=noise, batch_size=16)
    assert fast.max_relative_error(rows, expected, floor=1.0) <= 1e-5
    assert abs(expected[0]["ld_clean"] - expected[0]["ld_corrupt"]) > 1e-3
    if corruption == "STR" and qformer.family == "blip2_qformer":
        # BLIP-2's Q-Former never reads the prompt: no patch in it can undo a text corruption.
        assert all(r["ld_patched"] == r["ld_corrupt"] for r in rows + expected)
    else:
        assert max(abs(r["logit_diff"]) for r in expected) > 1e-2


def test_the_adapter_key_chooses_the_stream(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = tiny("instructblip", InstructBlipQFormerAdapter)
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    assert type(load_adapter(str(tmp_path))) is InstructBlipAdapter  # the language model's stream by default
    loaded = load_model(
        str(tmp_path), {"device": "cpu", "dtype": "float32", "prompt_template": None, "adapter": "instructblip_qformer"}
    )
    assert type(loaded) is InstructBlipQFormerAdapter
    inp = loaded.prepare(noise_image(0), loaded.format_prompt(QUESTION))
    torch.testing.assert_close(
        loaded.answer_logits(inp),
        adapter.answer_logits(adapter.prepare(noise_image(0), adapter.format_prompt(QUESTION))),
    )
    with pytest.raises(ValueError, match=r"adapter 'blip2_qformer' takes model types \['blip-2'\].*'instructblip'"):
        load_adapter(str(tmp_path), adapter="blip2_qformer", weights=False)


def test_patch_pair_takes_the_adapter(tmp_path, capsys):
    adapter = tiny("blip2", Blip2QFormerAdapter)
    adapter.model.save_pretrained(tmp_path / "model")
    adapter.processor.save_pretrained(tmp_path / "model")
    noise_image(0).save(tmp_path / "clean.png")
    args = ["--model", str(tmp_path / "model"), "--image", str(tmp_path / "clean.png"), "--question", QUESTION]
    args += ["--answer", "red", "--distractor", "green", "--corrupt-question", STR_QUESTION, "--noise-seed", "1"]
    out = tmp_path / "rows.parquet"
    assert main(["patch-pair", *args, "--out", str(out), "--adapter", "blip2_qformer"]) == 0
    rows = read_table(out, RESULT_COLUMNS)
    assert set(rows.position) == {0, 1, 2, 3} and set(rows.site) == {
        "mlp",
        "self_attn",
        "cross_attn",
        "cross_attn_head",
    }
    capsys.readouterr()
    assert main(["patch-pair", *args, "--out", str(tmp_path / "bad.parquet"), "--adapter", "nope"]) == 2
    assert "unknown adapter 'nope'" in capsys.readouterr().err


def test_opt_mlp_site_is_the_mlp_output_per_token():
    adapter = tiny("blip2", Blip2Adapter)
    inp = adapter.prepare(noise_image(0), adapter.format_prompt(QUESTION))
    _, acts = hooks.capture(adapter, inp, [("layer", 0), ("layer", 1), ("self_attn", 1), ("mlp", 1)])
    out_proj = adapter.layers[1].self_attn.out_proj
    with torch.no_grad():
        rebuilt = acts[("layer", 0)] + out_proj(acts[("self_attn", 1)]) + acts[("mlp", 1)]
    torch.testing.assert_close(rebuilt, acts[("layer", 1)], rtol=0, atol=1e-5)
    assert len(adapter.layers[1]._forward_pre_hooks) == 1
    Blip2Adapter(adapter.model, adapter.processor)  # a second adapter reuses the per-token views
    assert len(adapter.layers[1]._forward_pre_hooks) == 1


def test_language_model_attention_is_carried_onto_the_patch_grid():
    adapter = tiny("instructblip", InstructBlipAdapter)
    inp = adapter.prepare(noise_image(0), adapter.format_prompt(QUESTION))
    queries = adapter.attention_queries(inp)
    lm_probs, cross = {}, []
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: lm_probs.__setitem__(i, out[1][0]))
        for i, layer in enumerate(adapter.layers)
    ]
    hooks += [
        layer.crossattention.attention.register_forward_hook(lambda m, a, out: cross.append(out[1][0]))
        for layer in adapter.qformer_layers
        if layer.has_cross_attention
    ]
    adapter.answer_logits(inp)
    for hook in hooks:
        hook.remove()
    footprint = torch.stack(cross).mean(0).mean(0)[:, 1:]  # [Q, P]: mean over layers and heads, no [CLS]
    attention = image_attention(adapter, inp)
    for layer in range(adapter.n_layers):
        expected = lm_probs[layer][:, queries, :4] @ footprint  # [H, queries, P]
        torch.testing.assert_close(attention.raw[layer], expected, rtol=1e-5, atol=1e-6)
    assert attention.grid == (4, 4) and bool((attention.mass < 1).all())
    # Every hook the attention stage installed is gone again.
    assert not any(layer.self_attn._forward_hooks for layer in adapter.layers)
    assert not any(layer.crossattention.attention._forward_hooks for layer in adapter.qformer_layers[::2])


def test_encoder_decoder_language_models_are_refused():
    config = Blip2Config(
        text_config=dict(model_type="t5", d_model=8, d_ff=16, num_layers=1, num_heads=2, vocab_size=16),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        qformer_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
    )
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    with pytest.raises(ValueError, match="'t5', an encoder-decoder"):
        Blip2Adapter(model, processor=None, prompt_template="{question}")


def test_qformer_attention_records(qformer, tmp_path: Path):
    inp = qformer.prepare(noise_image(0, size=32), qformer.format_prompt(QUESTION))
    attention = image_attention(qformer, inp)
    assert attention.weights.shape == (2, 4, 4, 16) and attention.query_positions == [0, 1, 2, 3]
    np.testing.assert_allclose(attention.weights.sum(-1).numpy(), 1.0, atol=1e-5)


def test_qformer_stream_attention_taps_and_screen(qformer):
    from notice.patching.attribution import attribution_estimates
    from notice.patching.query_keys import patch_queries_keys

    clean, corrupt = clean_and_corrupt(qformer, "SIP", image)
    seen = {}

    class PassThrough:
        def query(self, layer, query):
            return query

        def key(self, layer, key):
            seen[layer] = key
            return key

        def probs(self, layer, probs, scaling, mask, softcap):
            return probs

    with qformer.attention_taps(PassThrough()):
        tapped = qformer.answer_logits(clean)
    assert torch.equal(tapped, qformer.answer_logits(clean)) and sorted(seen) == list(range(qformer.n_layers))
    estimates = attribution_estimates(qformer, clean, corrupt, 5, 6, method="atp_star", grad_drop=False)
    keys = estimates.values[("cross_attn_key", 0)]
    assert keys.shape == (seen[0].shape[2], qformer.n_heads) and keys.abs().max() > 0
    # a key patched through the tap = the key projection's output patched by hand, in that head's slice
    [row] = patch_queries_keys(qformer, clean, corrupt, [Patch("cross_attn_key", 1, 3, 1)], 5, 6)
    projection = qformer.fusion_attention_modules()[1].key
    dims = slice(qformer.head_dim, 2 * qformer.head_dim)
    captured = {}
    with hooks.hooked(projection, "output", lambda x: captured.setdefault("clean", x.clone())):
        qformer.answer_logits(clean)

    def overwrite(x):
        x = x.clone()
        x[0, 3, dims] = captured["clean"][0, 3, dims]
        return x

    with hooks.hooked(projection, "output", overwrite):
        logits = qformer.answer_logits(corrupt)
    assert abs(row["ld_patched"] - float(logits[5] - logits[6])) < 1e-5
