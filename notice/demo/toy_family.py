"""What a toy model of the demo is (`ToyFamily`) and what every toy shares: the vocabulary, the image
normalisation, prompt padding.

A toy has the exact architecture classes of a real checkpoint, only tiny; each family's toy lives in its
own module and is named by its row of the family table (notice.families); `notice.demo.toy_models` trains
and evaluates it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from tokenizers import pre_tokenizers

from notice.data.synthetic import QUESTION_TEMPLATES, SUBJECT, TASK_VALUES
from notice.demo.toy_config import ToyModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

# Standard CLIP normalisation, used by every toy image processor.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# The words of the toys' prompt templates around the question (lowercased, punctuation split off as the
# toy tokenizers do). One vocabulary serves every toy, so a word has the same id in all of them; a toy whose
# template uses another word fails tests/test_toy_models.py.
TEMPLATE_WORDS: tuple[str, ...] = (".", ":", "answer", "assistant", "one", "user", "with", "word")


class ToyFamily(ABC):
    """One family's toy model: how to build it, prompt it and score its answer step in training."""

    special_tokens: ClassVar[tuple[str, ...]]  # in id order, before the words
    prompt_template: ClassVar[str]  # "{question}" is replaced; the model is trained on it
    default_steps: ClassVar[int]  # the measured recipe's training steps (docs/toy_models.md)
    generate_returns_prompt: ClassVar[bool]  # `generate` output starts with the prompt's ids

    @abstractmethod
    def build(self, cfg: ToyModelConfig, training: bool = False) -> tuple[PreTrainedModel, ProcessorMixin]:
        """A randomly initialised (seeded) toy model and its processor; `training`: for the training loop."""

    @abstractmethod
    def end_token_id(self, tokenizer) -> int:
        """The token that should follow the one-word answer."""

    @abstractmethod
    def two_step_logits(
        self, model, prompt_ids: list[list[int]], pixels: torch.Tensor, answer_ids: torch.Tensor, tokenizer
    ) -> torch.Tensor:
        """Logits [B, 2, V] of the answer step and the step after it (which should predict the end)."""

    def format_prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)


def split_words(text: str) -> list[str]:
    """`text` lowercased and split into words, punctuation apart, the way the toy tokenizers' pre-tokenizers do."""
    return [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]


def toy_words() -> list[str]:
    """Every plain word the questions, answers and the toys' prompt templates use, lowercased, sorted."""
    text = " ".join(
        [QUESTION_TEMPLATES[t].format(subject=SUBJECT, a="", b="") for t in QUESTION_TEMPLATES]
        + [v for values in TASK_VALUES.values() for v in values]
    )
    return sorted(set(split_words(text)) | set(TEMPLATE_WORDS))


def build_vocabulary(special_tokens: Sequence[str]) -> list[str]:
    """Tokens of a toy tokenizer in id order: its special tokens, then the words."""
    return list(special_tokens) + toy_words()


def pad_prompts(seqs: Sequence[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, max length] of prompts padded on the left or the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask
