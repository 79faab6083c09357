"""Every figure of one model (rule `figures`): PNG + SVG + self-contained HTML each."""

from pathlib import Path

import pandas as pd

from notice.figures import accuracy_chart, bootstrap_stability, corruption_comparison, head_heatmaps, module_heatmaps
from notice.heads import significant_heads
from notice.runtime import logged

with logged(snakemake.log[0]) as log:
    out = Path(snakemake.output.figures)
    out.mkdir(parents=True, exist_ok=True)
    k = snakemake.params.analysis.get("k_sigma", 2.0)
    module = pd.read_parquet(snakemake.input.module_effects)
    universal = pd.read_csv(snakemake.input.universal)
    accuracy = pd.concat([pd.read_csv(path) for path in snakemake.input.accuracy], ignore_index=True)
    written = [
        *module_heatmaps(module, out),
        *head_heatmaps(significant_heads(pd.read_parquet(snakemake.input.head_effects), k), universal, out, k),
        *corruption_comparison(module, out),
        *bootstrap_stability(universal, out),
        *accuracy_chart(accuracy, out, snakemake.wildcards.model),
    ]
    log.info("%d figure files written:\n%s", len(written), "\n".join(map(str, written)))
