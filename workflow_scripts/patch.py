"""Activation patching of one shard of one corruption manifest (rule `patch`)."""

import torch

from notice.files.sharding import take_shard
from notice.files.tables import PAIR_COLUMNS, PROMPT_COLUMNS, RESULT_COLUMNS, read_table, write_table
from notice.patching.engines import get_engine
from notice.patching.experiment import patch_pairs
from notice.workflow.runtime import load_image, load_model, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    adapter = load_model(snakemake.params.model_path, snakemake.params.model)
    selected = read_table(snakemake.input.selected, PROMPT_COLUMNS)["sample_id"]
    pairs = take_shard(read_table(snakemake.input.pairs, PAIR_COLUMNS), *snakemake.params.shard, universe=selected)
    clean_runs = torch.load(snakemake.input.cache)
    missing = sorted(set(pairs["sample_id"]) - set(clean_runs))
    if missing:
        raise ValueError(f"{snakemake.input.cache}: no clean run for samples {missing[:5]} (of {len(missing)})")
    with torch.inference_mode():
        results = patch_pairs(
            adapter,
            pairs,
            clean_runs,
            load_image,
            engine=get_engine(snakemake.params.patching["engine"], snakemake.params.patching["batch_size"]),
            corruption_settings=snakemake.params.corruption,
            patching_settings=snakemake.params.patching,
            labels={"model": snakemake.wildcards.model, "dataset": snakemake.wildcards.dataset},
        )
    log.info("%d patched runs over %d pairs", len(results), len(pairs))
    write_table(results, snakemake.output.results, RESULT_COLUMNS)
