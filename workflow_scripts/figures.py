"""Every figure of one model (rule `figures`): PNG + SVG + self-contained HTML each."""

from pathlib import Path

import pandas as pd

from notice.method.attention import load_records
from notice.method.heads import significant_heads
from notice.present.accuracy import accuracy_chart
from notice.present.attention import attention_overlays, overlay_panels
from notice.present.charts import safe_stem
from notice.present.effects import bootstrap_stability, corruption_comparison, head_heatmaps, module_heatmaps
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    out = Path(snakemake.output.figures)
    out.mkdir(parents=True, exist_ok=True)
    settings, model = snakemake.params.analysis, snakemake.wildcards.model
    k = settings["k_sigma"]
    module = pd.read_parquet(snakemake.input.module_effects)
    universal = pd.read_csv(snakemake.input.universal)
    accuracy = pd.concat([pd.read_csv(path) for path in snakemake.input.accuracy], ignore_index=True)
    scores = pd.read_csv(snakemake.input.head_functions)
    written = [
        *module_heatmaps(module, out),
        *head_heatmaps(significant_heads(pd.read_parquet(snakemake.input.head_effects), k), universal, out, k),
        *corruption_comparison(module, out),
        *bootstrap_stability(universal, out),
        *accuracy_chart(accuracy, out, model),
    ]
    for dataset, attention_dir in zip(snakemake.params.datasets, snakemake.input.attention):
        records = load_records(attention_dir)[: settings["overlay_samples"]]
        if not records:
            log.info("%s: no attention records, no overlay figure", attention_dir)
            continue
        site = records[0]["site"]
        panels = overlay_panels(
            universal[(universal["model"] == model) & (universal["site"] == site)],
            scores[(scores["site"] == site) & (scores["dataset"] == dataset)],
            settings["overlay_heads"],
        )
        written += attention_overlays(
            records,
            panels,
            out / safe_stem("attention", model, dataset),
            f"{model} · {dataset}: where the fusion-attention heads look",
            "Universal heads and the best object detector vs the average head; cyan: the object's mask.",
        )
    log.info("%d figure files written:\n%s", len(written), "\n".join(map(str, written)))
