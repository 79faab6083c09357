"""Train and evaluate the demo's toy vision-language models from scratch on CPU on the synthetic dataset.

They have the exact architecture classes of real checkpoints, only tiny, and are saved with
`save_pretrained` so that the workflow loads them exactly like the real ones. Each family's toy (its model
and processor, prompt, and answer-step logits) is a `ToyFamily` (notice.demo.toy_family) in its own module,
named by the family's row of the family table (notice.families); here is what every toy goes through:
the training loop and the evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from notice.data.synthetic import (
    TASKS,
    draw_question,
    render_array,
    sample_scene,
    sample_training_batch,
    stream_rng,
)
from notice.demo.toy_config import ToyModelConfig, TrainConfig
from notice.demo.toy_family import IMAGE_MEAN, IMAGE_STD, ToyFamily
from notice.families import families
from notice.families import family as family_row

METRICS_FILE = "training_metrics.json"


def toy_names() -> list[str]:
    """The families of the family table that have a demo toy."""
    return [f.name for f in families() if f.toy is not None]


def toy_of(name: str) -> ToyFamily:
    """The demo toy of the family `name` (its row of the family table)."""
    cls = family_row(name).load("toy")
    if not (isinstance(cls, type) and issubclass(cls, ToyFamily)):
        raise TypeError(f"family table: {name}.toy is not a ToyFamily subclass")
    return cls()


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] at the model's image size -> normalised [B, 3, H, W]: what both toy
    processors produce (their resize and crop are identities at that size), without PIL per image."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class _PromptCache:
    """Token ids of every prompt, computed once by the model's own processor (there are few)."""

    def __init__(self, toy: ToyFamily, processor, image_size: int):
        self.toy = toy
        self.processor = processor
        self.blank = np.zeros((image_size, image_size, 3), dtype=np.uint8)
        self.ids: dict[str, list[int]] = {}

    def __call__(self, question: str) -> list[int]:
        if question not in self.ids:
            prompt = self.toy.format_prompt(question)
            self.ids[question] = self.processor(images=self.blank, text=prompt, return_tensors="pt")["input_ids"][
                0
            ].tolist()
        return self.ids[question]


def format_prompt(family: str, question: str) -> str:
    """The full text given to the family's processor (the prompt the toy model is trained on)."""
    return toy_of(family).format_prompt(question)


def greedy_answers(
    model,
    processor,
    family: str,
    images: Sequence[np.ndarray],
    questions: Sequence[str],
    batch_size: int = 100,
    max_new_tokens: int = 3,
) -> list[str]:
    """Greedy generated answer strings (special tokens removed) for exact-match accuracy.

    Batches hold prompts of equal token length only: a cross-attention VQA model's `generate` may ignore the
    question padding, so mixed lengths would change the answers.
    """
    tokenizer = processor.tokenizer
    toy = toy_of(family)
    lengths = [len(tokenizer(toy.format_prompt(q))["input_ids"]) for q in questions]
    answers: list[str] = [""] * len(questions)
    with torch.no_grad():
        for length in sorted(set(lengths)):
            idx = [i for i, n in enumerate(lengths) if n == length]
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                inputs = processor(
                    images=[images[i] for i in chunk],
                    text=[toy.format_prompt(questions[i]) for i in chunk],
                    return_tensors="pt",
                    padding=True,
                )
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                if toy.generate_returns_prompt:
                    out = out[:, inputs["input_ids"].shape[1] :]
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
    toy = toy_of(family)
    steps = tc.steps if tc.steps is not None else toy.default_steps
    deterministic = torch.are_deterministic_algorithms_enabled()
    # Its attribute is a property of the module's class (torch's trick), which mypy does not see.
    determinism: Any = torch.utils.deterministic
    fill = determinism.fill_uninitialized_memory
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One thread whatever the caller set: float sums split over more threads come out in another order and
    # train another model (docs/toy_models.md), so the same settings give the same weights on any machine.
    torch.set_num_threads(1)
    # NaN-filling every new tensor (the deterministic mode's default) costs ~5% here and buys nothing.
    determinism.fill_uninitialized_memory = False
    try:
        model, processor = toy.build(cfg, training=True)
        tokenizer = processor.tokenizer
        end_id = toy.end_token_id(tokenizer)
        prompts = _PromptCache(toy, processor, cfg.image_size)
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
        window: dict[str, Any] = {"loss": 0.0, "n": 0, "hits": {t: [0, 0] for t in TASKS}}
        for step in range(1, steps + 1):
            idx = rng.integers(len(scenes), size=tc.batch_size)
            qs = [draw_question(rng, scenes[i], tc.shape_fraction) for i in idx]
            answer_ids = torch.tensor([tokenizer.convert_tokens_to_ids(q.answer) for q in qs])
            logits = toy.two_step_logits(
                model, [prompts(q.text) for q in qs], pixel_values(pool_images[idx]), answer_ids, tokenizer
            )
            loss = F.cross_entropy(logits[:, 0], answer_ids) + F.cross_entropy(
                logits[:, 1], torch.full_like(answer_ids, end_id)
            )
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
                print(
                    f"[{family}] step {step}/{steps} loss {window['loss'] / window['n']:.4f} "
                    + " ".join(f"acc_{t} {a:.3f}" for t, a in accs.items())
                    + f" lr {sched.get_last_lr()[0]:.2e} {time.perf_counter() - wall0:.0f}s",
                    flush=True,
                )
                window = {"loss": 0.0, "n": 0, "hits": {t: [0, 0] for t in TASKS}}
        train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        model.eval()

        wall1 = time.perf_counter()
        metrics = evaluate(model, processor, family, cfg.seed, tc.n_eval_images, cfg.image_size)
        metrics.update(
            family=family,
            seed=cfg.seed,
            steps=steps,
            final_train_loss=float(loss.item()),
            train_wall_s=round(train_wall, 1),
            train_cpu_s=round(train_cpu, 1),
            eval_wall_s=round(time.perf_counter() - wall1, 1),
            torch_threads=torch.get_num_threads(),
            n_parameters=sum(p.numel() for p in model.parameters()),
            model_config=asdict(cfg),
            train_config=asdict(replace(tc, steps=steps)),
        )
        print(
            f"[{family}] held-out accuracy "
            + " ".join(f"{t} {a:.4f}" for t, a in metrics["accuracy"].items())
            + f" (train {train_wall:.0f}s wall, {train_cpu:.0f}s CPU)",
            flush=True,
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        # Written last: its presence means the directory is complete.
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
    finally:
        torch.use_deterministic_algorithms(deterministic)
        determinism.fill_uninitialized_memory = fill
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m notice.demo.toy_models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a toy model and save it with save_pretrained")
    p.add_argument("--family", choices=toy_names(), required=True)
    p.add_argument("--out", required=True, help="output directory (model, processor, training_metrics.json)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="default: %s" % {name: toy_of(name).default_steps for name in toy_names()},
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train-images", type=int, default=TrainConfig.n_train_images)
    p.add_argument("--n-eval-images", type=int, default=TrainConfig.n_eval_images)
    args = parser.parse_args(argv)
    train(
        args.family,
        ToyModelConfig(seed=args.seed),
        args.out,
        TrainConfig(steps=args.steps, n_train_images=args.n_train_images, n_eval_images=args.n_eval_images),
    )


if __name__ == "__main__":
    main()
