"""Tiny random LLaVA-1.5 (`LlavaForConditionalGeneration`): the demo's toy LLaVA (notice.demo.llava_toy) at the
tests' size."""

from __future__ import annotations

from typing import Any

from transformers import LlavaForConditionalGeneration, LlavaProcessor

from notice.demo.llava_toy import build_llava
from notice.testing.tiny import small_toy_config


def build(seed: int = 0, **overrides: Any) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA and its processor (eager attention); `overrides` are ToyModelConfig fields."""
    return build_llava(small_toy_config(seed, **overrides))
