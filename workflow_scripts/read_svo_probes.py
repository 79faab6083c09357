"""SVO-Probes CSV + downloaded images -> samples, image pool, exclusions (rule `read_dataset_svo_probes`)."""

from notice.data import write_read_tables
from notice.data.download import DOWNLOAD_COLUMNS
from notice.data.svo_probes import TASKS, read_svo_probes
from notice.files.tables import read_table
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    section, dataset = snakemake.params.section, snakemake.wildcards.dataset
    missing = sorted(set(TASKS.values()) - set(section["tasks"]))
    if missing:
        raise ValueError(
            f"config: datasets.{dataset}.tasks lacks {missing}: SVO-Probes asks one question per role "
            f"({sorted(TASKS.values())}), each needs its question template"
        )
    samples, pool, exclusions = read_svo_probes(
        snakemake.input.csv,
        read_table(snakemake.input.downloads, DOWNLOAD_COLUMNS),
        dataset=dataset,
        max_rows=section.get("max_rows"),
        exclude_words=section.get("exclude_words", []),
    )
    rows = (len(samples) + len(exclusions)) // 2  # two samples (one per image) per CSV row
    log.info("%d rows -> %d samples kept, %d excluded; %d pool images", rows, len(samples), len(exclusions), len(pool))
    log.info("samples per task:\n%s", samples["task"].value_counts().sort_index().to_string())
    write_read_tables(
        samples, pool, exclusions, snakemake.output, dataset, list(TASKS.values()), snakemake.params.min_per_task
    )
