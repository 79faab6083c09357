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


def all_sites(adapter: VLMAdapter) -> list[SiteKey]:
    """Every (module site, layer) a default experiment can patch; head sites live in their parent."""
    sites = set(adapter.module_sites) | {HEAD_SITE_PARENT[adapter.head_site]}
    return [(site, layer) for site in sorted(sites) for layer in adapter.site_layers(site)]


def default_patches(adapter: VLMAdapter, inp: ModelInput, answer_token_id: int) -> list[Patch]:
    """The standard experiment, in this order:

    1. module-wise: for site in adapter.module_sites, for layer in adapter.site_layers(site) (every layer
       unless the family's layers differ), for position in adapter.patch_positions(inp) (ascending):
       Patch(site, layer, position);
    2. head-wise, at adapter.head_position(inp, answer_token_id): for layer in the head site's layers, for
       head in 0..n_heads-1: Patch(adapter.head_site, layer, position, head).
    """
    positions = adapter.patch_positions(inp)
    head_pos = adapter.head_position(inp, answer_token_id)
    module_wise = [
        Patch(site, layer, position)
        for site in adapter.module_sites
        for layer in adapter.site_layers(site)
        for position in positions
    ]
    head_wise = [
        Patch(adapter.head_site, layer, head_pos, head)
        for layer in adapter.site_layers(adapter.head_site)
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
    if patch.layer not in adapter.site_layers(patch.site):
        raise ValueError(f"{patch}: {adapter.family} has {patch.site} in layers {adapter.site_layers(patch.site)} only")


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
