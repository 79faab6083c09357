"""How the image reaches the answer on one shard of the selected samples (rule `flow`): attention knockout, the
logit lens on image tokens and the object-token ablation, and what each sample could not give."""

import torch

from notice.files.sharding import take_shard
from notice.files.tables import PROMPT_COLUMNS, read_table, write_table
from notice.flow.ablation import ABLATION_COLUMNS
from notice.flow.experiment import FlowSettings, flow_tables
from notice.flow.knockout import KNOCKOUT_COLUMNS, parse_edges
from notice.flow.logit_lens import LOGIT_LENS_COLUMNS
from notice.flow.records import LABEL_COLUMNS, SKIPPED_COLUMNS
from notice.method.attention import choose_samples
from notice.workflow.runtime import load_image, load_model, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    settings, seed = snakemake.params.flow, snakemake.params.seed
    adapter = load_model(snakemake.params.model_path, snakemake.params.model)
    selected = read_table(snakemake.input.selected, PROMPT_COLUMNS)
    subjects = read_table(snakemake.input.samples, ["sample_id", "subject"])[["sample_id", "subject"]].astype(str)
    samples = selected.astype({"sample_id": str}).merge(subjects, on="sample_id", how="left", validate="one_to_one")
    missing = samples.loc[samples["subject"].isna(), "sample_id"].tolist()
    if missing:
        raise ValueError(f"{snakemake.input.samples}: no row for selected samples {missing[:5]} (of {len(missing)})")
    # The logit lens reads a few samples (flow.lens_samples, chosen over the whole selection so every shard agrees).
    n_lens = settings["lens_samples"] or len(selected)
    lens_ids = set(choose_samples(selected, n_lens, seed)["sample_id"].astype(str))
    shard = take_shard(samples, *snakemake.params.shard)
    with torch.inference_mode():
        tables = flow_tables(
            adapter,
            shard,
            load_image,
            FlowSettings(
                edges=parse_edges(settings["edges"]),
                window=settings["window"],
                ablation_draws=settings["ablation_draws"],
                engine=settings["engine"],
                batch_size=settings["batch_size"],
                seed=seed,
            ),
            lens_ids,
            labels={"model": snakemake.wildcards.model, "dataset": snakemake.wildcards.dataset},
        )
    log.info(
        "%d samples: %d knockout rows, %d logit-lens rows (%d samples), %d ablation rows; %d skipped",
        len(shard),
        len(tables.knockout),
        len(tables.logit_lens),
        tables.logit_lens["sample_id"].nunique(),
        len(tables.ablation),
        len(tables.skipped),
    )
    for (analysis, item, reason), group in tables.skipped.groupby(["analysis", "item", "reason"]):
        log.info("skipped %s %s on %d samples: %s", analysis, item, len(group), reason)
    write_table(tables.knockout, snakemake.output.knockout, [*LABEL_COLUMNS, *KNOCKOUT_COLUMNS])
    write_table(tables.logit_lens, snakemake.output.logit_lens, [*LABEL_COLUMNS, *LOGIT_LENS_COLUMNS])
    write_table(tables.ablation, snakemake.output.ablation, [*LABEL_COLUMNS, *ABLATION_COLUMNS])
    write_table(tables.skipped, snakemake.output.skipped, SKIPPED_COLUMNS)
