"""Tiny random adapters for tests, on top of the shared toy builders (notice.demo.toy_models).

Tiny random models with the default std barely react to the image, so weights are
re-initialised with a larger std to make patching effects visible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from notice.adapters import blip2_tiny, idefics3_tiny, llava_next_tiny, paligemma_tiny, qwen2_vl_tiny
from notice.adapters.base import VLMAdapter
from notice.adapters.blip import BlipAdapter
from notice.adapters.blip2 import Blip2Adapter, InstructBlipAdapter
from notice.adapters.blip_toy import build_blip
from notice.adapters.idefics3 import Idefics3Adapter, SmolVLMAdapter
from notice.adapters.llava import LlavaAdapter
from notice.adapters.llava_next import LlavaNextAdapter
from notice.adapters.llava_toy import build_llava
from notice.adapters.paligemma import PaliGemmaAdapter
from notice.adapters.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from notice.demo.toy_config import ToyModelConfig

QUESTION = "is the object red or green?"
STR_QUESTION = "is the object blue or yellow?"  # same token length as QUESTION in both toy tokenizers

SMALL = dict(
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate=64,
    text_hidden=32,
    text_intermediate=64,
)


def reinit(model: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    """Every weight matrix and bias ~ N(0, std²); norm weights stay 1 so activations stay bounded."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() and param.dim() == 1 and name.endswith("weight"):
                continue
            param.normal_(0.0, std)
    return model.eval()


def blip_adapter(seed: int = 0, std: float = 0.3, **overrides) -> BlipAdapter:
    model, processor = build_blip(ToyModelConfig(**{**SMALL, "text_heads": 4, "seed": seed, **overrides}))
    return BlipAdapter(reinit(model, std, seed), processor)


def llava_adapter(seed: int = 0, std: float = 0.3, **overrides) -> LlavaAdapter:
    cfg = ToyModelConfig(**{**SMALL, "text_heads": 4, "text_kv_heads": 2, "seed": seed, **overrides})
    model, processor = build_llava(cfg)
    return LlavaAdapter(reinit(model, std, seed), processor)


def llava_next_adapter(seed: int = 0, std: float = 0.3) -> LlavaNextAdapter:
    model, processor = llava_next_tiny.build(seed=seed)
    return LlavaNextAdapter(reinit(model, std, seed), processor)


def qwen2_vl_adapter(seed: int = 0, std: float = 0.3) -> Qwen2VLAdapter:
    model, processor = qwen2_vl_tiny.build("qwen2_vl", seed=seed)
    return Qwen2VLAdapter(reinit(model, std, seed), processor)


def qwen2_5_vl_adapter(seed: int = 0, std: float = 0.3) -> Qwen25VLAdapter:
    model, processor = qwen2_vl_tiny.build("qwen2_5_vl", seed=seed)
    return Qwen25VLAdapter(reinit(model, std, seed), processor)


def paligemma_adapter(seed: int = 0, std: float = 0.3, **overrides) -> PaliGemmaAdapter:
    model, processor = paligemma_tiny.build(seed=seed, **overrides)
    return PaliGemmaAdapter(reinit(model, std, seed), processor)


def idefics3_adapter(seed: int = 0, std: float = 0.3) -> Idefics3Adapter:
    model, processor = idefics3_tiny.build("idefics3", seed=seed)
    return Idefics3Adapter(reinit(model, std, seed), processor)


def smolvlm_adapter(seed: int = 0, std: float = 0.3) -> SmolVLMAdapter:
    model, processor = idefics3_tiny.build("smolvlm", seed=seed)
    return SmolVLMAdapter(reinit(model, std, seed), processor)


def blip2_adapter(seed: int = 0, std: float = 0.3) -> Blip2Adapter:
    model, processor = blip2_tiny.build("blip2", seed=seed)
    return Blip2Adapter(reinit(model, std, seed), processor)


def instructblip_adapter(seed: int = 0, std: float = 0.3) -> InstructBlipAdapter:
    model, processor = blip2_tiny.build("instructblip", seed=seed)
    return InstructBlipAdapter(reinit(model, std, seed), processor)


# Tiny random adapter of every family, for the tests that run over all of them.
FAMILY_ADAPTERS: dict[str, Callable[..., VLMAdapter]] = {
    "blip": blip_adapter,
    "blip2": blip2_adapter,
    "idefics3": idefics3_adapter,
    "instructblip": instructblip_adapter,
    "llava": llava_adapter,
    "llava_next": llava_next_adapter,
    "paligemma": paligemma_adapter,
    "qwen2_vl": qwen2_vl_adapter,
    "qwen2_5_vl": qwen2_5_vl_adapter,
    "smolvlm": smolvlm_adapter,
}


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
