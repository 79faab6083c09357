"""What is patched: site keys, the default patch set of an experiment, and the checks every engine runs.

Activations are keyed by (site, layer) where head sites are stored under their parent attention site
(`cross_attn_head` → `cross_attn`): a head is a slice of that same tensor (docs/method.md, §5 "Sites").
"""

from __future__ import annotations

from collections.abc import Sequence

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter

SiteKey = tuple[str, int]  # (module site, layer)


def activation_key(site: str, layer: int) -> SiteKey:
    """Key of the tensor that holds `site` at `layer` (head sites map to their parent site)."""
    return HEAD_SITE_PARENT.get(site, site), layer


def has_site(adapter: VLMAdapter, site: str, layer: int) -> bool:
    """True when `layer` has `site` (a head site: its parent; `layer`: every layer) (`VLMAdapter.layer_sites`)."""
    parent = HEAD_SITE_PARENT.get(site, site)
    return parent == "layer" or parent in adapter.layer_sites(layer)


def head_sites(adapter: VLMAdapter) -> list[str]:
    """Every head site some layer has: the adapter's `head_site` first, then the other layer kinds' (if any)."""
    by_layer = [site for layer in range(adapter.n_layers) for site in layer_head_sites(adapter, layer)]
    return list(dict.fromkeys([adapter.head_site, *by_layer]))


def site_layers(adapter: VLMAdapter, site: str) -> list[int]:
    """The layers that have `site` (`has_site`), ascending."""
    return [layer for layer in range(adapter.n_layers) if has_site(adapter, site, layer)]


def layer_head_sites(adapter: VLMAdapter, layer: int) -> list[str]:
    """The head site patched at `layer` (`VLMAdapter.layer_head_site`), or none where the layer lacks its parent
    (a linear-attention layer has no heads)."""
    site = adapter.layer_head_site(layer)
    return [site] if has_site(adapter, site, layer) else []


def all_sites(adapter: VLMAdapter) -> list[SiteKey]:
    """Every (module site, layer) a default experiment can patch; head sites live in their parent."""
    at = [
        set(adapter.layer_sites(layer)) | {HEAD_SITE_PARENT[site] for site in layer_head_sites(adapter, layer)}
        for layer in range(adapter.n_layers)
    ]
    sites = set().union(*at) if at else set()
    return [(site, layer) for site in sorted(sites) for layer in range(adapter.n_layers) if site in at[layer]]


def default_patches(adapter: VLMAdapter, inp: ModelInput, answer_token_id: int) -> list[Patch]:
    """The standard experiment, in this order:

    1. module-wise: for site in adapter.module_sites, for layer in 0..n_layers-1 that has the site
       (adapter.layer_sites), for position in adapter.patch_positions(inp) (ascending): Patch(site, layer, position);
    2. head-wise, at adapter.head_position(inp, answer_token_id): for layer that has heads (`layer_head_sites`),
       for head in 0..n_heads-1: Patch(adapter.layer_head_site(layer), layer, position, head).
    """
    positions = adapter.patch_positions(inp)
    head_pos = adapter.head_position(inp, answer_token_id)
    module_wise = [
        Patch(site, layer, position)
        for site in adapter.module_sites
        for layer in range(adapter.n_layers)
        if site in adapter.layer_sites(layer)
        for position in positions
    ]
    head_wise = [
        Patch(site, layer, head_pos, head)
        for layer in range(adapter.n_layers)
        for site in layer_head_sites(adapter, layer)
        for head in range(adapter.n_heads)
    ]
    return module_wise + head_wise


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
    parent = HEAD_SITE_PARENT.get(patch.site, patch.site)
    if parent in adapter.module_sites and parent not in adapter.layer_sites(patch.layer):
        sites = adapter.layer_sites(patch.layer)
        raise ValueError(f"{patch}: layer {patch.layer} has no {parent} (its sites: {', '.join(sites)})")


def check_aligned(clean_inp: ModelInput, corrupt_inp: ModelInput) -> None:
    """Raise ValueError unless the clean and corrupt prompts line up position by position."""
    if clean_inp.input_ids.shape != corrupt_inp.input_ids.shape:
        raise ValueError(
            f"clean and corrupt prompts have different token lengths ({clean_inp.input_ids.shape[1]} vs "
            f"{corrupt_inp.input_ids.shape[1]}): positions would not line up"
        )


def check_patches(
    adapter: VLMAdapter, clean_inp: ModelInput, corrupt_inp: ModelInput, patches: Sequence[Patch]
) -> None:
    """Raise ValueError unless the prompts line up position by position and every patch exists."""
    check_aligned(clean_inp, corrupt_inp)
    for patch in patches:
        check_patch(adapter, patch, clean_inp.input_ids.shape[1])
