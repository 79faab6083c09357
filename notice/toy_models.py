"""Small vision-language models built and trained from scratch on CPU on the synthetic dataset.

They have the exact architecture classes of `Salesforce/blip-vqa-base` (`BlipForQuestionAnswering`)
and `llava-hf/llava-1.5-7b-hf` (`LlavaForConditionalGeneration`), only tiny, and are saved with
`save_pretrained` so that the workflow loads them exactly like the real checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from notice.synthetic import (
    QUESTION_TEMPLATES,
    SUBJECT,
    TASK_VALUES,
    TASKS,
    draw_question,
    render_array,
    sample_scene,
    sample_training_batch,
    stream_rng,
)
from notice.toy_config import DEFAULT_STEPS, ToyModelConfig, TrainConfig

# The prompt of llava-1.5 (BRIEF §3); the toy LLaVA is trained on exactly this template.
LLAVA_PROMPT_TEMPLATE = "USER: <image>\n{question} Answer with one word. ASSISTANT:"

# Special tokens in id order, named as in the real checkpoints (BLIP's decoder starts from [DEC]).
BLIP_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# Standard CLIP normalisation, used by both toy image processors.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _words() -> list[str]:
    """Every plain word the questions, answers and the LLaVA template use, lowercased, sorted."""
    text = " ".join(
        [QUESTION_TEMPLATES[t].format(subject=SUBJECT, a="", b="") for t in QUESTION_TEMPLATES]
        + [LLAVA_PROMPT_TEMPLATE.replace("<image>", "").replace("{question}", "")]
        + [v for values in TASK_VALUES.values() for v in values]
    ).lower()
    # Split punctuation off words the way both tokenizers' pre-tokenizers do.
    words = pre_tokenizers.Whitespace().pre_tokenize_str(text)
    return sorted({w for w, _ in words})


def build_vocabulary(family: str) -> list[str]:
    """Tokens of the family's toy tokenizer in id order: its special tokens, then the words."""
    specials = {"blip": BLIP_SPECIAL_TOKENS, "llava": LLAVA_SPECIAL_TOKENS}[family]
    return list(specials) + _words()


def build_blip_tokenizer() -> BertTokenizer:
    vocab = {tok: i for i, tok in enumerate(build_vocabulary("blip"))}
    # `vocab=` (a dict or path); transformers 5 silently ignores `vocab_file=`.
    return BertTokenizer(vocab=vocab, bos_token="[DEC]")


def build_llava_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one token per word, so every option is a single token."""
    vocab = {tok: i for i, tok in enumerate(build_vocabulary("llava"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Llama prepends <s> to every prompt.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        # Left padding keeps the answer position at -1 in batches (as llava-hf's processor does).
        padding_side="left",
    )
    return fast


def build_blip(cfg: ToyModelConfig) -> tuple[BlipForQuestionAnswering, BlipProcessor]:
    """A randomly initialised toy `BlipForQuestionAnswering` and its processor."""
    tokenizer = build_blip_tokenizer()
    std = cfg.initializer_range
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            intermediate_size=cfg.text_intermediate,
            max_position_embeddings=cfg.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            initializer_range=std,
        ),
        vision_config=dict(
            hidden_size=cfg.vision_hidden,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            intermediate_size=cfg.vision_intermediate,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            # BlipVisionConfig's own default is 1e-10 (position and class embeddings).
            initializer_range=std,
        ),
        projection_dim=cfg.text_hidden,
        initializer_range=std,
    )
    torch.manual_seed(cfg.seed)
    model = BlipForQuestionAnswering(config).eval()
    image_processor = BlipImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_llava(
    cfg: ToyModelConfig, attn_implementation: str = "eager"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised toy `LlavaForConditionalGeneration` and its processor."""
    tokenizer = build_llava_tokenizer()
    std = cfg.initializer_range
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        intermediate_size=cfg.vision_intermediate,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
        initializer_range=std,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=std,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=cfg.n_patches,
        # The default -2 would feed only the first layer of a 2-layer tower to the projector.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        initializer_range=std,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    return model, processor


# ---------------------------------------------------------------------------------------------
# Training


METRICS_FILE = "training_metrics.json"


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] at the model's image size -> normalised [B, 3, H, W]: what both toy
    processors produce (their resize and crop are identities at that size), without PIL per image."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def blip_decoder_logits(
    model: BlipForQuestionAnswering,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    decoder_input_ids: torch.Tensor,
) -> torch.Tensor:
    """Decoder logits [B, L, V]; `[:, 0]` is the first answer step (decoder input [DEC]), which
    `BlipForQuestionAnswering.forward` computes but does not return."""
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    question = model.text_encoder(
        input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
    ).last_hidden_state
    return model.text_decoder(
        input_ids=decoder_input_ids, encoder_hidden_states=question, encoder_attention_mask=attention_mask
    ).logits


