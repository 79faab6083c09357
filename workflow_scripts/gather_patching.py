"""Gather the patching shards of one corruption into its results table (rule `gather_patching`)."""

from notice.files.sharding import gather_tables
from notice.files.tables import RESULT_COLUMNS, write_table
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    results = gather_tables(snakemake.input, RESULT_COLUMNS)
    log.info("%d patched runs from %d shards", len(results), len(snakemake.input))
    write_table(results, snakemake.output.results, RESULT_COLUMNS)
