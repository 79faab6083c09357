"""Attribution patching: a first-order estimate of every site's patching effect (docs/method.md, §9).

Exact patching of one site costs one patched run; the screen estimates all of them at once. For an
activation a (a module site at one position, one head's slice of an attention site at one position,
or one row of the image embeddings), the effect of patching it is

    LD(corrupt run with a := a_clean) − LD(corrupt run)  ≈  (a_clean − a_corrupt) · ∂LD/∂a

with the gradient taken in the corrupt run (AtP, Nanda 2023). The estimate is exact when LD is linear
in a. The whole screen costs one clean forward, one corrupt forward and one backward pass, whatever
the number of sites.

GradDrop (AtP*, Kramár et al. 2024) guards against false negatives where a site's direct and indirect
effects cancel: for each layer ℓ the backward pass is repeated with the gradient through layer ℓ's
residual branches (the outputs of its module sites' modules) set to zero, and the score is
(1/(L−1)) Σ_ℓ |estimate with ℓ dropped|. It is an unsigned score, compared with |exact|, and costs L
more backward passes (over the same forward).

The gradient is read without changing any activation: a zero tensor that requires grad is added to
each site's activation in the corrupt run, and ∂LD/∂a is its gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, VLMAdapter
from notice.method.metrics import logit_diff
from notice.patching.reference import ImageFn, SiteKey, activation_key, hooked, image_embeddings_replaced

METHODS = ("atp", "atp_star")
IMAGE_SITE = "image"  # rows of the image embeddings the text side reads (`image_embedding_module`'s output)
IMAGE_LAYER = -1  # the image embeddings come before the patched stream's layers
SCREEN_COLUMNS: tuple[str, ...] = ("site", "layer", "head", "position", "token", "estimate", "ld_clean", "ld_corrupt")


def screen_sites(adapter: VLMAdapter, sites: Sequence[str] | None = None) -> list[str]:
    """The sites a screen covers: `sites` checked against the adapter's, or by default every module site,
    the head site and the image embeddings."""
    known = [*adapter.module_sites, adapter.head_site, "layer", IMAGE_SITE]
    if sites is None:
        return [*adapter.module_sites, adapter.head_site, IMAGE_SITE]
    unknown = [site for site in sites if site not in known]
    if unknown:
        raise ValueError(f"screen sites {unknown} do not exist in {adapter.family} (expected some of {known})")
    return list(dict.fromkeys(sites))


@dataclass
class Estimates:
    """One pair's screen: LD of the clean and corrupt runs, and per (site, layer) the estimates
    ([T] for a module site, [T, H] for a head site, [R] image-embedding rows for the image site)."""

    ld_clean: float
    ld_corrupt: float
    values: dict[SiteKey, torch.Tensor]
    method: str


class _GradGate(torch.autograd.Function):
    """Identity forward; backward passes the gradient unless `state["dropped"]` is this gate's layer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: dict, layer: int) -> torch.Tensor:
        ctx.state, ctx.layer = state, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (grad,) = grads
        return (torch.zeros_like(grad) if ctx.state["dropped"] == ctx.layer else grad), None, None


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """While active no parameter requires grad (no weight gradients are built); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _image_rows(x: torch.Tensor) -> torch.Tensor:
    """Image embeddings of any layout (tiles, batch of one, flattened patches) as rows [R, D]."""
    return x.reshape(-1, x.shape[-1])


def _run(
    adapter: VLMAdapter,
    inp: ModelInput,
    keys: Sequence[SiteKey],
    image: bool,
    image_fn: ImageFn | None,
    leaves: dict[SiteKey, torch.Tensor] | None = None,
    gate: dict | None = None,
) -> tuple[torch.Tensor, dict[SiteKey, torch.Tensor]]:
    """Answer logits and the activations at `keys` ([T, D]; image: [R, D]) of one forward of `inp`.

    With `leaves`, a zero leaf requiring grad is added to each activation and stored there; with `gate`,
    each layer's residual branches pass their gradient through a `_GradGate`.
    """
    acts: dict[SiteKey, torch.Tensor] = {}

    def tap(key: SiteKey) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            acts[key] = (_image_rows(x) if key[0] == IMAGE_SITE else x[0]).detach()
            if leaves is None:
                return x
            leaves[key] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[key]

        return fn

    with ExitStack() as stack:
        stack.enter_context(image_embeddings_replaced(adapter, image_fn))  # before the tap: it sees the noise
        if image:
            stack.enter_context(hooked(adapter.image_embedding_module(), "output", tap((IMAGE_SITE, IMAGE_LAYER))))
        for key in keys:
            module, kind = adapter.site_module(*key)
            stack.enter_context(hooked(module, kind, tap(key)))
        if gate is not None:
            for layer in range(adapter.n_layers):
                for site in adapter.module_sites:
                    module = adapter.site_module(site, layer)[0]
                    stack.enter_context(
                        hooked(module, "output", lambda y, layer=layer: _GradGate.apply(y, gate, layer))
                    )
        logits = adapter.differentiable_answer_logits(inp)
    return logits, acts


def _dots(
    adapter: VLMAdapter,
    sites: Sequence[str],
    deltas: dict[SiteKey, torch.Tensor],
    grads: dict[SiteKey, torch.Tensor],
) -> dict[SiteKey, torch.Tensor]:
    """(a_clean − a_corrupt) · ∂LD/∂a per position (and per head for the head site)."""
    out: dict[SiteKey, torch.Tensor] = {}
    for site in sites:
        layers = [IMAGE_LAYER] if site == IMAGE_SITE else range(adapter.n_layers)
        for layer in layers:
            key = (IMAGE_SITE, IMAGE_LAYER) if site == IMAGE_SITE else activation_key(site, layer)
            product = deltas[key] * grads[key]
            if site in HEAD_SITE_PARENT:
                out[(site, layer)] = product.view(product.shape[0], adapter.n_heads, adapter.head_dim).sum(-1)
            else:
                out[(site, layer)] = product.sum(-1)
    return out


def attribution_estimates(
    adapter: VLMAdapter,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    tau: int,
    tau_p: int,
    sites: Sequence[str] | None = None,
    *,
    method: str = "atp",
    corrupt_image_fn: ImageFn | None = None,
) -> Estimates:
    """The screen of one (clean, corrupt) pair: every site of `sites` (screen_sites) at every position
    of the patched stream, every head at every position, every image-embedding row."""
    if method not in METHODS:
        raise ValueError(f"screen method {method!r}: expected one of {METHODS}")
    if clean_inp.input_ids.shape != corrupt_inp.input_ids.shape:
        raise ValueError(
            f"clean and corrupt prompts have different token lengths ({clean_inp.input_ids.shape[1]} vs "
            f"{corrupt_inp.input_ids.shape[1]}): positions would not line up"
        )
    sites = screen_sites(adapter, sites)
    image = IMAGE_SITE in sites
    keys = list(
        dict.fromkeys(activation_key(s, layer) for s in sites if s != IMAGE_SITE for layer in range(adapter.n_layers))
    )
    with torch.no_grad():
        clean_logits, clean_acts = _run(adapter, clean_inp, keys, image, None)
    leaves: dict[SiteKey, torch.Tensor] = {}
    gate: dict | None = {"dropped": None} if method == "atp_star" else None
    with frozen_parameters(adapter.model), torch.enable_grad():
        corrupt_logits, corrupt_acts = _run(adapter, corrupt_inp, keys, image, corrupt_image_fn, leaves, gate)
        ld = logit_diff(corrupt_logits, tau, tau_p)
        all_keys = list(leaves)
        for key in all_keys:
            if clean_acts[key].shape != corrupt_acts[key].shape:
                raise ValueError(
                    f"{key}: clean and corrupt activations have shapes {tuple(clean_acts[key].shape)} and "
                    f"{tuple(corrupt_acts[key].shape)}: rows would not line up"
                )
        deltas = {key: (clean_acts[key] - corrupt_acts[key]).float() for key in all_keys}

        def backward(retain: bool) -> dict[SiteKey, torch.Tensor]:
            grads = torch.autograd.grad(ld, [leaves[k] for k in all_keys], retain_graph=retain, allow_unused=True)
            return {
                key: (torch.zeros_like(deltas[key]) if g is None else _flat(key, g).float())
                for key, g in zip(all_keys, grads)
            }

        if gate is None:
            values = _dots(adapter, sites, deltas, backward(retain=False))
        else:
            total: dict[SiteKey, torch.Tensor] = {}
            for layer in range(adapter.n_layers):
                gate["dropped"] = layer
                dropped = _dots(adapter, sites, deltas, backward(retain=layer < adapter.n_layers - 1))
                for key, value in dropped.items():
                    total[key] = total.get(key, 0) + value.abs()
            values = {key: value / max(adapter.n_layers - 1, 1) for key, value in total.items()}
    return Estimates(
        float(logit_diff(clean_logits, tau, tau_p)),
        float(ld.detach()),
        {key: value.detach().cpu() for key, value in values.items()},
        method,
    )


def _flat(key: SiteKey, grad: torch.Tensor) -> torch.Tensor:
    return _image_rows(grad) if key[0] == IMAGE_SITE else grad[0]


def estimates_table(estimates: Estimates, tokens: Sequence[str]) -> pd.DataFrame:
    """SCREEN_COLUMNS rows, one per site × layer × position (× head); `tokens` are the clean prompt's."""
    frames = []
    for (site, layer), value in estimates.values.items():
        array = value.numpy()
        if array.ndim == 2:  # head site: [T, H]
            positions, heads = np.divmod(np.arange(array.size), array.shape[1])
        else:
            positions, heads = np.arange(array.size), np.full(array.size, -1)
        if site == IMAGE_SITE:
            names = np.asarray([f"<image row {p}>" for p in range(array.size)])
        else:
            names = np.asarray(tokens, dtype=object)[positions]
        frames.append(
            pd.DataFrame(
                {
                    "site": site,
                    "layer": layer,
                    "head": heads,
                    "position": positions,
                    "token": names,
                    "estimate": array.ravel().astype(np.float64),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    table["ld_clean"] = estimates.ld_clean
    table["ld_corrupt"] = estimates.ld_corrupt
    return table[list(SCREEN_COLUMNS)]
