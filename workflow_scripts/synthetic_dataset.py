"""Generate the synthetic minimal-pair dataset (rule `synthetic_dataset`)."""

from notice.data.synthetic import TASK_VALUES, generate_dataset
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    section, dataset = snakemake.params.section, snakemake.wildcards.dataset
    if sorted(section["tasks"]) != sorted(TASK_VALUES):
        raise ValueError(
            f"config: datasets.{dataset}.tasks = {sorted(section['tasks'])}: the synthetic generator "
            f"asks exactly {list(TASK_VALUES)}"
        )
    for task, spec in section["tasks"].items():
        if sorted(spec["values"]) != sorted(TASK_VALUES[task]):
            raise ValueError(
                f"config: datasets.{dataset}.tasks.{task}.values = {spec['values']}: the synthetic generator "
                f"renders exactly {list(TASK_VALUES[task])}"
            )
    if "n_scenes" not in section:
        raise ValueError(f"config: datasets.{dataset}.n_scenes is required for a synthetic dataset")
    samples, pool = generate_dataset(
        snakemake.params.out_dir, section["n_scenes"], snakemake.params.seed, section.get("image_size", 64), dataset
    )
    log.info("%d samples over %d scenes, %d pool images", len(samples), section["n_scenes"], len(pool))
