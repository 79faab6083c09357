"""The family table: every model family the workflow supports, one row each.

A row names the family's parts by where they live ("module:attribute", or a module): its adapter (the contract,
`notice.adapters.base.VLMAdapter`), its fast patching engine (`notice.patching.fast_core.FastFamily`), a
builder of a tiny random model and processor offline (`notice.testing`), its `make bench` layout
(`notice.bench.layouts`) and, for the demo's two families, the toy model the demo trains
(`notice.demo.toy_family.ToyFamily`). Each reader imports the part it needs when it needs it (the loader
the adapter, `get_engine` the engine, `make bench` the layout, the demo the toy, the tests the tiny
builder), so the table imports nothing, lies on the ground floor, and a job that loads one model imports
that family's code only. `tests/test_families.py` resolves every part of every row.

Adding a family is its adapter module, its engine if no existing one fits, its tiny builder and bench
layout, and one row here (docs/adding_a_model_family.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

Part = Literal["adapter", "engine", "tiny", "bench", "toy"]
PARTS: tuple[Part, ...] = ("adapter", "engine", "tiny", "bench", "toy")
REQUIRED_PARTS: tuple[Part, ...] = ("adapter", "engine", "tiny", "bench")


@dataclass(frozen=True)
class Family:
    """One row of the family table."""

    name: str  # what configs (`models.<name>.adapter`), `make bench` and tables call it
    model_types: tuple[str, ...]  # Hugging Face `config.model_type` values it takes
    adapter: str  # its VLMAdapter subclass
    engine: str  # its fast engine, a FastFamily subclass (one engine may serve several families)
    tiny: str  # `build(seed=0, **overrides) -> (model, processor)`: tiny, random, offline
    bench: str  # its `make bench` layout module: `bench_case(...)` (notice.bench.case), optional SCREEN_KEY_PREFIX
    toy: str | None = None  # the demo's toy model, a ToyFamily subclass
    # Not the default adapter of its model types but chosen by name (`load_adapter(adapter=...)`, the model
    # section's `adapter` key), e.g. a second patched stream of the same checkpoints.
    opt_in: bool = False

    def load(self, part: Part) -> Any:
        """The object (or module) a part names, imported now; LookupError naming the family and the part if it is
        missing."""
        ref = getattr(self, part)
        if not ref:
            raise LookupError(f"family table: {self.name!r} has no {part}")
        module_name, _, attribute = ref.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise LookupError(f"family table: {self.name}.{part} = {ref!r}: {error}") from error
        if not attribute:
            return module
        try:
            return getattr(module, attribute)
        except AttributeError:
            raise LookupError(
                f"family table: {self.name}.{part} = {ref!r}: module {module_name} has no {attribute!r}"
            ) from None


_DECODER = "notice.patching.fast_decoder:DecoderFast"

FAMILIES: tuple[Family, ...] = (
    Family(
        "blip",
        ("blip",),
        adapter="notice.adapters.blip:BlipAdapter",
        engine="notice.patching.fast_blip:BlipFast",
        tiny="notice.testing.tiny_blip:build",
        bench="notice.bench.layouts.blip",
        toy="notice.demo.blip_toy:BlipToy",
    ),
    Family(
        "llava",
        ("llava",),
        adapter="notice.adapters.llava:LlavaAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_llava:build",
        bench="notice.bench.layouts.llava",
        toy="notice.demo.llava_toy:LlavaToy",
    ),
    Family(
        "llava_next",
        ("llava_next",),
        adapter="notice.adapters.llava_next:LlavaNextAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_llava_next:build",
        bench="notice.bench.layouts.llava_next",
    ),
    Family(
        "llava_onevision",
        ("llava_onevision",),
        adapter="notice.adapters.llava_onevision:LlavaOnevisionAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_llava_onevision:build",
        bench="notice.bench.layouts.llava_onevision",
    ),
    Family(
        "qwen2_vl",
        ("qwen2_vl",),
        adapter="notice.adapters.qwen2_vl:Qwen2VLAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_qwen2_vl:build_qwen2_vl",
        bench="notice.bench.layouts.qwen2_vl",
    ),
    Family(
        "qwen2_5_vl",
        ("qwen2_5_vl",),
        adapter="notice.adapters.qwen2_vl:Qwen25VLAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_qwen2_vl:build_qwen2_5_vl",
        bench="notice.bench.layouts.qwen2_vl",
    ),
    Family(
        "qwen3_vl",
        ("qwen3_vl",),
        adapter="notice.adapters.qwen3_vl:Qwen3VLAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_qwen3_vl:build_qwen3_vl",
        bench="notice.bench.layouts.qwen3_vl",
    ),
    Family(
        "qwen3_vl_moe",
        ("qwen3_vl_moe",),
        adapter="notice.adapters.qwen3_vl:Qwen3VLMoeAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_qwen3_vl:build_qwen3_vl_moe",
        bench="notice.bench.layouts.qwen3_vl",
    ),
    Family(
        "qwen3_5",
        ("qwen3_5",),
        adapter="notice.adapters.qwen3_5:Qwen35Adapter",
        engine="notice.patching.fast_qwen3_5:Qwen35Fast",
        tiny="notice.testing.tiny_qwen3_5:build",
        bench="notice.bench.layouts.qwen3_5",
    ),
    Family(
        "qwen3_5_moe",
        ("qwen3_5_moe",),
        adapter="notice.adapters.qwen3_5:Qwen35MoeAdapter",
        engine="notice.patching.fast_qwen3_5:Qwen35Fast",
        tiny="notice.testing.tiny_qwen3_5:build_moe",
        bench="notice.bench.layouts.qwen3_5",
    ),
    Family(
        "idefics3",
        ("idefics3",),
        adapter="notice.adapters.idefics3:Idefics3Adapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_idefics3:build_idefics3",
        bench="notice.bench.layouts.idefics3",
    ),
    Family(
        "smolvlm",
        ("smolvlm",),
        adapter="notice.adapters.idefics3:SmolVLMAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_idefics3:build_smolvlm",
        bench="notice.bench.layouts.idefics3",
    ),
    Family(
        "internvl",
        ("internvl",),
        adapter="notice.adapters.internvl:InternVLAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_internvl:build",
        bench="notice.bench.layouts.internvl",
    ),
    Family(
        "mistral3",
        ("mistral3",),
        adapter="notice.adapters.mistral3:Mistral3Adapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_mistral3:build",
        bench="notice.bench.layouts.mistral3",
    ),
    Family(
        "mllama",
        ("mllama",),
        adapter="notice.adapters.mllama:MllamaAdapter",
        engine="notice.patching.fast_mllama:MllamaFast",
        tiny="notice.testing.tiny_mllama:build",
        bench="notice.bench.layouts.mllama",
    ),
    Family(
        "paligemma",
        ("paligemma",),
        adapter="notice.adapters.paligemma:PaliGemmaAdapter",
        engine="notice.patching.fast_prefix_lm:PrefixLMFast",
        tiny="notice.testing.tiny_paligemma:build",
        bench="notice.bench.layouts.paligemma",
    ),
    Family(
        "gemma3",
        ("gemma3",),
        adapter="notice.adapters.gemma3:Gemma3Adapter",
        engine="notice.patching.fast_block_causal:BlockCausalFast",
        tiny="notice.testing.tiny_gemma3:build",
        bench="notice.bench.layouts.gemma3",
    ),
    Family(
        "blip2",
        ("blip-2",),
        adapter="notice.adapters.blip2:Blip2Adapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_blip2:build_blip2",
        bench="notice.bench.layouts.blip2",
    ),
    Family(
        "instructblip",
        ("instructblip",),
        adapter="notice.adapters.blip2:InstructBlipAdapter",
        engine=_DECODER,
        tiny="notice.testing.tiny_blip2:build_instructblip",
        bench="notice.bench.layouts.blip2",
    ),
    Family(
        "blip2_qformer",
        ("blip-2",),
        adapter="notice.adapters.blip2:Blip2QFormerAdapter",
        engine="notice.patching.fast_blip2:QFormerFast",
        tiny="notice.testing.tiny_blip2:build_blip2",
        bench="notice.bench.layouts.blip2",
        opt_in=True,
    ),
    Family(
        "instructblip_qformer",
        ("instructblip",),
        adapter="notice.adapters.blip2:InstructBlipQFormerAdapter",
        engine="notice.patching.fast_blip2:QFormerFast",
        tiny="notice.testing.tiny_blip2:build_instructblip",
        bench="notice.bench.layouts.blip2",
        opt_in=True,
    ),
)


def families(*, opt_in: bool = True) -> list[Family]:
    """The rows in table order; `opt_in=False` leaves the opt-in adapters out. (Readers call this, or the
    lookups below, rather than holding FAMILIES: a test may add a row.)"""
    return [f for f in FAMILIES if opt_in or not f.opt_in]


def family_names(*, opt_in: bool = True) -> list[str]:
    """Names of the families in table order; `opt_in=False` leaves the opt-in adapters out."""
    return [f.name for f in families(opt_in=opt_in)]


def family(name: str) -> Family:
    """The row named `name`; ValueError listing the names if there is none."""
    for row in FAMILIES:
        if row.name == name:
            return row
    raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(family_names())}")


def default_family(model_type: str) -> Family | None:
    """The row that handles `model_type` by default (not an opt-in one); None if no family takes it."""
    return next((f for f in FAMILIES if model_type in f.model_types and not f.opt_in), None)


def families_for(model_type: str) -> list[Family]:
    """Every row that takes `model_type`, opt-in ones included."""
    return [f for f in FAMILIES if model_type in f.model_types]


def model_types() -> list[str]:
    """Every model type some family takes by default, sorted."""
    return sorted({t for f in FAMILIES if not f.opt_in for t in f.model_types})


def family_of(adapter_class: type) -> Family | None:
    """The row whose adapter is `adapter_class` (compared by where the class is defined; nothing is imported)."""
    ref = f"{adapter_class.__module__}:{adapter_class.__qualname__}"
    return next((f for f in FAMILIES if f.adapter == ref), None)
