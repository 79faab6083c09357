"""Head effects, k-sigma heads, universal heads with bootstrap stability, module effects (rule `analyse_heads`)."""

import pandas as pd

from notice.files.tables import RESULT_COLUMNS, read_table
from notice.method.heads import (
    bootstrap_heads,
    head_effects,
    module_effects,
    significant_heads,
    universal_heads,
    universal_heads_table,
)
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    settings, seed = snakemake.params.analysis, snakemake.params.seed
    metric, k, corruptions = settings["metric"], settings["k_sigma"], settings["universal_corruptions"]
    results = pd.concat([read_table(path, RESULT_COLUMNS) for path in snakemake.input.results], ignore_index=True)
    log.info("%d patched runs from %d tables", len(results), len(snakemake.input.results))

    effects = head_effects(results, metric)
    significant = significant_heads(effects, k)
    universal = universal_heads(significant, corruptions)
    bootstrap = bootstrap_heads(results, settings["bootstrap_draws"], seed, k, metric, corruptions)
    table = universal_heads_table(significant, universal, bootstrap)
    log.info("universal heads:\n%s", universal.to_string(index=False))

    effects.to_parquet(snakemake.output.head_effects, index=False)
    module_effects(results, metric).to_parquet(snakemake.output.module_effects, index=False)
    significant.to_csv(snakemake.output.significant, index=False)
    table.to_csv(snakemake.output.universal, index=False)
