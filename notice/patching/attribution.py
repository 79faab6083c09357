"""Attribution patching: a first-order estimate of every site's patching effect (docs/method.md, §9).

Exact patching of one site costs one patched run; the screen estimates all of them at once. For an
activation a (a module site at one position, one head's slice of an attention site at one position,
or one row of the image embeddings), the effect of patching it is

    LD(corrupt run with a := a_clean) − LD(corrupt run)  ≈  (a_clean − a_corrupt) · ∂LD/∂a

with the gradient taken in the corrupt run (AtP, Nanda 2023). The estimate is exact when LD is linear
in a. The whole screen costs one clean forward, one corrupt forward and one backward pass, whatever
the number of sites.

AtP* (Kramár et al. 2024) has two parts, each switchable. The query/key fix: the fusion attention's
queries and keys are sites too (per head and position; a key site of cross-attention is an image
token), and a first-order estimate through the softmax misses large effects where attention is
saturated; so for these sites the changed attention rows are recomputed exactly (`query_key_fix`), and
only the step from the probabilities on is first order. It changes the estimates of query and key
sites only. GradDrop guards against false negatives where a site's direct and indirect
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
from notice.patching.hooks import ImageFn, hooked, image_embeddings_replaced
from notice.patching.query_keys import AttentionRecord, has_attention_taps, qk_sites
from notice.patching.scores import logit_diff
from notice.patching.sites import SiteKey, activation_key, check_aligned

METHODS = ("atp", "atp_star")
IMAGE_SITE = "image"  # rows of the image embeddings the text side reads (`image_embedding_module`'s output)
IMAGE_LAYER = -1  # the image embeddings come before the patched stream's layers
SCREEN_COLUMNS: tuple[str, ...] = (
    "site",
    "layer",
    "head",
    "position",
    "token",
    "estimate",
    "estimate_atp",
    "ld_clean",
    "ld_corrupt",
)


def screen_sites(adapter: VLMAdapter, sites: Sequence[str] | None = None) -> list[str]:
    """The sites a screen covers: `sites` checked against the adapter's, or by default every module site,
    the head site, the image embeddings and (where the adapter has attention taps) the fusion attention's
    queries and keys."""
    taps = list(qk_sites(adapter)) if has_attention_taps(adapter) else []
    known = [*adapter.module_sites, adapter.head_site, "layer", IMAGE_SITE, *taps]
    if sites is None:
        return [*adapter.module_sites, adapter.head_site, IMAGE_SITE, *taps]
    unknown = [site for site in sites if site not in known]
    if unknown:
        raise ValueError(f"screen sites {unknown} do not exist in {adapter.family} (expected some of {known})")
    return list(dict.fromkeys(sites))


def method_label(method: str, qk_fix: bool | None = None, grad_drop: bool | None = None) -> tuple[str, bool, bool]:
    """(label, qk_fix, grad_drop): `atp` has neither; `atp_star` both unless switched off (label
    "atp_star" with both, else "atp+qk_fix" / "atp+grad_drop" / "atp")."""
    if method not in METHODS:
        raise ValueError(f"screen method {method!r}: expected one of {METHODS}")
    if method == "atp":
        if qk_fix or grad_drop:
            raise ValueError("qk_fix and grad_drop are the parts of method atp_star; method atp has neither")
        return "atp", False, False
    qk, gd = qk_fix is not False, grad_drop is not False
    label = "atp_star" if qk and gd else "atp+qk_fix" if qk else "atp+grad_drop" if gd else "atp"
    return label, qk, gd


@dataclass
class Estimates:
    """One pair's screen: LD of the clean and corrupt runs, and per (site, layer) the estimates
    ([T] for a module site, [T, H] for a head, query or key site, [R] image-embedding rows for the image
    site) of `method` and of plain AtP."""

    ld_clean: float
    ld_corrupt: float
    values: dict[SiteKey, torch.Tensor]
    method: str
    first_order: dict[SiteKey, torch.Tensor]  # plain AtP, whatever `method` is: to compare the two


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


def _gated(state: dict, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def gate(y: torch.Tensor) -> torch.Tensor:
        return _GradGate.apply(y, state, layer)

    return gate


def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """Attention scores [H, T, K] (float64, before the mask) of queries [H, T, d] and keys [H_kv, K, d]."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scaling
    return torch.tanh(scores / softcap) * softcap if softcap is not None else scores


