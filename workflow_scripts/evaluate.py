"""The model's answers to one shard of the clean prompts (rule `evaluate_shard`)."""

import torch

from notice.files.sharding import take_shard
from notice.files.tables import ANSWER_COLUMNS, PROMPT_COLUMNS, read_table, write_table
from notice.method.evaluate import evaluate
from notice.workflow.runtime import load_image, load_model, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    adapter = load_model(snakemake.params.model_path, snakemake.params.model)
    prompts = take_shard(read_table(snakemake.input.prompts, PROMPT_COLUMNS), *snakemake.params.shard)
    with torch.inference_mode():
        answers = evaluate(adapter, prompts, load_image, snakemake.params.model["max_new_tokens"])
    log.info("%d answers, %d correct", len(answers), int(answers["correct"].sum()))
    write_table(answers, snakemake.output.answers, ANSWER_COLUMNS)
