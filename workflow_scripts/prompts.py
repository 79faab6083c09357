"""Clean prompts in the model's template, answer order and scored tokens (rule `prompts`)."""

from notice.files.tables import (
    DISTRACTOR_COLUMNS,
    EXCLUSION_COLUMNS,
    PROMPT_COLUMNS,
    SAMPLE_COLUMNS,
    read_table,
    write_table,
)
from notice.method.evaluate import build_prompts
from notice.workflow.runtime import load_tokenizing_model, logged

with logged(snakemake.log[0]) as log:
    adapter = load_tokenizing_model(snakemake.params.model_path, snakemake.params.model)
    samples = read_table(snakemake.input.samples, SAMPLE_COLUMNS)
    distractors = read_table(snakemake.input.distractors, DISTRACTOR_COLUMNS)
    templates = {task: spec["question"] for task, spec in snakemake.params.tasks.items()}
    prompts, exclusions = build_prompts(samples, distractors, adapter, templates, snakemake.params.seed)
    log.info("%d prompts, %d samples excluded", len(prompts), len(exclusions))
    write_table(prompts, snakemake.output.prompts, PROMPT_COLUMNS)
    write_table(exclusions, snakemake.output.exclusions, EXCLUSION_COLUMNS)
