"""Balanced, seeded selection of correctly answered samples (rule `select_samples`)."""

from notice.evaluate import select_samples
from notice.runtime import logged
from notice.tables import ANSWER_COLUMNS, read_table, write_table

with logged(snakemake.log[0]) as log:
    answers = read_table(snakemake.input.answers, ANSWER_COLUMNS)
    selected = select_samples(answers, snakemake.params.selection["n_per_task"], snakemake.params.seed)
    log.info("selected %d of %d correctly answered samples", len(selected), int(answers["correct"].sum()))
    write_table(selected, snakemake.output.selected, ANSWER_COLUMNS)
