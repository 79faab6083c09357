"""Choose every sample's distractor, filtered by word-vector similarity (rule `distractors`)."""

from notice.files.tables import (
    DISTRACTOR_COLUMNS,
    DISTRACTOR_REJECTION_COLUMNS,
    EXCLUSION_COLUMNS,
    IMAGE_POOL_COLUMNS,
    SAMPLE_COLUMNS,
    read_table,
    write_table,
)
from notice.method.distractors import choose_distractors
from notice.method.vectors import load_vectors
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    section = snakemake.params.section
    options = section["distractors"]
    tasks = section["tasks"]
    samples = read_table(snakemake.input.samples, SAMPLE_COLUMNS)
    distractors, rejections, exclusions = choose_distractors(
        samples,
        values_by_task={task: spec.get("values", []) for task, spec in tasks.items()},  # SVO: given per sample
        groups={task: spec.get("groups", {}) for task, spec in tasks.items()},
        rule={task: spec["distractor_rule"] for task, spec in tasks.items()},
        kv=load_vectors(options["vectors"]),
        cosine_threshold=options["cosine_threshold"],
        near_synonyms=options["near_synonyms"],
        seed=snakemake.params.seed,
        pool_df=read_table(snakemake.input.pool, IMAGE_POOL_COLUMNS),
    )
    log.info(
        "%d samples: %d with a distractor, %d excluded, %d candidate rejections",
        len(samples),
        len(distractors),
        len(exclusions),
        len(rejections),
    )
    write_table(distractors, snakemake.output.distractors, DISTRACTOR_COLUMNS)
    write_table(rejections, snakemake.output.rejections, DISTRACTOR_REJECTION_COLUMNS)
    write_table(exclusions, snakemake.output.exclusions, EXCLUSION_COLUMNS)
