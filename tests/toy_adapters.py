"""Tiny random adapters for tests, from the family table's tiny builders (notice.testing).

Tiny random models with the default std barely react to the image, so weights are
re-initialised with a larger std to make patching effects visible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from notice.adapters.base import VLMAdapter
from notice.adapters.blip import BlipAdapter
from notice.adapters.llava import LlavaAdapter
from notice.adapters.loading import family_adapter
from notice.adapters.paligemma import PaliGemmaAdapter
from notice.families import family, family_names

QUESTION = "is the object red or green?"
STR_QUESTION = "is the object blue or yellow?"  # same token length as QUESTION in both toy tokenizers
# Every family of the family table that is a model type's default adapter (the opt-in streams have tests
# of their own, tests/test_blip2.py).
DEFAULT_FAMILIES: list[str] = family_names(opt_in=False)


def reinit(model: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    """Every weight matrix and bias ~ N(0, std²); norm weights stay 1 so activations stay bounded."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() and param.dim() == 1 and name.endswith("weight"):
                continue
            param.normal_(0.0, std)
    return model.eval()


def tiny_adapter(name: str, seed: int = 0, std: float = 0.3, **overrides) -> VLMAdapter:
    """The family's tiny random model (its tiny builder in the family table), weights ~ N(0, std²), in its adapter."""
    row = family(name)
    model, processor = row.load("tiny")(seed=seed, **overrides)
    return family_adapter(row)(reinit(model, std, seed), processor)


def blip_adapter(seed: int = 0, std: float = 0.3, **overrides) -> BlipAdapter:
    return cast(BlipAdapter, tiny_adapter("blip", seed, std, **overrides))


def llava_adapter(seed: int = 0, std: float = 0.3, **overrides) -> LlavaAdapter:
    return cast(LlavaAdapter, tiny_adapter("llava", seed, std, **overrides))


def paligemma_adapter(seed: int = 0, std: float = 0.3, **overrides) -> PaliGemmaAdapter:
    return cast(PaliGemmaAdapter, tiny_adapter("paligemma", seed, std, **overrides))


def save_tiny_models(root: Path, names: Iterable[str]) -> None:
    """The tiny model and processor of each family in `names` (its tiny builder) saved in `root / name`."""
    for name in names:
        model, processor = family(name).load("tiny")()
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)


def knockout_refusal(adapter: VLMAdapter) -> str | None:
    """The adapter's reason for refusing attention knockout (its `attention_blocks` raises NotImplementedError, e.g.
    a hybrid model's linear-attention layers have no edges to block); None where knockout runs."""
    try:
        adapter.attention_blocks({}, {})
    except NotImplementedError as refusal:
        return str(refusal)
    return None


def noise_image(seed: int, size: int = 32, height: int | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height or size, size, 3), dtype=np.uint8))


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models run ~10x faster on one thread than on two busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def clean_and_corrupt(adapter: VLMAdapter, corruption: str, image: Callable[[int], Image.Image] = noise_image):
    """(clean, corrupt) inputs: SIP another image, STR another equal-length question, else the same input."""
    clean = adapter.prepare(image(0), adapter.format_prompt(QUESTION))
    if corruption == "STR":
        return clean, adapter.prepare(image(0), adapter.format_prompt(STR_QUESTION))
    return clean, adapter.prepare(image(1 if corruption == "SIP" else 0), adapter.format_prompt(QUESTION))


def patch_positions_with_image_samples(adapter: VLMAdapter, inp) -> list[int]:
    """Every module-wise position, and image positions at the start, middle and end of the image."""
    text = adapter.patch_positions(inp)
    image = sorted(set(range(inp.input_ids.shape[1])) - set(text))
    return sorted(set(text) | ({image[0], image[len(image) // 2], image[-1]} if image else set()))
