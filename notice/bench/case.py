"""What a bench layout builds: one sample of one family (`Case`) on a random-weight model, and the helpers
the layouts (`notice.bench.layouts`) share."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from notice.adapters.base import ModelInput, Patch, VLMAdapter
from notice.adapters.decoder import DecoderVLMAdapter
from notice.adapters.loading import family_adapter
from notice.families import family
from notice.patching.sites import default_patches

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Size = Literal["tiny", "bench", "real"]
RowsLogits = Callable[..., torch.Tensor]  # (adapter, batched ModelInput) -> answer logits [B, V]
# The decoder language model of the decoder layouts at tiny and bench size (each layout gives its real size):
# what a CPU runs in minutes.
SCALED_DECODER: dict[Size, dict] = {
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    ),
    "bench": dict(
        hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, intermediate_size=2816
    ),
}


def forward_rows_logits(adapter: DecoderVLMAdapter, inp: ModelInput) -> torch.Tensor:
    """Answer logits [B, V] of a batched input through the adapter's own forward (decoder families), scored
    as `answer_logits` scores one row."""
    return adapter.answer_logits_of(lambda: adapter.forward(inp).logits[:, -1])


@dataclass
class Case:
    """One sample of one family: the adapter, the (clean, corrupt) inputs, the answer tokens, the patches,
    and how (b) gets the answer logits of a batch of rows."""

    name: str
    adapter: VLMAdapter
    clean: ModelInput
    corrupt: ModelInput
    tau: int
    tau_p: int
    patches: list[Patch]
    description: str
    rows_logits: RowsLogits = forward_rows_logits


def size_of(real_size: bool, tiny: bool) -> Size:
    """The size a family builds: the real checkpoint's, the bench's scaled one, or tiny (tests)."""
    if real_size and tiny:
        raise ValueError("real_size and tiny exclude each other")
    return "real" if real_size else "tiny" if tiny else "bench"


def build_model(model_cls: type[PreTrainedModel], config, size: Size, device: str) -> torch.nn.Module:
    """Random weights (seed 0), eager attention (the oracle's); bfloat16 at real size, else float32."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if size == "real" else torch.float32
    with torch.device(device):
        return model_cls._from_config(config, attn_implementation="eager", dtype=dtype).eval()


def float32_twin(adapter: VLMAdapter) -> VLMAdapter:
    """The adapter's model rebuilt in float32 on its device with its weights (upcast: exact), in a new adapter of
    its class: the same model computed in full precision. Rebuilt, not deep-copied: a copy would carry the hooks and
    module state an adapter installs on its model, bound to the original."""
    model = adapter.model
    with torch.device(adapter.device):  # a copy of the config: `_from_config` writes the dtype into it
        twin = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager", dtype=torch.float32)
    twin.load_state_dict(model.state_dict())
    return type(adapter)(twin.eval(), adapter.processor, adapter.prompt_template)


def in_dtype(inp: ModelInput, dtype: torch.dtype) -> ModelInput:
    """`inp` with its floating-point tensors (the pixel values, any float extra) in `dtype`; ids and masks as
    they are."""

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype) if x.is_floating_point() else x

    extra = {key: cast(value) for key, value in inp.extra.items()}
    return ModelInput(inp.input_ids, inp.attention_mask, cast(inp.pixel_values), inp.tokens, extra)


def family_adapter_of(name: str, model: torch.nn.Module, prompt_template: str | None = None) -> VLMAdapter:
    """`model` in the adapter of the family `name` (its row of the family table); no processor: a layout
    builds its token ids itself."""
    return family_adapter(family(name))(model, processor=None, prompt_template=prompt_template)


def random_ids(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    return [rng.randrange(low, high) for _ in range(n)]


def sip_case(
    name: str,
    adapter: VLMAdapter,
    ids: list[int],
    pixel_shape: Sequence[int],
    tau: int,
    tau_p: int,
    description: str,
    extra: dict[str, torch.Tensor] | None = None,
    rows_logits: RowsLogits = forward_rows_logits,
) -> Case:
    """SIP sample: one prompt (`ids`, one sequence) with two seeded random images of `pixel_shape`;
    `extra` is the rest of the processor's output (the same for both images)."""
    device, dtype = adapter.device, adapter.dtype
    input_ids = torch.tensor([ids], device=device)
    on_device = {k: v.to(device) for k, v in (extra or {}).items()}

    def inp(seed: int) -> ModelInput:
        pixels = torch.randn(*pixel_shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        return ModelInput(input_ids, torch.ones_like(input_ids), pixels, [f"#{i}" for i in ids], dict(on_device))

    clean, corrupt = inp(1), inp(2)
    return Case(
        name,
        adapter,
        clean,
        corrupt,
        tau,
        tau_p,
        default_patches(adapter, clean, tau),
        description,
        rows_logits,
    )
