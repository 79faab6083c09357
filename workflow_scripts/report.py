"""The workflow's own report (rule `report`): one self-contained HTML file over every model, and the
paper's Tables 1-3."""

from pathlib import Path

import pandas as pd

from notice.method.precision import read_audits
from notice.present.report import CircuitResults, FlowResults, ScreenResults, workflow_report
from notice.workflow.runtime import logged


def read_all(paths) -> pd.DataFrame:
    return pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)


with logged(snakemake.log[0]) as log:
    inputs = snakemake.input
    screen = None
    if inputs.screen_validation:  # the attribution screen ran (config screen.enabled)
        screen = ScreenResults(
            read_all(inputs.screen_validation),
            read_all(inputs.screen_misses),
            read_all(inputs.screen_object_fraction),
            dict(zip(snakemake.params.models, map(Path, inputs.screen_figures))),
            read_audits(inputs.screen_precision) if inputs.screen_precision else None,
        )
    flow = None
    if inputs.flow_figures:  # the flow stage ran (config flow.enabled)
        flow = FlowResults(
            read_all(inputs.flow_ablation),
            read_all(inputs.flow_skipped),
            dict(zip(snakemake.params.models, map(Path, inputs.flow_figures))),
        )
    circuits = None
    if inputs.circuit_figures:  # the circuits ran (config circuits.enabled)
        circuits = CircuitResults(
            read_all(inputs.circuit_summary),
            read_all(inputs.circuit_validation),
            read_all(inputs.circuit_skipped),
            read_all(inputs.circuit_overlap),
            read_all(inputs.circuit_shared_heads),
            dict(zip(snakemake.params.models, map(Path, inputs.circuit_figures))),
        )
    path = workflow_report(
        read_all(inputs.universal),
        read_all(inputs.significant),
        read_all(inputs.accuracy),
        read_all(inputs.head_functions),
        read_all(inputs.grounding),
        dict(zip(snakemake.params.models, map(Path, inputs.figures))),
        snakemake.params.analysis,
        snakemake.output.report,
        Path(snakemake.output.table1[0]).parent,
        screen,
        read_audits(inputs.precision) if inputs.precision else None,  # none: every model is full precision
        flow,
        circuits,
    )
    log.info("report written to %s", path)
