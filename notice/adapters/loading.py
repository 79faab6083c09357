"""Load a model (Hugging Face id or local directory) and wrap it in its family's adapter.

Nothing is downloaded here: a model id must already be in the local Hugging Face cache, so a
missing model fails at once with a message instead of hanging on the network inside a workflow job.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig

# Importing the family modules registers their adapters in ADAPTERS.
from notice.adapters import blip, llava, llava_next, qwen2_vl  # noqa: F401
from notice.adapters.base import ADAPTERS, VLMAdapter
from notice.adapters.processors import load_processor
from notice.workflow.hub import resolve_offline


def load_adapter(
    name_or_path: str,
    device: str = "cpu",
    dtype: str = "float32",
    prompt_template: str | None = None,
    attn_implementation: str = "eager",
    weights: bool = True,
) -> VLMAdapter:
    """Load model and processor offline and return the adapter for the model's family.

    `attn_implementation` defaults to "eager" because attention-pattern scoring needs the weights
    and the patching oracle's exactness is established with it. `weights=False` builds the model on
    torch's meta device instead (no memory, no weights read): enough for jobs that only format and
    tokenise prompts, and any forward pass fails loudly.
    """
    source = resolve_offline(name_or_path)
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    if config.model_type not in ADAPTERS:
        raise ValueError(
            f"model {name_or_path!r} has model_type {config.model_type!r}; supported model types: {sorted(ADAPTERS)}"
        )
    adapter_cls = ADAPTERS[config.model_type]
    if weights:
        model = adapter_cls.model_class.from_pretrained(
            source, dtype=getattr(torch, dtype), attn_implementation=attn_implementation, local_files_only=True
        ).to(device)
    else:
        with torch.device("meta"):
            model = adapter_cls.model_class(config)
    processor = load_processor(source)
    return adapter_cls(model, processor, prompt_template=prompt_template)
