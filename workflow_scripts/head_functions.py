"""Head-function scores of every fusion head from the attention records of one model (rule `head_functions`)."""

from notice.method.attention import load_records
from notice.method.head_functions import HeadFunctionConfig, grounding_summary, scores_from_records
from notice.present.page import Table
from notice.present.report import write_tables
from notice.workflow.runtime import logged

KEYS = ("model", "site", "dataset")

with logged(snakemake.log[0]) as log:
    config = HeadFunctionConfig.from_dict(snakemake.params.thresholds)
    model = snakemake.wildcards.model
    groups = {}
    for dataset, attention_dir in zip(snakemake.params.datasets, snakemake.input.attention):
        records = load_records(attention_dir)
        if records:
            groups[(model, records[0]["site"], dataset)] = records
    if not groups:
        log.warning(
            "%s: no attention records (no correctly answered sample): empty head-function tables",
            ", ".join(snakemake.input.attention),
        )
    scores = scores_from_records(groups, KEYS, config)
    grounding = grounding_summary(scores, KEYS)
    log.info("%d score rows; grounding:\n%s", len(scores), grounding.to_string(index=False))
    grounding.to_csv(snakemake.output.grounding, index=False)
    # the Markdown keeps to what a reader looks at; every head and query is in the CSV
    write_tables(
        scores,
        [
            Table(
                grounding,
                "Best object detector per model, site and dataset (detection score: multiple of uniform "
                "attention on the object's patches).",
            ),
            Table(
                scores[scores["is_head_position"]],
                "Scores at the head-patching position (the adapter's: the answer token "
                "or the last prompt token); all queries: head_functions.csv.",
            ),
        ],
        snakemake.output.scores,
        snakemake.output.markdown,
    )
