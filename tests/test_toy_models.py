import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForQuestionAnswering, LlavaForConditionalGeneration

from notice.synthetic import TASK_VALUES, make_question
from notice.toy_models import LLAVA_PROMPT_TEMPLATE, ToyModelConfig, build_blip, build_llava

OPTIONS = [v for values in TASK_VALUES.values() for v in values]


def _image(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_blip_roundtrip_through_save_pretrained(tmp_path):
    model, processor = build_blip(ToyModelConfig())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = BlipForQuestionAnswering.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)

    inp = processor(images=_image(), text=make_question("colour", "red", "blue"), return_tensors="pt")
    inp2 = loaded_processor(images=_image(), text=make_question("colour", "red", "blue"), return_tensors="pt")
    assert inp.keys() == inp2.keys() and all(torch.equal(inp[k], inp2[k]) for k in inp)
    assert loaded_processor.tokenizer.convert_ids_to_tokens(inp["input_ids"][0]) == [
        "[CLS]", "is", "the", "object", "red", "or", "blue", "?", "[SEP]"]
    with torch.no_grad():
        assert torch.equal(model.generate(**inp, max_new_tokens=3), loaded.generate(**inp, max_new_tokens=3))
    # The decoder starts from [DEC] and stops at [SEP], as in Salesforce/blip-vqa-base.
    tok = loaded_processor.tokenizer
    assert loaded.config.text_config.bos_token_id == tok.convert_tokens_to_ids("[DEC]")
    assert loaded.config.text_config.sep_token_id == tok.sep_token_id


def test_llava_roundtrip_eager_attention(tmp_path):
    cfg = ToyModelConfig()
    model, processor = build_llava(cfg)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.config.vision_feature_layer == -1

    prompt = LLAVA_PROMPT_TEMPLATE.format(question=make_question("shape", "circle", "cross"))
    inp = loaded_processor(images=_image(), text=prompt, return_tensors="pt")
    image_token_id = loaded.config.image_token_index
    assert loaded_processor.image_token_id == image_token_id
    # <image> expands into one token per patch (the CLS token is dropped by the "default" strategy).
    assert int((inp["input_ids"] == image_token_id).sum()) == cfg.n_patches
    tokens = loaded_processor.tokenizer.convert_ids_to_tokens(inp["input_ids"][0])
    assert tokens[0] == "<s>" and tokens[-2:] == ["assistant", ":"]
    with torch.no_grad():
        out = loaded(**inp, output_attentions=True)
        ref = model(**processor(images=_image(), text=prompt, return_tensors="pt"))
    assert torch.equal(out.logits, ref.logits)
    n = inp["input_ids"].shape[1]
    assert len(out.attentions) == cfg.text_layers
    assert out.attentions[0].shape == (1, cfg.text_heads, n, n)


@pytest.mark.parametrize("family", ["blip", "llava"])
def test_every_option_is_one_token(family):
    _, processor = (build_blip if family == "blip" else build_llava)(ToyModelConfig())
    tok = processor.tokenizer
    for option in OPTIONS:
        ids = tok(option, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == option
        # Same token when the option stands inside a question (no context-dependent merges).
        assert ids[0] in tok(make_question("colour", option, "red"))["input_ids"]
    assert tok.unk_token_id not in tok(" ".join(OPTIONS))["input_ids"]


def test_builders_are_fast_and_seeded():
    import time

    start = time.perf_counter()
    a, _ = build_blip(ToyModelConfig(seed=1))
    b, _ = build_blip(ToyModelConfig(seed=1))
    c, _ = build_llava(ToyModelConfig(seed=2))
    assert time.perf_counter() - start < 3.0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # The larger init std (not BlipVisionConfig's 1e-10 default) reaches the position embeddings too.
    assert a.vision_model.embeddings.position_embedding.std() > 0.03
    assert c.model.language_model.embed_tokens.weight.std() > 0.03
