"""The flow stage's figures and summaries of one model (rule `flow_figures`): knockout curves, logit-lens shares
and maps per dataset, ablation bars over every dataset; the ablation and skipped summaries for the report."""

from pathlib import Path

import pandas as pd

from notice.files.tables import read_table, write_csv
from notice.flow.ablation import ABLATION_COLUMNS
from notice.flow.knockout import KNOCKOUT_COLUMNS
from notice.flow.logit_lens import LOGIT_LENS_COLUMNS
from notice.flow.records import LABEL_COLUMNS, SKIPPED_COLUMNS
from notice.present.charts import safe_stem
from notice.present.flow import (
    ablation_figure,
    ablation_summary,
    knockout_figure,
    lens_map_figure,
    lens_share_figure,
    skipped_summary,
)
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    inputs, model = snakemake.input, snakemake.wildcards.model
    out = Path(snakemake.output.figures)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset, knockout_path, lens_path in zip(snakemake.params.datasets, inputs.knockout, inputs.logit_lens):
        knockout = read_table(knockout_path, [*LABEL_COLUMNS, *KNOCKOUT_COLUMNS])
        lens = read_table(lens_path, [*LABEL_COLUMNS, *LOGIT_LENS_COLUMNS])
        if knockout.empty:
            log.info("%s: no knockout rows (every edge skipped, see skipped.parquet), no knockout figure", dataset)
        else:
            title = f"{model} · {dataset}: attention knockout, relative change of p(answer)"
            written += knockout_figure(knockout, out / safe_stem("knockout", model, dataset), title)
        if lens.empty:
            log.info("%s: no logit-lens rows (see skipped.parquet), no logit-lens figures", dataset)
        else:
            title = f"{model} · {dataset}: logit lens on image tokens"
            written += lens_share_figure(lens, out / safe_stem("lens", model, dataset), title)
            title = f"{model} · {dataset}: logit lens over the image grid"
            written += lens_map_figure(lens, out / safe_stem("lensmap", model, dataset), title)
    ablation = pd.concat(
        [read_table(path, [*LABEL_COLUMNS, *ABLATION_COLUMNS]) for path in inputs.ablation], ignore_index=True
    )
    summary = ablation_summary(ablation)
    if summary.empty:
        log.info("no ablation rows (no sample has an object mask covering an image patch), no ablation figure")
    else:
        title = f"{model}: object-token ablation against random image tokens"
        written += ablation_figure(summary, out / safe_stem("flowablation", model), title)
    skipped = pd.concat([read_table(path, SKIPPED_COLUMNS) for path in inputs.skipped], ignore_index=True)
    write_csv(summary, snakemake.output.ablation)
    write_csv(skipped_summary(skipped), snakemake.output.skipped)
    log.info("%d figure files written:\n%s", len(written), "\n".join(map(str, written)))
