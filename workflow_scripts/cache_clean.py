"""Clean runs of one shard of the selected samples, shared by every corruption (rule `cache_clean`)."""

import torch

from notice.files.sharding import save_torch, take_shard
from notice.files.tables import PROMPT_COLUMNS, read_table
from notice.patching.experiment import cache_clean_runs
from notice.workflow.runtime import load_image, load_model, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    adapter = load_model(snakemake.params.model_path, snakemake.params.model)
    selected = take_shard(read_table(snakemake.input.selected, PROMPT_COLUMNS), *snakemake.params.shard)
    with torch.inference_mode():
        cache = cache_clean_runs(adapter, selected, load_image)
    log.info("cached clean runs of %d samples", len(cache))
    save_torch(cache, snakemake.output.cache)
