"""Forward passes of the circuit graph: every node output and every node input the graph names is a *slot* (a
hooked tensor), which a run records, replaces by a given value, or stops at (docs/method.md, §12).

Slots: ("input", "image"|"text", -1, i) the i-th module of `circuit_input_modules`; ("heads", site, layer, 0) the
attention's head outputs (its output projection's input, one column block per head); ("module", site, layer, 0) a
module site's output (an MLP); ("proj", site, layer, 0|1|2) the attention's query, key and value projections.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, VLMAdapter
from notice.patching.hooks import ImageFn, hooked, image_embeddings_replaced
from notice.patching.sites import layer_head_sites

Slot = tuple[str, str, int, int]
ATTENTION_SITES = ("self_attn", "cross_attn")
IMAGE_READERS = ("cross_attn",)  # attention sites whose keys and values are projections of the image


def attention_sites(adapter: VLMAdapter, layer: int) -> list[str]:
    """The attention sites of `layer` with heads (their head outputs are nodes; a linear-attention layer has none):
    the layer's head site's parent, and every other attention site the layer has."""
    heads = [HEAD_SITE_PARENT[site] for site in layer_head_sites(adapter, layer)]
    others = [s for s in adapter.layer_sites(layer) if s in ATTENTION_SITES and s not in heads]
    return [*heads, *others]


def module_sites(adapter: VLMAdapter, layer: int) -> list[str]:
    """The sites of `layer` that are whole-module nodes (an MLP): every site that is not an attention site."""
    return [s for s in adapter.layer_sites(layer) if s not in ATTENTION_SITES]


def graph_slots(adapter: VLMAdapter) -> list[Slot]:
    """Every slot of the adapter's graph (in no particular order; a run records the order they fire in)."""
    inputs = adapter.circuit_input_modules()
    slots: list[Slot] = [("input", kind, -1, i) for kind in ("image", "text") for i in range(len(inputs[kind]))]
    for layer in range(adapter.n_layers):
        for site in attention_sites(adapter, layer):
            slots += [("proj", site, layer, i) for i in range(3)] + [("heads", site, layer, 0)]
        slots += [("module", site, layer, 0) for site in module_sites(adapter, layer)]
    return slots


def slot_module(adapter: VLMAdapter, slot: Slot) -> tuple[torch.nn.Module, str]:
    kind, site, layer, index = slot
    if kind == "input":
        return adapter.circuit_input_modules()[site][index], "output"
    if kind == "proj":
        return adapter.attention_projections(site, layer)[index], "output"
    return adapter.site_module(site, layer)


STREAM: Slot = ("stream", "", 0, 0)  # the residual stream entering the first layer (recorded, never forced)


def _kept(run: Run, key: Slot):
    def keep(x: torch.Tensor) -> torch.Tensor:
        run.values[key] = x.detach().clone()
        return x

    return keep


class _Stopped(Exception):
    """Raised by the stop slot's hook: nothing after it is needed."""


@dataclass
class Run:
    """What one forward saw: answer logits (None when it stopped early), slot values, and the order they fired."""

    logits: torch.Tensor | None
    values: dict[Slot, torch.Tensor] = field(default_factory=dict)
    order: list[Slot] = field(default_factory=list)


@contextmanager
def _slots_hooked(
    adapter: VLMAdapter,
    slots: Sequence[Slot],
    forced: Mapping[Slot, torch.Tensor],
    leaves: Mapping[Slot, torch.Tensor],
    run: Run,
    record: bool,
    stop: Slot | None,
) -> Iterator[None]:
    def hook(slot: Slot):
        def fn(x: torch.Tensor) -> torch.Tensor:
            if slot in run.order:
                raise RuntimeError(f"{adapter.family}: circuit slot {slot} was computed twice in one forward")
            run.order.append(slot)
            if slot in forced:
                value = forced[slot]
                if value.shape != x.shape:
                    raise ValueError(f"{slot}: forced value {tuple(value.shape)} for an output {tuple(x.shape)}")
                x = value.to(x.dtype).clone()  # models add to some outputs in place
            if slot in leaves:
                x = x + leaves[slot]
            if record or slot == stop:
                run.values[slot] = x.clone()
            if slot == stop:
                raise _Stopped
            return x

        return fn

    with ExitStack() as stack:
        for slot in slots:
            module, kind = slot_module(adapter, slot)
            stack.enter_context(hooked(module, kind, hook(slot)))  # type: ignore[arg-type]
        yield


def forward(
    adapter: VLMAdapter,
    inp: ModelInput,
    forced: Mapping[Slot, torch.Tensor] | None = None,
    *,
    leaves: Mapping[Slot, torch.Tensor] | None = None,
    record: bool = False,
    stop: Slot | None = None,
    image_fn: ImageFn | None = None,
) -> Run:
    """One forward of `inp` with the values of `forced` slots replaced, `leaves` added to their slots (gradients),
    every slot's value kept (`record`), and the pass cut short once `stop` is computed (its value kept)."""
    run = Run(None)
    slots = graph_slots(adapter)
    with ExitStack() as stack:
        stack.enter_context(image_embeddings_replaced(adapter, image_fn))  # before the slots: they see the noise
        stack.enter_context(_slots_hooked(adapter, slots, forced or {}, leaves or {}, run, record, stop))
        if record and adapter.residual_norms(0) is not None:
            stack.enter_context(hooked(adapter.site_module("layer", 0)[0], "input", _kept(run, STREAM)))
        try:
            run.logits = adapter.differentiable_answer_logits(inp)
        except _Stopped:
            return run
    if stop is not None:
        raise RuntimeError(f"{adapter.family}: circuit slot {stop} was never computed")
    return run