def query_key_fix(
    clean_q: torch.Tensor,
    clean_k: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    grad_probs: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AtP*'s saturation-free estimates of patching one query ([T, H]) or one key ([K, H_kv]) of a layer.

    The first-order expansion through the softmax is replaced by the softmax recomputed exactly: a query t
    takes its clean value, so row t becomes softmax(q_clean·K + mask); a key s takes its clean value, so
    column s of every row t changes, and the row is renormalised. Each changed row A' counts
    Σ_s (A'_ts − A_ts) · ∂LD/∂A_ts (first order from the probabilities on); a key sums over its rows and over
    the query heads that share it. Corrupt-run queries q [H, T, d], keys k [H_kv, K, d], probabilities'
    gradient [H, T, K]; `mask` additive [T, K].
    """
    mask64 = torch.zeros(()) if mask is None else mask.double()
    raw = _scores(q, k, scaling, softcap)
    scores = raw + mask64
    probs = torch.softmax(scores, dim=-1)
    grad = grad_probs.double()
    patched_rows = torch.softmax(_scores(clean_q, k, scaling, softcap) + mask64, dim=-1)
    query = ((patched_rows - probs) * grad).sum(-1).transpose(0, 1)  # [T, H]
    # one key at a time: logit s shifts by delta, the row renormalises (log-space: exact at saturation)
    k_rep = q.shape[0] // k.shape[0]
    shift = _scores(q, clean_k, scaling, softcap) - raw  # [H, T, K]
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    rest = lse + torch.log1p(-probs.clamp(max=1.0))  # log of the row's mass outside key s...
    top = scores.argmax(-1, keepdim=True)  # ...summed directly where the key holds ~all of it (saturation)
    rest = rest.scatter(-1, top, torch.logsumexp(scores.scatter(-1, top, float("-inf")), dim=-1, keepdim=True))
    new_lse = torch.logaddexp(rest, scores + shift)
    new_prob = torch.exp(scores + shift - new_lse)
    others = torch.expm1(lse - new_lse)  # relative change of every other key's probability
    share = probs * grad
    rest_share = share.sum(-1, keepdim=True) - share  # Σ over the other keys; summed directly at the top key
    rest_share = rest_share.scatter(-1, top, share.scatter(-1, top, 0.0).sum(-1, keepdim=True))
    change = (new_prob - probs) * grad + others * rest_share
    # fully masked rows give NaN; an unchanged score changes nothing (not rounding noise)
    change = torch.nan_to_num(change, nan=0.0).masked_fill(shift == 0, 0.0)
    key = change.sum(1).view(k.shape[0], k_rep, -1).sum(1).transpose(0, 1)  # [K, H_kv]
    return query.float(), key.float()


def _run(
    adapter: VLMAdapter,
    inp: ModelInput,
    keys: Sequence[SiteKey],
    image: bool,
    image_fn: ImageFn | None,
    leaves: dict[SiteKey, torch.Tensor] | None = None,
    gate: dict | None = None,
    attention: AttentionRecord | None = None,
) -> tuple[torch.Tensor, dict[SiteKey, torch.Tensor]]:
    """Answer logits and the activations at `keys` ([T, D]; image: [R, D]) of one forward of `inp`.

    With `leaves`, a zero leaf requiring grad is added to each activation and stored there; with `gate`,
    each layer's residual branches pass their gradient through a `_GradGate`; `attention` taps the fusion
    attention.
    """
    acts: dict[SiteKey, torch.Tensor] = {}

    def tap(key: SiteKey) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            acts[key] = _flat(key, x).detach()
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
            for site in adapter.module_sites:
                for layer in adapter.site_layers(site):
                    stack.enter_context(hooked(adapter.site_module(site, layer)[0], "output", _gated(gate, layer)))
        if attention is not None:
            stack.enter_context(adapter.attention_taps(attention))
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
        layers = [IMAGE_LAYER] if site == IMAGE_SITE else adapter.site_layers(site)
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
    qk_fix: bool | None = None,
    grad_drop: bool | None = None,
    corrupt_image_fn: ImageFn | None = None,
) -> Estimates:
    """The screen of one (clean, corrupt) pair: every site of `sites` (screen_sites) at every position
    of the patched stream, every head at every position, every image-embedding row, every query and key
    of the fusion attention. `method` atp, or atp_star with its parts `qk_fix` and `grad_drop` (both by
    default; `method_label`)."""
    label, qk_fix, grad_drop = method_label(method, qk_fix, grad_drop)
    check_aligned(clean_inp, corrupt_inp)
    sites = screen_sites(adapter, sites)
    query_site, key_site = qk_sites(adapter)
    taps = query_site in sites or key_site in sites
    stream = [s for s in sites if s not in (IMAGE_SITE, query_site, key_site)]
    keys = list(dict.fromkeys(activation_key(s, layer) for s in stream for layer in adapter.site_layers(s)))
    image = IMAGE_SITE in sites
    clean_attention, attention = (AttentionRecord(False), AttentionRecord(True)) if taps else (None, None)
    with torch.no_grad():
        clean_logits, clean_acts = _run(adapter, clean_inp, keys, image, None, attention=clean_attention)
    leaves: dict[SiteKey, torch.Tensor] = {}
    gate: dict | None = {"dropped": None} if grad_drop else None
    with frozen_parameters(adapter.model), torch.enable_grad():
        corrupt_logits, corrupt_acts = _run(
            adapter, corrupt_inp, keys, image, corrupt_image_fn, leaves, gate, attention
        )
        ld = logit_diff(corrupt_logits, tau, tau_p)
        all_keys = list(leaves)
        for key in all_keys:
            if clean_acts[key].shape != corrupt_acts[key].shape:
                raise ValueError(
                    f"{key}: clean and corrupt activations have shapes {tuple(clean_acts[key].shape)} and "
                    f"{tuple(corrupt_acts[key].shape)}: rows would not line up"
                )
        deltas = {key: (clean_acts[key] - corrupt_acts[key]).float() for key in all_keys}
        tapped = dict(attention.leaf) if attention is not None else {}
        inputs = [leaves[k] for k in all_keys] + list(tapped.values())

        def backward(retain: bool) -> tuple[torch.Tensor | None, ...]:
            return torch.autograd.grad(ld, inputs, retain_graph=retain, allow_unused=True)

        def estimate(grads: tuple[torch.Tensor | None, ...], fix: bool) -> dict[SiteKey, torch.Tensor]:
            flat = {
                key: (torch.zeros_like(deltas[key]) if g is None else _flat(key, g).float())
                for key, g in zip(all_keys, grads)
            }
            values = _dots(adapter, [s for s in sites if s in stream or s == IMAGE_SITE], deltas, flat)
            if attention is not None and clean_attention is not None:
                tap_grads = {
                    k: torch.zeros_like(attention.tensors[k]) if g is None else g[0]
                    for k, g in zip(tapped, grads[len(all_keys) :])
                }
                for layer in range(adapter.n_layers):
                    query, key = _query_key(clean_attention, attention, tap_grads, layer, fix)
                    if query_site in sites:
                        values[(query_site, layer)] = query
                    if key_site in sites:
                        values[(key_site, layer)] = key
            return values

        grads = backward(retain=grad_drop)  # nothing dropped yet
        first_order = estimate(grads, fix=False)
        if gate is None:
            values = estimate(grads, fix=True) if qk_fix else first_order
        else:
            total: dict[SiteKey, torch.Tensor] = {}
            for layer in range(adapter.n_layers):
                gate["dropped"] = layer
                for key, value in estimate(backward(retain=layer < adapter.n_layers - 1), qk_fix).items():
                    total[key] = total.get(key, 0) + value.abs()
            values = {key: value / max(adapter.n_layers - 1, 1) for key, value in total.items()}
    return Estimates(
        float(logit_diff(clean_logits, tau, tau_p)),
        float(ld.detach()),
        {key: value.detach().cpu() for key, value in values.items()},
        label,
        {key: value.detach().cpu() for key, value in first_order.items()},
    )


def _query_key(
    clean: AttentionRecord, corrupt: AttentionRecord, grads: dict, layer: int, qk_fix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimates of patching each query [T, H] and each key [K, H_kv] of one fusion-attention layer."""
    clean_q, clean_k = clean.tensors[("q", layer)], clean.tensors[("k", layer)]
    q, k = corrupt.tensors[("q", layer)], corrupt.tensors[("k", layer)]
    if clean_q.shape != q.shape or clean_k.shape != k.shape:
        raise ValueError(
            f"layer {layer}: clean and corrupt queries / keys have different shapes: rows would not line up"
        )
    if qk_fix:
        scaling, mask, softcap = corrupt.settings[layer]
        return query_key_fix(clean_q, clean_k, q, k, grads[("p", layer)], scaling, mask, softcap)
    query = ((clean_q - q).float() * grads[("q", layer)].float()).sum(-1).transpose(0, 1)
    key = ((clean_k - k).float() * grads[("k", layer)].float()).sum(-1).transpose(0, 1)
    return query, key


def _flat(key: SiteKey, x: torch.Tensor) -> torch.Tensor:
    """A site's activation (or its gradient) of the one batch row: [T, D], image embeddings [R, D]."""
    return _image_rows(x) if key[0] == IMAGE_SITE else x[0]


def estimates_table(estimates: Estimates, tokens: Sequence[str]) -> pd.DataFrame:
    """SCREEN_COLUMNS rows, one per site × layer × position (× head); `tokens` are the clean prompt's."""
    frames = []
    for (site, layer), value in estimates.values.items():
        array = value.numpy()
        if array.ndim == 2:  # head site: [T, H]
            positions, heads = np.divmod(np.arange(array.size), array.shape[1])
        else:
            positions, heads = np.arange(array.size), np.full(array.size, -1)
        if site == IMAGE_SITE or site == "cross_attn_key":  # rows of the image embeddings
            names = np.asarray([f"<image row {p}>" for p in positions])
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
                    "estimate_atp": estimates.first_order[(site, layer)].numpy().ravel().astype(np.float64),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    table["ld_clean"] = estimates.ld_clean
    table["ld_corrupt"] = estimates.ld_corrupt
    return table[list(SCREEN_COLUMNS)]
