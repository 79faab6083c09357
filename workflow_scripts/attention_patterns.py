"""Fusion-attention records of a few selected samples, one .npz each (rule `attention_patterns`)."""

from pathlib import Path

import torch

from notice.files.tables import PROMPT_COLUMNS, read_table
from notice.method.attention import choose_samples, write_records
from notice.workflow.runtime import load_image, load_model, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    adapter = load_model(snakemake.params.model_path, snakemake.params.model)
    selected = read_table(snakemake.input.selected, PROMPT_COLUMNS)
    chosen = choose_samples(selected, snakemake.params.n_samples, snakemake.params.seed)
    out = Path(snakemake.output.attention)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        index = write_records(adapter, chosen, load_image, out)
    log.info(
        "%d attention records (%d with an object mask) in %s", len(index), int(index["has_object_mask"].sum()), out
    )
