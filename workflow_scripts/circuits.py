"""Circuits of one (model, dataset, corruption) (rule `circuits`): edge scores, faithfulness curves, the smallest
faithful circuit and the scores' validation against exact single-edge ablation."""

import pandas as pd

from notice.files.tables import PAIR_COLUMNS, PROMPT_COLUMNS, read_table, write_csv, write_table
from notice.method.circuits import EDGE_COLUMNS, FAITHFULNESS_COLUMNS, CircuitSettings, circuit_tables, first_pairs
from notice.workflow.runtime import load_image, load_model, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    settings = snakemake.params.circuits
    labels = {key: snakemake.wildcards[key] for key in ("model", "dataset", "corruption")}
    selected = read_table(snakemake.input.selected, PROMPT_COLUMNS)
    questions = dict(zip(selected["sample_id"].astype(str), selected["question"].astype(str)))
    pairs = read_table(snakemake.input.pairs, PAIR_COLUMNS)
    unknown = sorted(set(pairs["sample_id"].astype(str)) - set(questions))
    if unknown:
        raise ValueError(f"{snakemake.input.pairs}: samples not in {snakemake.input.selected}: {unknown[:5]}")
    pairs, beyond = first_pairs(pairs, settings.get("max_pairs"), labels)
    adapter = load_model(snakemake.params.model_path, snakemake.params.model)
    # No inference mode here: the edge scores backpropagate through the model.
    tables = circuit_tables(
        adapter,
        pairs,
        questions,
        load_image,
        CircuitSettings.from_config({**settings, "seed": snakemake.params.seed}),
        snakemake.params.corruption,
        labels,
    )
    skipped = pd.concat([tables.skipped, beyond], ignore_index=True)
    log.info(
        "%d pairs: %d edges, smallest faithful circuit %s; %d pairs skipped",
        len(pairs),
        len(tables.edges),
        ", ".join(f"{m}: {n}" for m, n in zip(tables.summary["method"], tables.summary["smallest_n"])) or "none",
        len(skipped),
    )
    for reason, group in skipped.groupby("reason"):
        log.info("skipped %d pairs: %s", len(group), reason)
    write_table(tables.edges, snakemake.output.edges, EDGE_COLUMNS)
    write_table(tables.faithfulness, snakemake.output.faithfulness, FAITHFULNESS_COLUMNS)
    write_csv(tables.summary, snakemake.output.summary)
    write_csv(tables.validation, snakemake.output.validation)
    write_csv(skipped, snakemake.output.skipped)
