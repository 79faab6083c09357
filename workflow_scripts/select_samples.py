"""Balanced, seeded selection of correctly answered samples (rule `select_samples`)."""

from notice.data import selection_problem
from notice.files.tables import ANSWER_COLUMNS, read_table, write_table
from notice.method.evaluate import select_samples
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    answers = read_table(snakemake.input.answers, ANSWER_COLUMNS)
    settings = snakemake.params.selection
    selected = select_samples(answers, settings["n_per_task"], snakemake.params.seed)
    log.info("selected %d of %d correctly answered samples", len(selected), int(answers["correct"].sum()))
    problem = selection_problem(
        selected, snakemake.params.tasks, settings["min_per_task"], settings["n_per_task"], snakemake.input.answers
    )
    if problem:
        raise ValueError(
            f"model {snakemake.wildcards.model!r}, dataset {snakemake.wildcards.dataset!r}, "
            f"stage select_samples: {problem}"
        )
    write_table(selected, snakemake.output.selected, ANSWER_COLUMNS)
