"""The model's answers to the clean prompts and its accuracy (rule `evaluate`)."""

import torch

from notice.evaluate import accuracy_table, evaluate
from notice.runtime import load_image, load_model, logged, set_threads
from notice.tables import ANSWER_COLUMNS, PROMPT_COLUMNS, read_table, write_table

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    adapter = load_model(snakemake.params.model_path, snakemake.params.model)
    prompts = read_table(snakemake.input.prompts, PROMPT_COLUMNS)
    with torch.inference_mode():
        answers = evaluate(adapter, prompts, load_image, snakemake.params.model.get("max_new_tokens", 5))
    accuracy = accuracy_table(answers)
    accuracy.insert(0, "model", snakemake.wildcards.model)
    accuracy.insert(1, "dataset", snakemake.wildcards.dataset)
    log.info("accuracy:\n%s", accuracy.to_string(index=False))
    write_table(answers, snakemake.output.answers, ANSWER_COLUMNS)
    accuracy.to_csv(snakemake.output.accuracy, index=False)
