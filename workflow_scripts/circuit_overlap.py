"""The circuits of one model compared (rule `circuit_overlap`): their overlap, the heads in every circuit next to
the universal heads, and the figures (faithfulness curves, each smallest faithful circuit, the overlap heat map)."""

from pathlib import Path

import pandas as pd

from notice.files.tables import read_table, write_csv
from notice.method.circuits import EDGE_COLUMNS, FAITHFULNESS_COLUMNS, circuit_overlap, shared_heads_table
from notice.present.charts import safe_stem
from notice.present.circuits import circuit_graph_figure, circuit_name, faithfulness_figure, overlap_figure
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    inputs, model = snakemake.input, snakemake.wildcards.model
    out = Path(snakemake.output.figures)
    out.mkdir(parents=True, exist_ok=True)
    circuits = {
        circuit_name(dataset, corruption): read_table(path, EDGE_COLUMNS)
        for (dataset, corruption), path in zip(snakemake.params.conditions, inputs.edges)
    }
    written = []
    for name, edges in circuits.items():
        if not edges["in_circuit"].astype(bool).any():
            log.info("%s: no circuit (no pair could be used, see its skipped.csv), no graph", name)
            continue
        title = f"{model} · {name}: smallest circuit with faithfulness ≥ {snakemake.params.target} (EAP-IG)"
        written += circuit_graph_figure(edges, out / safe_stem("circuitgraph", model, *name.split("/")), title)
    curves = pd.concat([read_table(path, FAITHFULNESS_COLUMNS) for path in inputs.faithfulness], ignore_index=True)
    if ((curves["level"] == "edges") & (curves["n"] >= 1)).any():
        title = f"{model}: faithfulness of the top-n edge circuits"
        written += faithfulness_figure(curves, snakemake.params.target, out / safe_stem("circuitcurve", model), title)
    overlap = circuit_overlap(model, circuits)
    if len(overlap):
        title = f"{model}: overlap of the smallest faithful circuits (edges)"
        written += overlap_figure(overlap, out / safe_stem("circuitoverlap", model), title)
    shared = shared_heads_table(model, circuits, pd.read_csv(inputs.universal))
    log.info("%d heads in every circuit, %d of them universal heads", len(shared), int(shared["universal"].sum()))
    write_csv(overlap, snakemake.output.overlap)
    write_csv(shared, snakemake.output.shared_heads)
    log.info("%d figure files written:\n%s", len(written), "\n".join(map(str, written)))
