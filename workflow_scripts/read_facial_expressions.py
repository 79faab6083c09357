"""FER-2013 CSV or image folders -> samples, image pool, exclusions (rule `read_dataset_facial_expressions`)."""

from notice.data import write_read_tables
from notice.data.facial_expressions import TASK, read_facial_expressions
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    section, dataset = snakemake.params.section, snakemake.wildcards.dataset
    groups = section["tasks"].get(TASK, {}).get("groups")
    if not groups:
        raise ValueError(
            f"config: datasets.{dataset}.tasks.{TASK}.groups is required: emotion -> group (positive / "
            "negative / neutral); defaults in notice.data.facial_expressions.EMOTION_GROUPS and config/paper.yaml"
        )
    samples, pool, exclusions = read_facial_expressions(
        section["path"], snakemake.params.out_dir, dataset, groups, section.get("splits"), snakemake.params.seed
    )
    log.info("%d samples kept, %d excluded; %d pool images", len(samples), len(exclusions), len(pool))
    log.info("samples per emotion:\n%s", samples["category"].value_counts().sort_index().to_string())
    write_read_tables(samples, pool, exclusions, snakemake.output, dataset, [TASK], snakemake.params.min_per_task)