class _PromptCache:
    """Token ids of every prompt, computed once by the model's own processor (there are few)."""

    def __init__(self, family: str, processor, image_size: int):
        self.family = family
        self.processor = processor
        self.blank = np.zeros((image_size, image_size, 3), dtype=np.uint8)
        self.ids: dict[str, list[int]] = {}

    def __call__(self, question: str) -> list[int]:
        if question not in self.ids:
            prompt = format_prompt(self.family, question)
            self.ids[question] = self.processor(images=self.blank, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
        return self.ids[question]


def format_prompt(family: str, question: str) -> str:
    """The full text given to the processor: BLIP takes the bare question, LLaVA its chat template."""
    return question if family == "blip" else LLAVA_PROMPT_TEMPLATE.format(question=question)


def _pad(seqs: Sequence[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def _two_step_logits(family: str, model, prompt_ids: list[list[int]], pixels: torch.Tensor,
                     answer_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Logits [B, 2, V] of the answer step and the step after it (which should predict the end)."""
    if family == "blip":
        ids, mask = _pad(prompt_ids, tokenizer.pad_token_id, left=False)
        bos = torch.full_like(answer_ids, tokenizer.bos_token_id)
        return blip_decoder_logits(model, ids, mask, pixels, torch.stack([bos, answer_ids], 1))[:, :2]
    # LLaVA: prompt then the answer token; left padding puts both scored positions at the end.
    ids, mask = _pad([p + [int(a)] for p, a in zip(prompt_ids, answer_ids)], tokenizer.pad_token_id, left=True)
    return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_to_keep=2).logits


def greedy_answers(
    model, processor, family: str, images: Sequence[np.ndarray], questions: Sequence[str],
    batch_size: int = 100, max_new_tokens: int = 3,
) -> list[str]:
    """Greedy generated answer strings (special tokens removed) for exact-match accuracy.

    Batches hold prompts of equal token length only: `BlipForQuestionAnswering.generate` ignores the
    question padding, so mixed lengths would change the answers.
    """
    tokenizer = processor.tokenizer
    lengths = [len(tokenizer(format_prompt(family, q))["input_ids"]) for q in questions]
    answers: list[str] = [""] * len(questions)
    with torch.no_grad():
        for length in sorted(set(lengths)):
            idx = [i for i, n in enumerate(lengths) if n == length]
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                inputs = processor(images=[images[i] for i in chunk],
                                   text=[format_prompt(family, questions[i]) for i in chunk],
                                   return_tensors="pt", padding=True)
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                if family == "llava":
                    out = out[:, inputs["input_ids"].shape[1]:]
                for i, text in zip(chunk, tokenizer.batch_decode(out, skip_special_tokens=True)):
                    answers[i] = text.strip()
    return answers


def evaluate(model, processor, family: str, seed: int, n_images: int, image_size: int) -> dict:
    """Exact-match accuracy of greedy answers on `n_images` fresh images (eval stream), every image
    asked about both tasks with a random distractor and option order."""
    rng = stream_rng(seed, "eval")
    examples = sample_training_batch(rng, n_images, image_size)
    images, questions, truth, tasks = [], [], [], []
    for ex in examples:
        for task in TASKS:
            q = draw_question(rng, ex.scene, task=task)
            images.append(ex.image)
            questions.append(q.text)
            truth.append(q.answer)
            tasks.append(task)
    predicted = greedy_answers(model.eval(), processor, family, images, questions)
    correct = np.array([p == t for p, t in zip(predicted, truth)])
    tasks_arr = np.array(tasks)
    return {
        "n_images": n_images,
        "accuracy": {task: float(correct[tasks_arr == task].mean()) for task in TASKS},
        "accuracy_all": float(correct.mean()),
    }


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def train(family: str, cfg: ToyModelConfig, out_dir: str | Path, train_cfg: TrainConfig | None = None) -> dict:
    """Train a toy model of `family` on fresh synthetic data, evaluate it, save model + processor +
    `training_metrics.json` into `out_dir`; return the metrics."""
    tc = train_cfg or TrainConfig()
    steps = tc.steps if tc.steps is not None else DEFAULT_STEPS[family]
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One thread whatever the caller set: float sums split over more threads come out in another order and
    # train another model (docs/toy_models.md), so the same settings give the same weights on any machine.
    torch.set_num_threads(1)
    # NaN-filling every new tensor (the deterministic mode's default) costs ~5% here and buys nothing.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        # SDPA trains the toy LLaVA about twice as fast as eager on CPU; the saved weights load with either.
        model, processor = build_blip(cfg) if family == "blip" else build_llava(cfg, attn_implementation="sdpa")
        tokenizer = processor.tokenizer
        end_id = tokenizer.sep_token_id if family == "blip" else tokenizer.eos_token_id
        prompts = _PromptCache(family, processor, cfg.image_size)
        rng = stream_rng(cfg.seed, "train")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        scenes = [sample_scene(rng, "train", cfg.image_size) for _ in range(tc.n_train_images)]
        pool_images = np.empty((len(scenes), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
        for i, scene in enumerate(scenes):
            pool_images[i] = render_array(scene)[0]
        print(f"[{family}] rendered {len(scenes)} training images in {time.perf_counter() - wall0:.1f}s", flush=True)

        torch.manual_seed(cfg.seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc.warmup_steps, steps))
        window = {"loss": 0.0, "n": 0, "hits": {t: [0, 0] for t in TASKS}}
        for step in range(1, steps + 1):
            idx = rng.integers(len(scenes), size=tc.batch_size)
            qs = [draw_question(rng, scenes[i], tc.shape_fraction) for i in idx]
            answer_ids = torch.tensor([tokenizer.convert_tokens_to_ids(q.answer) for q in qs])
            logits = _two_step_logits(family, model, [prompts(q.text) for q in qs],
                                      pixel_values(pool_images[idx]), answer_ids, tokenizer)
            loss = F.cross_entropy(logits[:, 0], answer_ids) + F.cross_entropy(
                logits[:, 1], torch.full_like(answer_ids, end_id))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()

            hit = (logits[:, 0].argmax(-1) == answer_ids).tolist()
            window["loss"] += loss.item()
            window["n"] += 1
            for q, h in zip(qs, hit):
                window["hits"][q.task][0] += h
                window["hits"][q.task][1] += 1
            if step % tc.log_every == 0 or step == steps:
                accs = {t: h / max(n, 1) for t, (h, n) in window["hits"].items()}
                print(f"[{family}] step {step}/{steps} loss {window['loss'] / window['n']:.4f} "
                      + " ".join(f"acc_{t} {a:.3f}" for t, a in accs.items())
                      + f" lr {sched.get_last_lr()[0]:.2e} {time.perf_counter() - wall0:.0f}s", flush=True)
                window = {"loss": 0.0, "n": 0, "hits": {t: [0, 0] for t in TASKS}}
        train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        model.eval()

        wall1 = time.perf_counter()
        metrics = evaluate(model, processor, family, cfg.seed, tc.n_eval_images, cfg.image_size)
        metrics.update(
            family=family, seed=cfg.seed, steps=steps, final_train_loss=float(loss.item()),
            train_wall_s=round(train_wall, 1), train_cpu_s=round(train_cpu, 1),
            eval_wall_s=round(time.perf_counter() - wall1, 1), torch_threads=torch.get_num_threads(),
            n_parameters=sum(p.numel() for p in model.parameters()),
            model_config=asdict(cfg), train_config=asdict(replace(tc, steps=steps)),
        )
        print(f"[{family}] held-out accuracy " + " ".join(f"{t} {a:.4f}" for t, a in metrics["accuracy"].items())
              + f" (train {train_wall:.0f}s wall, {train_cpu:.0f}s CPU)", flush=True)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        # Written last: its presence means the directory is complete.
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.set_num_threads(threads)


def train_blip(cfg: ToyModelConfig, out_dir: str | Path, train_cfg: TrainConfig | None = None) -> dict:
    return train("blip", cfg, out_dir, train_cfg)


def train_llava(cfg: ToyModelConfig, out_dir: str | Path, train_cfg: TrainConfig | None = None) -> dict:
    return train("llava", cfg, out_dir, train_cfg)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m notice.toy_models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a toy model and save it with save_pretrained")
    p.add_argument("--family", choices=sorted(DEFAULT_STEPS), required=True)
    p.add_argument("--out", required=True, help="output directory (model, processor, training_metrics.json)")
    p.add_argument("--steps", type=int, default=None, help="default: %s" % DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train-images", type=int, default=TrainConfig.n_train_images)
    p.add_argument("--n-eval-images", type=int, default=TrainConfig.n_eval_images)
    args = parser.parse_args(argv)
    train(args.family, ToyModelConfig(seed=args.seed), args.out,
          TrainConfig(steps=args.steps, n_train_images=args.n_train_images, n_eval_images=args.n_eval_images))


if __name__ == "__main__":
    main()
