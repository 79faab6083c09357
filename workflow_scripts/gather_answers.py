"""Gather the evaluation shards; accuracy per task and category (rule `gather_answers`)."""

from notice.files.sharding import gather_tables
from notice.files.tables import ANSWER_COLUMNS, write_csv, write_table
from notice.method.evaluate import accuracy_table
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    answers = gather_tables(snakemake.input, ANSWER_COLUMNS)
    accuracy = accuracy_table(answers)
    accuracy.insert(0, "model", snakemake.wildcards.model)
    accuracy.insert(1, "dataset", snakemake.wildcards.dataset)
    log.info("accuracy:\n%s", accuracy.to_string(index=False))
    write_table(answers, snakemake.output.answers, ANSWER_COLUMNS)
    write_csv(accuracy, snakemake.output.accuracy)
