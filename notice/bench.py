"""`make bench`: cost per patched run of the fast engine against the two usual ways of patching.

For one sample per family, on random-weight models built from configs (no downloads), it times:
- fast: `notice.patching.fast.patch_sample` on the paper's whole patch set (clean and corrupt runs,
  image encoder and every cache included), divided by the number of patched runs;
- (a) hooked: one hooked full forward per patched run, with the clean activations cached once
  (what a TransformerLens user writes; it is `reference.run_patched`);
- (b) 3-row: the published code's batch of (clean, corrupt, patched) rows recomputed for every patch.
(a) and (b) are timed on a seeded random subset of the patches; the engine's rows on that subset are
checked against (a)'s logits (relative error as in `fast.max_relative_error`).

Models:
- BLIP: the `Salesforce/blip-vqa-base` architecture (ViT-B/16 at 384 px: 577 image tokens; 12-layer
  BERT-base text encoder and decoder, 12 heads, vocabulary 30524); a 12-token question.
  Patch set: mlp / self_attn / cross_attn × 12 layers × 12 positions, and the 144 cross-attention
  heads at the answer token.
- LLaVA: the LLaVA-1.5 layout (CLIP ViT-L/14 at 336 px, second-to-last layer, 576 image tokens
  spliced into a 30-token chat prompt, two-layer GELU projector) with the language model scaled down
  to LLAVA_TEXT (hidden 1024, 12 layers, 16 query / 4 key-value heads, MLP 2816, vocabulary 32064).
  Patch set: mlp / self_attn × 12 layers × the 30 text positions, and all 192 heads at the last token.
Corruption: SIP (another image, same prompt).

The last line printed is `bench: blip_speedup=<x> llava_speedup=<y> max_rel_err=<e>` (speedup of
the fast engine over (a)).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    BlipConfig, BlipForQuestionAnswering, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
)

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.adapters.blip import BlipAdapter
from notice.adapters.llava import LlavaAdapter
from notice.metrics import result_row, scores
from notice.patching import fast, reference

BLIP_QUESTION_LEN = 12
LLAVA_TEXT = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, vocab_size=32064, max_position_embeddings=4096)
LLAVA_IMAGE_TOKEN = 32000
LLAVA_TEXT_BEFORE_IMAGE = 3   # "<s> USER :"
LLAVA_TEXT_AFTER_IMAGE = 27   # "\n{question} Answer with one word. ASSISTANT:"


@dataclass
class Case:
    """One sample of one family: the adapter, the (clean, corrupt) inputs, the answer tokens, the patches."""

    name: str
    adapter: VLMAdapter
    clean: ModelInput
    corrupt: ModelInput
    tau: int
    tau_p: int
    patches: list[Patch]
    description: str


def _model_input(ids: list[int], pixel_values: torch.Tensor) -> ModelInput:
    input_ids = torch.tensor([ids])
    return ModelInput(input_ids, torch.ones_like(input_ids), pixel_values, [f"#{i}" for i in ids])


def _pixels(seed: int, size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def blip_case() -> Case:
    config = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, bos_token_id=30522, sep_token_id=102, pad_token_id=0),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=384, patch_size=16, initializer_range=0.02),
    )
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config).eval()
    adapter = BlipAdapter(model, processor=None)
    rng = random.Random(0)
    words = [rng.randrange(1000, 30000) for _ in range(BLIP_QUESTION_LEN - 2)]
    ids = [101, *words, 102]  # [CLS] question [SEP]; the options are words 4 and 6
    tau, tau_p = ids[4], ids[6]
    clean, corrupt = _model_input(ids, _pixels(1, 384)), _model_input(ids, _pixels(2, 384))
    patches = reference.default_patches(adapter, clean, tau)
    return Case("blip", adapter, clean, corrupt, tau, tau_p, patches,
                "BLIP (blip-vqa-base layout): 577 image tokens, 12-token question, 12+12 text layers")


def llava_case() -> Case:
    vision = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**LLAVA_TEXT), image_token_index=LLAVA_IMAGE_TOKEN,
                         image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    adapter = LlavaAdapter(model, processor=None)
    rng = random.Random(0)
    text = [rng.randrange(100, LLAVA_IMAGE_TOKEN) for _ in range(LLAVA_TEXT_BEFORE_IMAGE + LLAVA_TEXT_AFTER_IMAGE - 1)]
    ids = [1, *text[:LLAVA_TEXT_BEFORE_IMAGE - 1], *[LLAVA_IMAGE_TOKEN] * 576, *text[LLAVA_TEXT_BEFORE_IMAGE - 1:]]
    clean, corrupt = _model_input(ids, _pixels(1, 336)), _model_input(ids, _pixels(2, 336))
    tau, tau_p = rng.randrange(100, LLAVA_IMAGE_TOKEN), rng.randrange(100, LLAVA_IMAGE_TOKEN)
    patches = reference.default_patches(adapter, clean, tau)
    return Case("llava", adapter, clean, corrupt, tau, tau_p, patches,
                f"LLaVA-1.5 layout: CLIP ViT-L/14-336 (576 image tokens), {len(ids)}-token prompt, "
                f"Llama {LLAVA_TEXT['num_hidden_layers']} layers × {LLAVA_TEXT['hidden_size']}")


# -- (b) the published method: a batch of (clean, corrupt, patched) rows per patch ---------------
def _blip_rows_logits(adapter: VLMAdapter, inp: ModelInput) -> torch.Tensor:
    """BLIP answer logits [B, V] of a batched input (as BlipAdapter.answer_logits, for B rows)."""
    model = adapter.model
    image = model.vision_model(pixel_values=inp.pixel_values)[0]
    encoded = model.text_encoder(
        input_ids=inp.input_ids, attention_mask=inp.attention_mask, encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
    )[0]
    bos = torch.full((inp.input_ids.shape[0], 1), model.config.text_config.bos_token_id)
    logits = model.text_decoder(input_ids=bos, encoder_hidden_states=encoded,
                                encoder_attention_mask=inp.attention_mask, use_cache=False).logits
    return logits[:, -1].float()


def _llava_rows_logits(adapter: VLMAdapter, inp: ModelInput) -> torch.Tensor:
    out = adapter.model(input_ids=inp.input_ids, attention_mask=inp.attention_mask,
                        pixel_values=inp.pixel_values, logits_to_keep=1)
    return out.logits[:, -1].float()


ROWS_LOGITS: dict[str, Callable[[VLMAdapter, ModelInput], torch.Tensor]] = {
    "blip": _blip_rows_logits, "llava": _llava_rows_logits,
}


@torch.no_grad()
def three_row_patch(adapter: VLMAdapter, clean: ModelInput, corrupt: ModelInput, patch: Patch) -> torch.Tensor:
    """Logits [V] of the patched row of one (clean, corrupt, patched) batch, as the published code does."""
    batch = ModelInput(
        torch.cat([clean.input_ids, corrupt.input_ids, corrupt.input_ids]),
        torch.cat([clean.attention_mask, corrupt.attention_mask, corrupt.attention_mask]),
        torch.cat([clean.pixel_values, corrupt.pixel_values, corrupt.pixel_values]),
        clean.tokens,
    )
    module, kind = adapter.site_module(HEAD_SITE_PARENT.get(patch.site, patch.site), patch.layer)
    dims = slice(None) if patch.head < 0 else slice(patch.head * adapter.head_dim, (patch.head + 1) * adapter.head_dim)

    def copy_clean_row(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[2, patch.position, dims] = x[0, patch.position, dims]
        return x

    if kind == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: (copy_clean_row(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: VLMAdapter.replace_output_tensor(out, copy_clean_row))
    try:
        return ROWS_LOGITS[adapter.family](adapter, batch)[2]
    finally:
        handle.remove()


# -- measurement ----------------------------------------------------------------------------------
def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def measure(case: Case, n_hooked: int, n_three_row: int, batch_size: int, seed: int) -> dict:
    adapter, clean, corrupt = case.adapter, case.clean, case.corrupt
    rows, t_fast = _timed(lambda: fast.patch_sample(adapter, clean, corrupt, case.patches, case.tau, case.tau_p,
                                                    batch_size=batch_size))
    subset = sorted(random.Random(seed).sample(range(len(case.patches)), n_hooked))

    # (a): clean activations captured once; one hooked forward of the corrupt input per patch.
    clean_logits, clean_acts = reference.capture(adapter, clean, [(p.site, p.layer) for p in case.patches])
    corrupt_logits = adapter.answer_logits(corrupt)
    s_clean, s_corrupt = scores(clean_logits, case.tau, case.tau_p), scores(corrupt_logits, case.tau, case.tau_p)
    reference_rows, t_hooked = [], []
    for i in subset:
        p = case.patches[i]
        logits, seconds = _timed(lambda: reference.run_patched(adapter, corrupt, p, clean_acts))
        t_hooked.append(seconds)
        reference_rows.append(result_row(p.site, p.layer, p.head, p.position, clean.tokens[p.position],
                                         s_clean, s_corrupt, scores(logits, case.tau, case.tau_p)))
    err = fast.max_relative_error([rows[i] for i in subset], reference_rows)

    # (b): the 3-row batch per patch; its patched row must agree with (a) too.
    t_three, err_three = [], 0.0
    for k, i in enumerate(subset[:n_three_row]):
        logits, seconds = _timed(lambda: three_row_patch(adapter, clean, corrupt, case.patches[i]))
        t_three.append(seconds)
        ld = scores(logits, case.tau, case.tau_p).ld
        err_three = max(err_three, abs(ld - reference_rows[k]["ld_patched"]) / max(abs(reference_rows[k]["ld_patched"]), 1e-6))
    per_fast = t_fast / len(case.patches)
    per_hooked = sum(t_hooked) / len(t_hooked)
    per_three = sum(t_three) / len(t_three)
    n_noop = sum(r["ld_patched"] == r["ld_corrupt"] for r in rows)
    return dict(name=case.name, description=case.description, n_patches=len(case.patches), n_noop=n_noop,
                t_fast=t_fast, per_fast=per_fast, per_hooked=per_hooked, per_three=per_three,
                n_hooked=len(t_hooked), n_three=len(t_three), err=err, err_three=err_three,
                ld_clean=s_clean.ld, ld_corrupt=s_corrupt.ld)


def _table(results: list[dict]) -> str:
    lines = [
        "| model | patched runs | fast: total s | fast: ms / run | (a) hooked: ms / run | (b) 3-row: ms / run "
        "| speedup vs (a) | speedup vs (b) | max rel err (a) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['n_patches']} | {r['t_fast']:.1f} | {1e3 * r['per_fast']:.1f} | "
            f"{1e3 * r['per_hooked']:.0f} (n={r['n_hooked']}) | {1e3 * r['per_three']:.0f} (n={r['n_three']}) | "
            f"{r['per_hooked'] / r['per_fast']:.0f}× | {r['per_three'] / r['per_fast']:.0f}× | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hooked", type=int, default=4, help="patches timed with (a), and checked (default 4)")
    parser.add_argument("--three-row", type=int, default=2, help="patches timed with (b) (default 2)")
    parser.add_argument("--batch-size", type=int, default=fast.DEFAULT_BATCH_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}; torch {torch.__version__}")
    results = []
    for build in (blip_case, llava_case):
        case, seconds = _timed(build)
        print(f"{case.description}: built in {seconds:.0f} s; {len(case.patches)} patched runs", flush=True)
        result = measure(case, args.hooked, args.three_row, args.batch_size, args.seed)
        print(f"  LD clean {result['ld_clean']:.4f}, corrupt {result['ld_corrupt']:.4f}; "
              f"{result['n_noop']} runs equal to the corrupt run (clean value identical to the corrupt one); "
              f"(b) vs (a) rel err {result['err_three']:.1e}", flush=True)
        results.append(result)
        del case
        gc.collect()
    print(f"(a) and (b) timed on a random subset (seed {args.seed}) of each patch set; "
          f"load average at end {os.getloadavg()[0]:.2f}")
    print(_table(results))
    blip, llava = results
    print(f"bench: blip_speedup={blip['per_hooked'] / blip['per_fast']:.1f} "
          f"llava_speedup={llava['per_hooked'] / llava['per_fast']:.1f} "
          f"max_rel_err={max(r['err'] for r in results):.1e}")


if __name__ == "__main__":
    main()
