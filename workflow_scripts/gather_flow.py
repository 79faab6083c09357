"""Gather the flow shards of one (model, dataset) into its four tables (rule `gather_flow`)."""

from notice.files.sharding import gather_tables
from notice.files.tables import write_table
from notice.flow.ablation import ABLATION_COLUMNS
from notice.flow.knockout import KNOCKOUT_COLUMNS
from notice.flow.logit_lens import LOGIT_LENS_COLUMNS
from notice.flow.records import LABEL_COLUMNS, SKIPPED_COLUMNS
from notice.workflow.runtime import logged

COLUMNS = {
    "knockout": [*LABEL_COLUMNS, *KNOCKOUT_COLUMNS],
    "logit_lens": [*LABEL_COLUMNS, *LOGIT_LENS_COLUMNS],
    "ablation": [*LABEL_COLUMNS, *ABLATION_COLUMNS],
    "skipped": list(SKIPPED_COLUMNS),
}

with logged(snakemake.log[0]) as log:
    for table, columns in COLUMNS.items():
        shards = snakemake.input[table]
        gathered = gather_tables(shards, columns)
        log.info("%s: %d rows from %d shards", table, len(gathered), len(shards))
        write_table(gathered, snakemake.output[table], columns)
