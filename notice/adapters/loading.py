"""Load a model (Hugging Face id or local directory) and wrap it in its family's adapter.

Nothing is downloaded here: a model id must already be in the local Hugging Face cache, so a
missing model fails at once with a message instead of hanging on the network inside a workflow job.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig

from notice.adapters.base import VLMAdapter
from notice.adapters.processors import load_processor
from notice.families import Family, default_family, families_for, family, model_types
from notice.files.hub import resolve_offline


def load_adapter(
    name_or_path: str,
    device: str = "cpu",
    dtype: str = "float32",
    prompt_template: str | None = None,
    attn_implementation: str = "eager",
    weights: bool = True,
    adapter: str | None = None,
) -> VLMAdapter:
    """Load model and processor offline and return the adapter for the model's family.

    `adapter` names the adapter family (one registered for the model's type, e.g. an opt-in second
    stream); None takes the model type's default adapter.

    `attn_implementation` defaults to "eager" because attention-pattern scoring needs the weights
    and the patching oracle's exactness is established with it. `weights=False` builds the model on
    torch's meta device instead (no memory, no weights read): enough for jobs that only format and
    tokenise prompts, and any forward pass fails loudly.
    """
    source = resolve_offline(name_or_path)
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    adapter_cls = adapter_class(name_or_path, config.model_type, adapter)
    if weights:
        model = adapter_cls.model_class.from_pretrained(
            source, dtype=getattr(torch, dtype), attn_implementation=attn_implementation, local_files_only=True
        ).to(device)
    else:
        with torch.device("meta"):
            model = adapter_cls.model_class(config)
    processor = load_processor(source)
    return adapter_cls(model, processor, prompt_template=prompt_template)


def adapter_class(name_or_path: str, model_type: str, adapter: str | None = None) -> type[VLMAdapter]:
    """The adapter class of the family named `adapter` (None: the default family of `model_type`), checked
    against the model type (the family table, notice.families)."""
    if adapter is None:
        row = default_family(model_type)
        if row is None:
            raise ValueError(
                f"model {name_or_path!r} has model_type {model_type!r}; supported model types: {model_types()}"
            )
        return family_adapter(row)
    row = family(adapter)
    if model_type not in row.model_types:
        fitting = sorted(f.name for f in families_for(model_type))
        raise ValueError(
            f"adapter {adapter!r} takes model types {list(row.model_types)}, but model {name_or_path!r} has "
            f"model_type {model_type!r} (adapters for it: {fitting})"
        )
    return family_adapter(row)


def family_adapter(row: Family) -> type[VLMAdapter]:
    """The adapter class a family's row names."""
    cls = row.load("adapter")
    if not (isinstance(cls, type) and issubclass(cls, VLMAdapter)):
        raise TypeError(f"family table: {row.name}.adapter = {row.adapter!r} is not a VLMAdapter subclass")
    return cls
