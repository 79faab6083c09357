"""Head effects, k-sigma heads, universal heads with bootstrap stability, module effects (rule `analyse_heads`);
a half-precision model's effects are marked against its precision audits."""

import pandas as pd

from notice.files.tables import RESULT_COLUMNS, read_table
from notice.method.heads import (
    HEAD_KEYS,
    HEAD_SITES,
    MODULE_KEYS,
    MODULE_SITES,
    bootstrap_heads,
    head_effects,
    mark_precision,
    module_effects,
    significant_heads,
    universal_heads,
    universal_heads_table,
)
from notice.method.precision import precision_floors, read_audits
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    settings, seed = snakemake.params.analysis, snakemake.params.seed
    metric, k, corruptions = settings["metric"], settings["k_sigma"], settings["universal_corruptions"]
    results = pd.concat([read_table(path, RESULT_COLUMNS) for path in snakemake.input.results], ignore_index=True)
    log.info("%d patched runs from %d tables", len(results), len(snakemake.input.results))

    effects = head_effects(results, metric)
    modules = module_effects(results, metric)
    floors = None
    if snakemake.input.audits:  # a half-precision model: its effects against its precision audits
        floors = precision_floors(read_audits(snakemake.input.audits), results, settings["precision_k"])
        effects = mark_precision(effects, results, floors, HEAD_KEYS, HEAD_SITES, metric)
        modules = mark_precision(modules, results, floors, MODULE_KEYS, MODULE_SITES, metric)
        log.info(
            "below precision (mean logit_diff not above %g x the audit's p95): %d of %d heads, %d of %d modules",
            settings["precision_k"],
            effects["below_precision"].sum(),
            len(effects),
            modules["below_precision"].sum(),
            len(modules),
        )
    significant = significant_heads(effects, k)
    universal = universal_heads(significant, corruptions)
    bootstrap = bootstrap_heads(results, settings["bootstrap_draws"], seed, k, metric, corruptions, floors)
    table = universal_heads_table(significant, universal, bootstrap)
    log.info("universal heads:\n%s", universal.to_string(index=False))

    effects.to_parquet(snakemake.output.head_effects, index=False)
    modules.to_parquet(snakemake.output.module_effects, index=False)
    significant.to_csv(snakemake.output.significant, index=False)
    table.to_csv(snakemake.output.universal, index=False)
