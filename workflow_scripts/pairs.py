"""Corruption manifest of the selected samples for one corruption (rule `pairs`)."""

import pandas as pd

from notice.files.tables import (
    EXCLUSION_COLUMNS,
    IMAGE_POOL_COLUMNS,
    PAIR_COLUMNS,
    PROMPT_COLUMNS,
    SAMPLE_COLUMNS,
    read_table,
    write_table,
)
from notice.method.pairs import gaussian_pairs, sip_pairs, str_pairs
from notice.workflow.runtime import load_tokenizing_model, logged

with logged(snakemake.log[0]) as log:
    corruption, settings, seed = snakemake.wildcards.corruption, snakemake.params.corruption, snakemake.params.seed
    selected = read_table(snakemake.input.selected, PROMPT_COLUMNS)
    samples = read_table(snakemake.input.samples, SAMPLE_COLUMNS)
    if corruption == "sip":
        pool = read_table(snakemake.input.pool, IMAGE_POOL_COLUMNS)
        pairs, exclusions = sip_pairs(selected, samples, pool)
    elif corruption == "sd_inpaint":
        # SIP whose corrupt images the inpaint rule generated; samples it could not inpaint keep its reason.
        pool = read_table(snakemake.input.pool, IMAGE_POOL_COLUMNS)
        not_inpainted = read_table(snakemake.input.inpaint_exclusions, EXCLUSION_COLUMNS)
        unknown = sorted(set(not_inpainted["sample_id"]) - set(selected["sample_id"]))
        if unknown:
            raise ValueError(f"{snakemake.input.inpaint_exclusions}: samples {unknown[:5]} are not selected ones")
        inpainted = selected[~selected["sample_id"].isin(not_inpainted["sample_id"])]
        pairs, exclusions = sip_pairs(inpainted, samples, pool)
        pairs["corruption"] = "sd_inpaint"
        exclusions = pd.concat([not_inpainted, exclusions], ignore_index=True)
        exclusions["stage"] = exclusions["stage"].replace("pairs:sip", "pairs:sd_inpaint")
    elif corruption == "str":
        adapter = load_tokenizing_model(snakemake.params.model_path, snakemake.params.model)
        templates = {task: spec["question"] for task, spec in snakemake.params.tasks.items()}
        template_and_subject = {
            row.sample_id: (templates[row.task], row.subject) for row in samples.itertuples(index=False)
        }

        def format_question(sample_id: str, a: str, b: str) -> str:
            template, subject = template_and_subject[sample_id]
            return template.format(subject=subject, a=a, b=b)

        pairs, exclusions = str_pairs(
            selected,
            tokenize=lambda prompt: adapter.processor.tokenizer(prompt)["input_ids"],
            format_question=format_question,
            format_prompt=adapter.format_prompt,
            seed=seed,
        )
    else:  # gn_mult / gn_add: same input, noise on the image embeddings at patching time
        kind = {"gn_mult": "multiplicative", "gn_add": "additive"}[corruption]
        pairs = gaussian_pairs(selected, kind, settings["n_draws"], seed)
        exclusions = pd.DataFrame({column: pd.Series(dtype=str) for column in EXCLUSION_COLUMNS})
    log.info(
        "%s: %d pairs from %d selected samples, %d excluded", corruption, len(pairs), len(selected), len(exclusions)
    )
    write_table(pairs, snakemake.output.pairs, PAIR_COLUMNS)
    write_table(exclusions, snakemake.output.exclusions, EXCLUSION_COLUMNS)
