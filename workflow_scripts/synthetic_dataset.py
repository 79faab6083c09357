"""Generate the synthetic minimal-pair dataset (rule `synthetic_dataset`); its tasks and values were checked
at start (notice.workflow.config.synthetic_errors)."""

from notice.data.synthetic import generate_dataset
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    section = snakemake.params.section
    task_values = {task: spec["values"] for task, spec in section["tasks"].items()}
    samples, pool = generate_dataset(
        snakemake.params.out_dir,
        section["n_scenes"],
        snakemake.params.seed,
        section["image_size"],
        snakemake.wildcards.dataset,
        task_values,
    )
    log.info(
        "%d samples over %d scenes, %d pool images; tasks and values: %s",
        len(samples),
        section["n_scenes"],
        len(pool),
        task_values,
    )
