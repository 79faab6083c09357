"""MIT-States folder tree -> samples, image pool, exclusions (rule `read_dataset_mit_states`)."""

from notice.data import write_read_tables
from notice.data.mit_states import TASK, read_mit_states
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    section, dataset = snakemake.params.section, snakemake.wildcards.dataset
    groups = section["tasks"].get(TASK, {}).get("groups")
    if not groups:
        raise ValueError(
            f"config: datasets.{dataset}.tasks.{TASK}.groups is required: state -> group (colour / shape / "
            "texture); the paper's lists are in notice.data.mit_states.STATE_GROUPS and config/paper.yaml"
        )
    samples, pool, exclusions = read_mit_states(section["path"], dataset, groups, snakemake.params.seed)
    log.info(
        "%d samples kept, %d excluded; %d pool images over %d nouns",
        len(samples),
        len(exclusions),
        len(pool),
        pool["pool_key"].nunique(),
    )
    log.info("samples per group:\n%s", samples["category"].value_counts().sort_index().to_string())
    log.info(
        "exclusion reasons (first words):\n%s",
        exclusions["reason"]
        .str.split(":")
        .str[0]
        .str.replace(r"'[^']*'", "'...'", regex=True)
        .value_counts()
        .to_string(),
    )
    write_read_tables(samples, pool, exclusions, snakemake.output, dataset, [TASK], snakemake.params.min_per_task)
