"""Finding a model offline: a local directory or a Hugging Face id already in the local cache.

Nothing is downloaded here, so a missing model fails at once with a message instead of hanging on the
network inside a workflow job. Light on purpose (no torch, no transformers): the Snakefile checks every
configured model with it at start.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor in the local Hugging Face cache."""


def resolve_offline(name_or_path: str, marker_file: str = "config.json", what: str = "model") -> str:
    """`name_or_path` as it loads offline; raise ModelNotFoundError saying how to provide it otherwise.

    `marker_file` is the file every snapshot of such a model has (`config.json` for transformers models,
    `model_index.json` for diffusers pipelines); `what` names the model in the message.
    """
    from huggingface_hub import try_to_load_from_cache

    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface (HF_HOME unset)")
    hint = (
        f"Provide it either in the Hugging Face cache that HF_HOME (or HF_HUB_CACHE) points to (now: {hf_home}), "
        f"e.g. run `huggingface-cli download {name_or_path}` on a machine with internet and copy the cache, "
        "or by putting the path of a local model directory (from `save_pretrained`) in the config."
    )
    if name_or_path.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"{what} directory {name_or_path!r} does not exist. {hint}")
    if not isinstance(try_to_load_from_cache(name_or_path, marker_file), str):
        raise ModelNotFoundError(f"{what} {name_or_path!r} is not in the local Hugging Face cache. {hint}")
    return name_or_path


def resolve_inpaint_model(name_or_path: str) -> str:
    """`resolve_offline` for a diffusers inpainting pipeline (its snapshots hold model_index.json)."""
    return resolve_offline(name_or_path, "model_index.json", "inpainting model")
