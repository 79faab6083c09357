import json
import os
import re
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from toy_adapters import QUESTION, blip_adapter, llava_adapter, noise_image, one_torch_thread
from transformers import BertConfig, BertModel, LlamaTokenizer

from notice.adapters.llava import LlavaAdapter
from notice.adapters.loading import load_adapter
from notice.families import model_types
from notice.files.hub import ModelNotFoundError
from notice.patching.hooks import capture


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def blip():
    return blip_adapter()


@pytest.fixture(scope="module")
def llava():
    return llava_adapter()


def test_blip_architecture(blip):
    assert (blip.n_layers, blip.n_heads, blip.head_dim) == (2, 4, 8)
    assert blip.module_sites == ("mlp", "self_attn", "cross_attn") and blip.head_site == "cross_attn_head"


def test_llava_architecture_grouped_query(llava):
    attn = llava.model.model.language_model.layers[0].self_attn
    assert attn.num_key_value_groups == 2  # 4 query heads share 2 key/value heads
    assert (llava.n_layers, llava.n_heads, llava.head_dim) == (2, 4, 8)
    assert llava.module_sites == ("mlp", "self_attn") and llava.head_site == "self_attn_head"


def test_blip_answer_logits_are_the_first_decoder_step_of_generate(blip):
    inp = blip.prepare(noise_image(0), QUESTION)
    out = blip.model.generate(
        input_ids=inp.input_ids,
        pixel_values=inp.pixel_values,
        attention_mask=inp.attention_mask,
        max_new_tokens=5,
        do_sample=False,
        num_beams=1,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert int(out.sequences[0, 0]) == blip.model.config.text_config.bos_token_id
    torch.testing.assert_close(blip.answer_logits(inp), out.scores[0][0].float(), rtol=0, atol=1e-5)
    expected = blip.processor.tokenizer.decode(out.sequences[0], skip_special_tokens=True).strip()
    assert blip.generate_answer(inp) == expected


def test_blip_generate_stops_at_sep():
    adapter = blip_adapter(seed=5)
    sep = adapter.model.config.text_config.sep_token_id
    with torch.no_grad():
        adapter.model.text_decoder.cls.predictions.decoder.bias[sep] += 1e4
    inp = adapter.prepare(noise_image(0), QUESTION)
    assert adapter.generate_answer(inp) == ""
    assert int(adapter.answer_logits(inp).argmax()) == sep


def test_llava_answer_logits_are_the_last_position(llava):
    inp = llava.prepare(noise_image(0), llava.format_prompt(QUESTION))
    with torch.no_grad():
        full = llava.model(
            input_ids=inp.input_ids, attention_mask=inp.attention_mask, pixel_values=inp.pixel_values
        ).logits[0, -1]
    torch.testing.assert_close(llava.answer_logits(inp), full, rtol=0, atol=1e-6)
    first = llava.processor.tokenizer.decode([int(full.argmax())], skip_special_tokens=True).strip()
    assert llava.generate_answer(inp, max_new_tokens=1) == first


def test_blip_positions(blip):
    inp = blip.prepare(noise_image(0), QUESTION)
    assert inp.tokens[0] == "[CLS]" and inp.tokens[-1] == "[SEP]"
    assert blip.patch_positions(inp) == list(range(len(inp.tokens)))
    red = blip.option_token_id("red")
    assert inp.tokens[blip.head_position(inp, red)] == "red"
    with pytest.raises(ValueError, match="does not occur"):
        blip.head_position(inp, blip.option_token_id("blue"))


def test_blip_head_position_takes_first_occurrence_after_cls(blip):
    inp = blip.prepare(noise_image(0), "is the object red or red?")
    assert blip.head_position(inp, blip.option_token_id("red")) == 4


def test_llava_positions_skip_image_tokens(llava):
    inp = llava.prepare(noise_image(0), llava.format_prompt(QUESTION))
    image_id = llava.model.config.image_token_id
    positions = llava.patch_positions(inp)
    assert (inp.input_ids[0] == image_id).sum() == 16  # 32 px / patch 8 → 16 image tokens
    assert len(positions) == inp.input_ids.shape[1] - 16
    assert all(int(inp.input_ids[0, p]) != image_id for p in positions)
    assert positions[-1] == llava.head_position(inp, 0) == inp.input_ids.shape[1] - 1


def test_option_token_ids(blip, llava):
    assert blip.option_token_id("red") == blip.processor.tokenizer.convert_tokens_to_ids("red")
    assert llava.option_token_id("red") == llava.processor.tokenizer.convert_tokens_to_ids("red")


def _sentencepiece_llama_tokenizer() -> LlamaTokenizer:
    """A real Llama tokenizer class (Metaspace "▁" word pieces) with a BPE trained on a few lines."""
    corpus = ["USER: is the object red or green? Answer with one word. ASSISTANT: red", "reddish greenery"] * 10
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(bpe.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def test_llava_option_token_is_the_space_prefixed_piece_after_the_prompt(llava):
    tokenizer = _sentencepiece_llama_tokenizer()
    adapter = LlavaAdapter(llava.model, SimpleNamespace(tokenizer=tokenizer))
    assert adapter.option_token_id("red") == tokenizer.convert_tokens_to_ids("▁red")
    continuation = tokenizer.tokenize(" Answer with one word. ASSISTANT: greenery")
    assert adapter.option_token_id("greenery") == tokenizer.convert_tokens_to_ids(continuation[5])
    assert continuation[5].startswith("▁")


def test_sites_are_module_outputs_before_the_residual_add(llava):
    # Llama layer: out = in + o_proj(self_attn) + mlp; a residual-stream vector in a module site fails this.
    inp = llava.prepare(noise_image(0), llava.format_prompt(QUESTION))
    _, acts = capture(llava, inp, [("layer", 0), ("layer", 1), ("self_attn", 1), ("mlp", 1)])
    o_proj = llava.model.model.language_model.layers[1].self_attn.o_proj
    with torch.no_grad():
        rebuilt = acts[("layer", 0)] + o_proj(acts[("self_attn", 1)]) + acts[("mlp", 1)]
    torch.testing.assert_close(rebuilt, acts[("layer", 1)], rtol=0, atol=1e-5)


def test_blip_site_shapes(blip):
    inp = blip.prepare(noise_image(0), QUESTION)
    sites = [(s, 1) for s in ("mlp", "self_attn", "cross_attn", "layer")]
    _, acts = capture(blip, inp, sites)
    for key in sites:
        assert acts[key].shape == (inp.input_ids.shape[1], 32)
    assert blip.site_module("cross_attn_head", 1) == blip.site_module("cross_attn", 1)
    with pytest.raises(ValueError, match="unknown BLIP site"):
        blip.site_module("attn", 0)


@pytest.mark.parametrize("make", [blip_adapter, llava_adapter])
def test_save_pretrained_then_load_adapter(tmp_path, make):
    adapter = make()
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    loaded = load_adapter(str(tmp_path))
    assert type(loaded) is type(adapter)
    prompt = adapter.format_prompt(QUESTION)
    expected = adapter.answer_logits(adapter.prepare(noise_image(3), prompt))
    torch.testing.assert_close(
        loaded.answer_logits(loaded.prepare(noise_image(3), prompt)), expected, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("make", [blip_adapter, llava_adapter])
def test_tokenizing_adapter_has_no_weights_and_tokenises_like_the_model(tmp_path, make):
    adapter = make()
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    tokenizing = load_adapter(str(tmp_path), weights=False)
    assert tokenizing.device.type == "meta"
    assert (tokenizing.n_layers, tokenizing.n_heads, tokenizing.head_dim) == (
        adapter.n_layers,
        adapter.n_heads,
        adapter.head_dim,
    )
    prompt = tokenizing.format_prompt(QUESTION)
    assert prompt == adapter.format_prompt(QUESTION)
    assert [tokenizing.option_token_id(o) for o in ("red", "green")] == [
        adapter.option_token_id(o) for o in ("red", "green")
    ]
    assert tokenizing.processor.tokenizer(prompt)["input_ids"] == adapter.processor.tokenizer(prompt)["input_ids"]
    with pytest.raises((NotImplementedError, RuntimeError)):
        tokenizing.answer_logits(tokenizing.prepare(noise_image(3), prompt))


def test_model_id_found_in_the_hf_cache_named_by_hf_home(tmp_path):
    # The layout `huggingface-cli download` leaves: hub/models--<org>--<name>/{refs/main, snapshots/<rev>/}.
    adapter = blip_adapter()
    repo = tmp_path / "hub" / "models--toy-org--tiny-blip"
    snapshot = repo / "snapshots" / ("0" * 40)
    adapter.model.save_pretrained(snapshot)
    adapter.processor.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    code = "from notice.adapters.loading import load_adapter; print(type(load_adapter('toy-org/tiny-blip')).__name__)"
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "BlipAdapter"


def test_bogus_model_id_fails_fast_offline(monkeypatch):
    # Fast because nothing is asked of the network: any connection attempt fails the test.
    def no_network(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelNotFoundError, match=r"nobody-here/no-such-vlm.*HF_HOME.*local model directory"):
        load_adapter("nobody-here/no-such-vlm")


def test_missing_local_directory_fails(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_adapter(str(tmp_path / "missing"))


def test_unknown_model_type_lists_supported(tmp_path):
    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"'bert'.*{re.escape(str(model_types()))}"):
        load_adapter(str(tmp_path))


@pytest.mark.parametrize(("family", "tokenizer_adds_bos"), [("mistral3", True), ("mllama", False)])
def test_the_chat_prompt_has_one_bos(family, tokenizer_adds_bos):
    """A chat template that writes the BOS itself, for a tokenizer that adds one too, gives one BOS, not two: the
    chat prompt leaves it to the tokenizer; a tokenizer that adds none keeps the template's."""
    from toy_adapters import tiny_adapter

    adapter = tiny_adapter(family)
    tokenizer = adapter.processor.tokenizer
    rendered = adapter.rendered_chat_template()
    assert rendered.startswith(tokenizer.bos_token)
    prompt = adapter.chat_prompt_template()
    assert prompt == (rendered.removeprefix(tokenizer.bos_token) if tokenizer_adds_bos else rendered)
    ids = tokenizer(prompt.replace("{question}", "red"))["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
