"""Building blocks of the fast patching engine shared by the architecture families.

A family engine (`FastFamily` subclass, named by its families' rows of the family table,
notice.families) is created once per sample: its constructor runs the clean (unless its run is given
from a cache) and the corrupt input once and caches what the patched runs reuse. `run_rows` then
computes many patched runs at once, one row per patch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import ClassVar, Literal

import torch

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.patching.hooks import CleanRun, ImageFn, hooked
from notice.patching.sites import SiteKey, activation_key

Run = Literal["clean", "corrupt"]


class FastFamily(ABC):
    """Exact batched patching for one adapter family, bound to one (clean, corrupt) sample."""

    # Activation sites in the order they are computed inside one layer; a patch at a site changes
    # only what is computed after it.
    stages: ClassVar[tuple[str, ...]]
    clean_logits: torch.Tensor  # set by the constructor (a cached clean run) or by capture_runs
    corrupt_logits: torch.Tensor  # set by capture_runs

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
        with torch.no_grad():
            if clean is not None:
                self.clean_logits = clean[0].to(adapter.device).float()
                self.sites["clean"] = {key: value.to(adapter.device, adapter.dtype) for key, value in clean[1].items()}
            self.capture_runs(None if clean is not None else clean_inp, corrupt_inp, image_fn)

    @abstractmethod
    def capture_runs(self, clean_inp: ModelInput | None, corrupt_inp: ModelInput, image_fn: ImageFn | None) -> None:
        """Run the clean input (None: its run came from the cache) and then the corrupt input with
        `image_fn` on its image embeddings: set `clean_logits` / `corrupt_logits` (float32 [V]) and
        `self.sites[run]`, and keep what patched rows reuse from the corrupt run."""

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
        """Store a capture's per-layer values of the stage sites as `self.sites[run]` (None: the layer has no such
        site)."""
        self.sites[run] = {
            (site, layer): value
            for site in self.stages
            for layer, value in enumerate(per_layer[site])
            if value is not None
        }

    def is_noop(self, patch: Patch) -> bool:
        """True when the clean value written by the patch is bit-identical to the corrupt one.

        Such a patch leaves the corrupt forward pass unchanged, so its result is the corrupt run's
        (e.g. a decoder's positions before the image under SIP).
        """
        clean = self.activation("clean", patch.site, patch.layer)[patch.position]
        corrupt = self.activation("corrupt", patch.site, patch.layer)[patch.position]
        dims = head_slice(patch.head, self.head_dim)
        return torch.equal(clean[dims], corrupt[dims])

    @contextmanager
    def clean_value_hooks(self, layer: int, patches: Sequence[Patch], first_row: int, start: int = 0) -> Iterator[None]:
        """While active, the site hooks at `layer` write the clean values of `patches` into rows
        first_row.. of the batch, whose positions begin at prompt position `start`."""
        rows = torch.arange(first_row, first_row + len(patches), device=self.adapter.device)
        with ExitStack() as stack:
            for site in self.stages:
                mine = [i for i, p in enumerate(patches) if self.stage(p.site) == self.stage(site)]
                if not mine:
                    continue
                chosen = [patches[i] for i in mine]
                positions = torch.tensor([p.position for p in chosen], device=self.adapter.device)
                clean = self.activation("clean", site, layer)[positions]
                where = (rows[mine], positions - start)

                def overwrite(x: torch.Tensor, clean=clean, where=where, chosen=chosen) -> torch.Tensor:
                    x = x.clone()
                    take = head_mask(chosen, x.shape[-1], self.head_dim, x.device)
                    x[where] = torch.where(take, clean.to(x.dtype), x[where])
                    return x

                module, kind = self.adapter.site_module(site, layer)
                stack.enter_context(hooked(module, kind, overwrite))
            yield

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


def main_output(output) -> torch.Tensor:
    """The main tensor of a layer's output (a tensor, or the first element of a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]
