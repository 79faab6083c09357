"""Reference patching engine: one full hooked forward pass per patched run.

This is the oracle that faster engines are tested against, so it trades every optimisation for
obviousness: capture the clean activations with hooks on one clean forward, then for each patch run
the corrupt input once more with a hook that overwrites the site's activation at one position (and
one head's slice for head sites) with the clean value.

Activations are keyed by (site, layer) where head sites are stored under their parent attention site
(`cross_attn_head` → `cross_attn`): a head is a slice of that same tensor.

Corruptions that are not a different input (Gaussian noise on the image embeddings) are a function
`corrupt_image_fn(embeddings) -> embeddings` applied to the output of
`adapter.image_embedding_module()` in the corrupt run and in every patched run; it must be
deterministic (same noise on every call), see `multiplicative_noise` / `additive_noise`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.method.metrics import result_row, scores

ImageFn = Callable[[torch.Tensor], torch.Tensor]
SiteKey = tuple[str, int]  # (module site, layer)


def activation_key(site: str, layer: int) -> SiteKey:
    """Key of the tensor that holds `site` at `layer` (head sites map to their parent site)."""
    return HEAD_SITE_PARENT.get(site, site), layer


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
) -> tuple[torch.Tensor, dict[SiteKey, torch.Tensor]]:
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


def capture_activations(
    adapter: VLMAdapter, inp: ModelInput, sites: Sequence[SiteKey], image_fn: ImageFn | None = None
) -> dict[SiteKey, torch.Tensor]:
    """Activations [T, D] of `inp` at `sites` ((site, layer) pairs) from one forward pass."""
    return capture(adapter, inp, sites, image_fn)[1]


def check_patch(adapter: VLMAdapter, patch: Patch, seq_len: int) -> None:
    """Raise ValueError naming the patch when its head, position or layer does not exist."""
    is_head = patch.site in HEAD_SITE_PARENT
    if is_head and not 0 <= patch.head < adapter.n_heads:
        raise ValueError(f"{patch}: head must be in [0, {adapter.n_heads})")
    if not is_head and patch.head != -1:
        raise ValueError(f"{patch}: a module site takes no head (head=-1)")
    if not 0 <= patch.position < seq_len:
        raise ValueError(f"{patch}: position outside the prompt of length {seq_len}")
    if not 0 <= patch.layer < adapter.n_layers:
        raise ValueError(f"{patch}: layer must be in [0, {adapter.n_layers})")


def check_patches(
    adapter: VLMAdapter, clean_inp: ModelInput, corrupt_inp: ModelInput, patches: Sequence[Patch]
) -> None:
    """Raise ValueError unless the prompts line up position by position and every patch exists."""
    if clean_inp.input_ids.shape != corrupt_inp.input_ids.shape:
        raise ValueError(
            f"clean and corrupt prompts have different token lengths ({clean_inp.input_ids.shape[1]} vs "
            f"{corrupt_inp.input_ids.shape[1]}): positions would not line up"
        )
    for patch in patches:
        check_patch(adapter, patch, clean_inp.input_ids.shape[1])


def _overwrite(patch: Patch, clean: torch.Tensor, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(x) = x with x[0, position, slice] taken from clean[position, slice]."""
    dims = slice(None) if patch.head < 0 else slice(patch.head * head_dim, (patch.head + 1) * head_dim)

    def overwrite(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()  # never modify a tensor the model may still read elsewhere
        x[0, patch.position, dims] = clean[patch.position, dims].to(x.dtype)
        return x

    return overwrite


def run_patched(
    adapter: VLMAdapter,
    corrupt_inp: ModelInput,
    patch: Patch | Sequence[Patch],
    clean_acts: dict[SiteKey, torch.Tensor],
    corrupt_image_fn: ImageFn | None = None,
) -> torch.Tensor:
    """Answer logits [V] of ONE forward of the corrupt input with the patch(es) applied.

    Several patches are applied together in the same run; patches on the same module compose in
    order (each hook sees the previous one's result).
    """
    patches = [patch] if isinstance(patch, Patch) else list(patch)
    with ExitStack() as stack:
        stack.enter_context(image_embeddings_replaced(adapter, corrupt_image_fn))
        for p in patches:
            check_patch(adapter, p, corrupt_inp.input_ids.shape[1])
            key = activation_key(p.site, p.layer)
            module, kind = adapter.site_module(*key)
            stack.enter_context(hooked(module, kind, _overwrite(p, clean_acts[key], adapter.head_dim)))
        return adapter.answer_logits(corrupt_inp)


def patch_sample(
    adapter: VLMAdapter,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    patches: Sequence[Patch],
    tau: int,
    tau_p: int,
    corrupt_image_fn: ImageFn | None = None,
    clean: tuple[torch.Tensor, dict[SiteKey, torch.Tensor]] | None = None,
) -> list[dict]:
    """One result row (metrics.ROW_COLUMNS) per patch, in the order of `patches`.

    The clean run is `clean_inp` as is; the corrupt run is `corrupt_inp` with `corrupt_image_fn`
    (SIP: other image; STR: other prompt of equal token length; noise: same input plus the fn).
    `clean` is the clean run's (logits, activations) when already computed (the workflow's clean
    cache); it must hold every patched site. `token` is the clean prompt's token at the patched position.
    """
    check_patches(adapter, clean_inp, corrupt_inp, patches)
    if clean is None:
        clean = capture(adapter, clean_inp, [(p.site, p.layer) for p in patches])
    clean_logits, clean_acts = clean
    with image_embeddings_replaced(adapter, corrupt_image_fn):
        corrupt_logits = adapter.answer_logits(corrupt_inp)
    clean_scores, corrupt_scores = scores(clean_logits, tau, tau_p), scores(corrupt_logits, tau, tau_p)
    return [
        result_row(
            p.site,
            p.layer,
            p.head,
            p.position,
            clean_inp.tokens[p.position],
            clean_scores,
            corrupt_scores,
            scores(run_patched(adapter, corrupt_inp, p, clean_acts, corrupt_image_fn), tau, tau_p),
        )
        for p in patches
    ]


def default_patches(adapter: VLMAdapter, inp: ModelInput, answer_token_id: int) -> list[Patch]:
    """The standard experiment, in this order:

    1. module-wise: for site in adapter.module_sites, for layer in 0..n_layers-1, for position in
       adapter.patch_positions(inp) (ascending): Patch(site, layer, position);
    2. head-wise, at adapter.head_position(inp, answer_token_id): for layer, for head in
       0..n_heads-1: Patch(adapter.head_site, layer, position, head).
    """
    positions = adapter.patch_positions(inp)
    head_pos = adapter.head_position(inp, answer_token_id)
    module_wise = [
        Patch(site, layer, position)
        for site in adapter.module_sites
        for layer in range(adapter.n_layers)
        for position in positions
    ]
    head_wise = [
        Patch(adapter.head_site, layer, head_pos, head)
        for layer in range(adapter.n_layers)
        for head in range(adapter.n_heads)
    ]
    return module_wise + head_wise


def _seeded_normal(shape: torch.Size, seed: int) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same noise on every device.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def multiplicative_noise(nu: float, seed: int) -> ImageFn:
    """Palit et al.: embeddings × ε, ε ~ N(1, ν²) elementwise (ν is the standard deviation; they use 5)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x * (1 + nu * _seeded_normal(x.shape, seed)).to(x.device, x.dtype)

    return apply


def additive_noise(scale: float, seed: int, sigma: float | None = None) -> ImageFn:
    """ROME-style: embeddings + N(0, (scale·σ)²), σ given or else the std of the embeddings themselves."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        std = float(x.float().std()) if sigma is None else sigma
        return x + (scale * std * _seeded_normal(x.shape, seed)).to(x.device, x.dtype)

    return apply
