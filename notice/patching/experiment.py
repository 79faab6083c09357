"""One patching experiment over a corruption manifest: the loop the workflow's patching rules run.

The clean run of every selected sample is computed once (`cache_clean_runs`) and shared by every
corruption; `patch_pairs` then runs the chosen engine on each (clean, corrupt) pair and returns the
results table (tables.RESULT_COLUMNS).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
from PIL import Image
from tqdm import tqdm

from notice.adapters.base import HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.files.tables import RESULT_COLUMNS
from notice.patching.corruptions import corrupt_image_fn
from notice.patching.engines import Engine
from notice.patching.hooks import CleanRun, capture
from notice.patching.sites import all_sites, default_patches


def cache_clean_runs(
    adapter: VLMAdapter, prompts: pd.DataFrame, load_image: Callable[[str], Image.Image]
) -> dict[str, CleanRun]:
    """Clean logits and activations of every sample (PROMPT_COLUMNS rows), on the CPU, by sample_id."""
    cache: dict[str, CleanRun] = {}
    sites = all_sites(adapter)
    for row in tqdm(prompts.itertuples(index=False), total=len(prompts), desc="clean runs", mininterval=5):
        logits, acts = capture(adapter, adapter.prepare(load_image(row.image_path), row.prompt), sites)
        cache[str(row.sample_id)] = (logits.cpu(), {key: value.cpu() for key, value in acts.items()})
    return cache


def select_patches(adapter: VLMAdapter, inp: ModelInput, answer_token_id: int, settings: Mapping) -> list[Patch]:
    """The default experiment's patches, restricted to the families the config asks for (`settings`: the
    config's patching section, with `module_sites` and `head_sites`)."""
    keep_modules, keep_heads = settings["module_sites"], settings["head_sites"]
    return [
        patch
        for patch in default_patches(adapter, inp, answer_token_id)
        if (keep_heads if patch.site in HEAD_SITE_PARENT else keep_modules)
    ]


def pair_inputs(
    adapter: VLMAdapter, pair: Any, load_image: Callable[[str], Image.Image]
) -> tuple[ModelInput, ModelInput]:
    """The (clean, corrupt) model inputs of one pair (a PAIR_COLUMNS row)."""
    clean = adapter.prepare(load_image(pair.clean_image_path), pair.clean_prompt)
    return clean, adapter.prepare(load_image(pair.corrupt_image_path), pair.corrupt_prompt)


def pair_labels(pair: Any, labels: Mapping[str, str]) -> dict[str, Any]:
    """The label columns of one pair's result rows: `labels` (model, dataset) and the pair's own."""
    return {
        **labels,
        "task": pair.task,
        "corruption": pair.corruption,
        "modality": pair.modality,
        "sample_id": pair.sample_id,
    }


def concat_or_empty(frames: Sequence[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """`frames` concatenated with `columns` in order (frames without rows left out: they would set no value but
    could widen a column's dtype); a table with those columns and no row if none has a row."""
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in columns})
    return pd.concat(frames, ignore_index=True)[list(columns)]


def patch_pair(
    adapter: VLMAdapter,
    pair: Any,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    patches: Sequence[Patch],
    engine: Engine,
    corruption_settings: Mapping,
    clean: CleanRun | None = None,
) -> list[dict]:
    """`engine`'s rows for `patches` of one pair (a PAIR_COLUMNS row) whose inputs are `clean_inp`, `corrupt_inp`:
    its answer and distractor tokens, its corruption of the image."""
    return engine(
        adapter,
        clean_inp,
        corrupt_inp,
        patches,
        int(pair.answer_token_id),
        int(pair.distractor_token_id),
        corrupt_image_fn=corrupt_image_fn(pair.corruption, corruption_settings, int(pair.noise_seed)),
        clean=clean,
    )


def patch_pairs(
    adapter: VLMAdapter,
    pairs: pd.DataFrame,
    clean_runs: Mapping[str, CleanRun],
    load_image: Callable[[str], Image.Image],
    *,
    engine: Engine,
    corruption_settings: Mapping,
    patching_settings: Mapping,
    labels: Mapping[str, str],
) -> pd.DataFrame:
    """The results table of every pair (PAIR_COLUMNS rows) with `labels` (model, dataset) as columns, patched
    by `engine` (`notice.patching.engines.get_engine`)."""
    frames = []
    for pair in tqdm(pairs.itertuples(index=False), total=len(pairs), desc="patching", mininterval=5):
        clean_inp, corrupt_inp = pair_inputs(adapter, pair, load_image)
        patches = select_patches(adapter, clean_inp, int(pair.answer_token_id), patching_settings)
        rows = patch_pair(
            adapter, pair, clean_inp, corrupt_inp, patches, engine, corruption_settings, clean_runs[str(pair.sample_id)]
        )
        frames.append(pd.DataFrame(rows).assign(**pair_labels(pair, labels)))
    return concat_or_empty(frames, RESULT_COLUMNS)
