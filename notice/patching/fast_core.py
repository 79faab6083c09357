"""Building blocks of the fast patching engine shared by the architecture families.

A family engine (`FastFamily` subclass, registered under the adapter's `family`) is created once per
sample: its constructor runs the clean (unless its run is given from a cache) and the corrupt input
once through its own functional copy of the model's layers (same weights, same operations as the
Hugging Face modules) and caches what the patched runs reuse. `run_rows` then computes many patched
runs at once, one row per patch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, Sequence

import torch

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.patching.reference import ImageFn, SiteKey, activation_key

Run = Literal["clean", "corrupt"]
CleanRun = tuple[torch.Tensor, dict[SiteKey, torch.Tensor]]  # (answer logits [V], activations [T, width])


class FastFamily(ABC):
    """Exact batched patching for one adapter family, bound to one (clean, corrupt) sample."""

    family: ClassVar[str]
    # Activation sites in the order they are computed inside one layer; a patch at a site changes
    # only what is computed after it.
    stages: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        adapter: VLMAdapter,
        clean_inp: ModelInput,
        corrupt_inp: ModelInput,
        image_fn: ImageFn | None = None,
        clean: CleanRun | None = None,
    ):
        self.adapter = adapter
        self.head_dim = adapter.head_dim
        self.seq_len = clean_inp.input_ids.shape[1]
        # Site activations [T, width] of both runs, keyed like the reference engine's.
        self.sites: dict[Run, dict[SiteKey, torch.Tensor]] = {}
        device, dtype = adapter.device, adapter.dtype
        with torch.no_grad():
            clean_image = None
            if clean is None:
                clean_image = self.image_embeddings(clean_inp.pixel_values)
                self.clean_logits = self.capture("clean", clean_inp, clean_image)
            else:
                self.clean_logits = clean[0].to(device).float()
                self.sites["clean"] = {key: value.to(device, dtype) for key, value in clean[1].items()}
            # The image encoder runs once per distinct image.
            same_image = clean_image is not None and torch.equal(clean_inp.pixel_values, corrupt_inp.pixel_values)
            corrupt_image = clean_image if same_image else self.image_embeddings(corrupt_inp.pixel_values)
            if image_fn is not None:
                corrupt_image = image_fn(corrupt_image)
            # Captured last, so whatever the family keeps for patched rows is the corrupt run's.
            self.corrupt_logits = self.capture("corrupt", corrupt_inp, corrupt_image)

    @abstractmethod
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What `adapter.image_embedding_module()` outputs for these pixels (noise is applied to it)."""

    @abstractmethod
    def capture(self, run: Run, inp: ModelInput, image: torch.Tensor) -> torch.Tensor:
        """One full forward pass: fill `self.sites[run]` (and the family's caches); return the logits
        [V] (float32)."""

    @abstractmethod
    def order_key(self, patch: Patch) -> tuple:
        """Sort key that puts patches sharing most of their computation next to each other."""

    @abstractmethod
    def row_bytes(self, patch: Patch) -> int:
        """Working memory of one patched row in a chunk led by `patch` (the chunk's first in
        `order_key` order), for choosing how many rows run together."""

    @abstractmethod
    def run_rows(self, patches: Sequence[Patch]) -> torch.Tensor:
        """Answer logits [len(patches), V] (float32), one row per patch, in the order given."""

    # -- shared helpers ---------------------------------------------------------------------
    def stage(self, site: str) -> int:
        return self.stages.index(HEAD_SITE_PARENT.get(site, site))

    def stage_of(self, patches: Sequence[Patch]) -> torch.Tensor:
        """[n, 1] stage index of each patch's site (for torch.where over rows)."""
        return torch.tensor([self.stage(p.site) for p in patches], device=self.adapter.device)[:, None]

    def activation(self, run: Run, site: str, layer: int) -> torch.Tensor:
        """The activation [T, width] of `site` (head sites: their parent site) at `layer`."""
        key = activation_key(site, layer)
        try:
            return self.sites[run][key]
        except KeyError:
            raise KeyError(f"the {run} run's activations hold no {key}") from None

    def record_sites(self, run: Run, per_layer: dict[str, list[torch.Tensor]]) -> None:
        """Store a capture's per-layer values of the stage sites as `self.sites[run]`."""
        self.sites[run] = {(site, layer): value for site in self.stages for layer, value in enumerate(per_layer[site])}

    def is_noop(self, patch: Patch) -> bool:
        """True when the clean value written by the patch is bit-identical to the corrupt one.

        Such a patch leaves the corrupt forward pass unchanged, so its result is the corrupt run's
        (e.g. LLaVA positions before the image and the first changed prompt token).
        """
        clean = self.activation("clean", patch.site, patch.layer)[patch.position]
        corrupt = self.activation("corrupt", patch.site, patch.layer)[patch.position]
        dims = head_slice(patch.head, self.head_dim)
        return torch.equal(clean[dims], corrupt[dims])

    def patched_inputs(self, layer: int, patches: Sequence[Patch]) -> dict[str, torch.Tensor]:
        """Per stage site, [n, width]: the corrupt value at each patch's position, where the patch's own
        site (all of it, or its head's slice) is taken from the clean run."""
        device = self.adapter.device
        positions = torch.tensor([p.position for p in patches], device=device)
        stages = self.stage_of(patches)
        values = {}
        for stage, site in enumerate(self.stages):
            corrupt = self.activation("corrupt", site, layer)[positions]
            if bool((stages == stage).any()):
                clean = self.activation("clean", site, layer)[positions]
                take = (stages == stage) & head_mask(patches, clean.shape[-1], self.head_dim, device)
                corrupt = torch.where(take, clean, corrupt)
            values[site] = corrupt
        return values


def head_slice(head: int, head_dim: int) -> slice:
    """Columns of `head` in an attention site ([h*d:(h+1)*d]); every column for a module site (-1)."""
    return slice(None) if head < 0 else slice(head * head_dim, (head + 1) * head_dim)


def head_mask(patches: Sequence[Patch], width: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Bool [n, width]: the columns each patch overwrites."""
    cols = torch.arange(width, device=device)
    heads = torch.tensor([p.head for p in patches], device=device)[:, None]
    return (heads < 0) | ((cols >= heads * head_dim) & (cols < (heads + 1) * head_dim))


def rows_by_index(index: Sequence[int], device: torch.device) -> torch.Tensor:
    """Permutation that puts rows computed in the order `index` back into order 0..n-1."""
    order = torch.empty(len(index), dtype=torch.long, device=device)
    order[torch.tensor(list(index), device=device)] = torch.arange(len(index), device=device)
    return order


FAST_FAMILIES: dict[str, type[FastFamily]] = {}


def register_fast(cls: type[FastFamily]) -> type[FastFamily]:
    FAST_FAMILIES[cls.family] = cls
    return cls
