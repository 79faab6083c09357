"""The hooks every engine uses: replace a module's input or output, corrupt the image embeddings, record
the activations of one forward pass.

A corruption that is not a different input (Gaussian noise on the image embeddings) is a function
`corrupt_image_fn(embeddings) -> embeddings` (`notice.patching.corruptions`) applied to the output of
`adapter.image_embedding_module()` in the corrupt run and in every patched run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch

from notice.adapters.base import ModelInput, VLMAdapter
from notice.patching.sites import SiteKey, activation_key

ImageFn = Callable[[torch.Tensor], torch.Tensor]
CleanRun = tuple[torch.Tensor, dict[SiteKey, torch.Tensor]]  # (answer logits [V], activations [T, width])


@contextmanager
def hooked(
    module: torch.nn.Module, kind: Literal["input", "output"], fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """While active, replace the module's first positional input (or its main output) by fn(it)."""
    if kind == "input":

        def pre_hook(_module, args):
            if not args:
                raise RuntimeError(f"{type(module).__name__} was called without a positional input to patch")
            return (fn(args[0]),) + tuple(args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    else:
        handle = module.register_forward_hook(lambda _m, _a, output: VLMAdapter.replace_output_tensor(output, fn))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def image_embeddings_replaced(adapter: VLMAdapter, fn: ImageFn | None) -> Iterator[None]:
    """While active, the image embeddings the text side sees are fn(embeddings) (no-op for None)."""
    if fn is None:
        yield
        return
    with hooked(adapter.image_embedding_module(), "output", fn):
        yield


def capture(
    adapter: VLMAdapter, inp: ModelInput, sites: Sequence[SiteKey], image_fn: ImageFn | None = None
) -> CleanRun:
    """One forward of `inp`: its answer logits [V] and the activations [T, D] at `sites`."""
    acts: dict[SiteKey, torch.Tensor] = {}

    def recorder(key: SiteKey) -> Callable[[torch.Tensor], torch.Tensor]:
        def record(x: torch.Tensor) -> torch.Tensor:
            acts[key] = x[0].detach().clone()
            return x

        return record

    with ExitStack() as stack:
        stack.enter_context(image_embeddings_replaced(adapter, image_fn))
        for key in dict.fromkeys(activation_key(*s) for s in sites):
            module, kind = adapter.site_module(*key)
            stack.enter_context(hooked(module, kind, recorder(key)))
        logits = adapter.answer_logits(inp)
    return logits, acts
