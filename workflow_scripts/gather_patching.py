"""Gather the patching shards of one corruption into its results table (rule `gather_patching`)."""

from notice.workflow.runtime import logged
from notice.workflow.sharding import gather_tables
from notice.workflow.tables import RESULT_COLUMNS, write_table

with logged(snakemake.log[0]) as log:
    results = gather_tables(snakemake.input, RESULT_COLUMNS)
    log.info("%d patched runs from %d shards", len(results), len(snakemake.input))
    write_table(results, snakemake.output.results, RESULT_COLUMNS)
