"""Tiny random BLIP (`BlipForQuestionAnswering`): the demo's toy BLIP (notice.demo.blip_toy) at the tests' size."""

from __future__ import annotations

from typing import Any

from transformers import BlipForQuestionAnswering, BlipProcessor

from notice.demo.blip_toy import build_blip
from notice.testing.tiny import small_toy_config


def build(seed: int = 0, **overrides: Any) -> tuple[BlipForQuestionAnswering, BlipProcessor]:
    """A random tiny BLIP and its processor; `overrides` are ToyModelConfig fields."""
    return build_blip(small_toy_config(seed, **overrides))
