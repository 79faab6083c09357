import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForQuestionAnswering, LlavaForConditionalGeneration

from notice.data.synthetic import TASK_VALUES, make_question
from notice.demo.blip_toy import blip_decoder_logits, build_blip
from notice.demo.llava_toy import PROMPT_TEMPLATE as LLAVA_PROMPT_TEMPLATE
from notice.demo.llava_toy import build_llava
from notice.demo.toy_models import (
    METRICS_FILE,
    ToyModelConfig,
    TrainConfig,
    format_prompt,
    greedy_answers,
    pixel_values,
    train,
)

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
        "[CLS]",
        "is",
        "the",
        "object",
        "red",
        "or",
        "blue",
        "?",
        "[SEP]",
    ]
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


@pytest.mark.parametrize("family", ["blip", "llava"])
def test_fast_pixel_path_matches_the_processor(family):
    _, processor = (build_blip if family == "blip" else build_llava)(ToyModelConfig())
    images = np.stack([np.asarray(_image()), np.asarray(_image())[::-1]])
    text = [format_prompt(family, make_question("colour", "red", "blue"))] * 2
    expected = processor(images=list(images), text=text, return_tensors="pt")
    torch.testing.assert_close(pixel_values(images), expected["pixel_values"], rtol=0, atol=1e-6)


def test_first_decoder_step_is_what_blip_generates():
    model, processor = build_blip(ToyModelConfig(seed=3))
    inp = processor(images=_image(), text=make_question("shape", "circle", "cross"), return_tensors="pt")
    dec = torch.tensor([[processor.tokenizer.bos_token_id]])
    with torch.no_grad():
        logits = blip_decoder_logits(model, inp["input_ids"], inp["attention_mask"], inp["pixel_values"], dec)
        generated = model.generate(**inp, max_new_tokens=1)
    assert generated[0, -1] == logits[0, 0].argmax()


@pytest.mark.parametrize("family", ["blip", "llava"])
def test_short_training_writes_a_loadable_model_and_metrics(family, tmp_path):
    tc = TrainConfig(steps=4, batch_size=8, n_train_images=32, n_eval_images=10, warmup_steps=2)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        metrics = train(family, ToyModelConfig(seed=5), tmp_path / "a", tc)
        # trained on one thread whatever the caller had, and the caller's count given back
        assert metrics["torch_threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(caller_threads)
    on_disk = json.loads((tmp_path / "a" / METRICS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(metrics["accuracy"]) == set(TASK_VALUES) and metrics["steps"] == 4 and metrics["seed"] == 5
    assert all(0.0 <= a <= 1.0 for a in metrics["accuracy"].values())
    assert metrics["train_cpu_s"] > 0
    cls = BlipForQuestionAnswering if family == "blip" else LlavaForConditionalGeneration
    loaded = cls.from_pretrained(tmp_path / "a")
    processor = AutoProcessor.from_pretrained(tmp_path / "a")
    # Seeded: the same run again gives bit-identical weights.
    train(family, ToyModelConfig(seed=5), tmp_path / "b", tc)
    again = cls.from_pretrained(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), again.parameters()))
    # Greedy answers come back as plain words (or empty), for mixed-length questions too.
    questions = [make_question("colour", "red", "blue"), make_question("shape", "circle", "cross")]
    answers = greedy_answers(loaded, processor, family, [np.asarray(_image())] * 2, questions)
    assert len(answers) == 2 and all("[" not in a and "<" not in a for a in answers)


def test_configs_from_settings_maps_workflow_keys_and_checks_the_architecture():
    from notice.demo.toy_config import configs_from_settings

    model_cfg, train_cfg = configs_from_settings(
        {
            "family": "llava",
            "dataset": "synthetic",
            "seed": 3,
            "steps": 7,
            "lr": 0.002,
            "text_layers": 3,
            "text_heads": 8,
            "text_kv_heads": 4,
            "patch_size": 16,
        },
        image_size=48,
    )
    assert (model_cfg.image_size, model_cfg.seed, model_cfg.text_layers, model_cfg.text_heads) == (48, 3, 3, 8)
    assert (model_cfg.text_kv_heads, model_cfg.patch_size, model_cfg.n_patches) == (4, 16, 9)
    assert (train_cfg.steps, train_cfg.lr) == (7, 0.002)
    with pytest.raises(ValueError, match="text_kv_heads=3 must divide text_heads=8"):
        configs_from_settings({"family": "llava", "dataset": "d", "text_heads": 8, "text_kv_heads": 3}, 64)
    with pytest.raises(ValueError, match="patch_size=10 must divide image_size=64"):
        configs_from_settings({"family": "blip", "dataset": "d", "patch_size": 10}, 64)
    with pytest.raises(ValueError, match="unknown keys \\['layers'\\]"):
        configs_from_settings({"family": "blip", "dataset": "d", "layers": 3}, 64)
