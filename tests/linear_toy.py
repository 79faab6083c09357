"""A VLM-shaped model with no nonlinearity anywhere: patching effects are exactly linear in every site.

Image: patch vectors → `image_proj` (the image embeddings). Text stream of T positions, each layer:
x += o_proj(M @ x) (an "attention" whose fixed lower-triangular mixing M reads every earlier position
and, at every position, the mean image embedding) + mlp(x). Logits = head(x[last]). LD is then a linear
function of every site's activation, so attribution patching must equal exact patching.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from notice.adapters.base import HEAD_SITE_PARENT, ImageGrid, ModelInput, VLMAdapter

D, HEADS, LAYERS, VOCAB, T, PATCHES = 8, 2, 3, 11, 5, 4


class LinearLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.o_proj = nn.Linear(D, D)
        self.mlp = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        mix = torch.tril(torch.ones(x.shape[1], x.shape[1])) / torch.arange(1, x.shape[1] + 1)[:, None]
        return x + self.o_proj(mix @ x + image.mean(1, keepdim=True)) + self.mlp(x)


class LinearVLM(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.image_proj = nn.Linear(D, D)
        self.layers = nn.ModuleList(LinearLayer() for _ in range(LAYERS))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.image_proj(pixel_values)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, image)
        return self.head(x[:, -1])


class LinearAdapter(VLMAdapter):
    model_class: ClassVar[type[Any]] = LinearVLM
    default_prompt_template: ClassVar[str | None] = "{question}"
    module_sites: ClassVar[tuple[str, ...]] = ("mlp", "self_attn")
    head_site: ClassVar[str] = "self_attn_head"

    n_layers = LAYERS  # type: ignore[assignment]
    n_heads = HEADS  # type: ignore[assignment]
    head_dim = D // HEADS  # type: ignore[assignment]
    hidden_size = D  # type: ignore[assignment]

    def option_token_id(self, option: str) -> int:
        return len(option) % VOCAB

    def patch_positions(self, inp: ModelInput) -> list[int]:
        return list(range(inp.input_ids.shape[1]))

    def head_position(self, inp: ModelInput, answer_token_id: int) -> int:
        return inp.input_ids.shape[1] - 1

    def differentiable_answer_logits(self, inp: ModelInput) -> torch.Tensor:
        return self.model(inp.input_ids, inp.pixel_values)[0]

    def head_input_module(self) -> nn.Module:
        return self.model.head

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.float32_module(self.model.head)(self.head_input(hidden)).float()

    def generate_answer(self, inp: ModelInput, max_new_tokens: int = 5) -> str:
        raise NotImplementedError

    def site_module(self, site: str, layer: int) -> tuple[nn.Module, Literal["input", "output"]]:
        block = self.model.layers[layer]
        site = HEAD_SITE_PARENT.get(site, site)
        return (block.o_proj, "input") if site == "self_attn" else (block.mlp, "output")

    def image_embedding_module(self) -> nn.Module:
        return self.model.image_proj

    def fusion_attention_modules(self) -> list[nn.Module]:
        return []

    def image_grid(self, inp: ModelInput) -> ImageGrid:
        return ImageGrid(tuple(range(PATCHES)), 2, 2)

    def attention_queries(self, inp: ModelInput) -> list[int]:
        return []


def linear_inputs(seed: int) -> ModelInput:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, T), generator=generator)
    pixels = torch.randn(1, PATCHES, D, generator=generator)
    return ModelInput(ids, torch.ones_like(ids), pixels, [f"t{i}" for i in ids[0].tolist()])
