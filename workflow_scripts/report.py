"""The workflow's own report: one self-contained HTML file over every model (rule `report`)."""

from pathlib import Path

import pandas as pd

from notice.report import Section, Table, build_report, figure_sections, summarise_findings
from notice.runtime import logged

with logged(snakemake.log[0]) as log:
    models = list(snakemake.params.models)
    universal = pd.concat([pd.read_csv(path) for path in snakemake.input.universal], ignore_index=True)
    accuracy = pd.concat([pd.read_csv(path) for path in snakemake.input.accuracy], ignore_index=True)
    k = snakemake.params.analysis.get("k_sigma", 2.0)
    sections = [
        Section("Summary", html=summarise_findings(universal, accuracy, models, k)),
        Section("Accuracy", tables=[Table(accuracy, "Exact-match accuracy on the clean prompts (paper Table 2).")]),
        Section("Universal heads", tables=[Table(universal, "Universal heads with bootstrap stability (paper Tables 1 and 3).")]),
    ]
    for model, figure_dir in zip(models, snakemake.input.figures):
        sections += figure_sections(model, Path(figure_dir))
    path = build_report(sections, snakemake.output[0])
    log.info("report written to %s", path)
