"""The precision audit of one half-precision patching table: a seeded sample of its rows patched again by the
reference engine on the model in float32 (rule `precision_audit`)."""

import torch

from notice.files.tables import PAIR_COLUMNS, RESULT_COLUMNS, read_table, write_csv, write_table
from notice.method.precision import AUDIT_ROW_COLUMNS, audit_sample, audit_summary_lines, summarise_audit
from notice.method.precision_audit import audit_rows
from notice.workflow.runtime import load_float32_model, load_image, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    section, model_path = snakemake.params.model, snakemake.params.model_path
    adapter, where = load_float32_model(model_path, section, snakemake.params.audit["device"])
    log.info("the float32 reference runs on %s", where)
    results = read_table(snakemake.input.results, RESULT_COLUMNS)
    pairs = read_table(snakemake.input.pairs, PAIR_COLUMNS)
    sample = audit_sample(results, int(snakemake.params.audit["rows"]), int(snakemake.params.seed))
    with torch.inference_mode():
        audited = audit_rows(adapter, pairs, sample, load_image, snakemake.params.corruption)
    summary = summarise_audit(audited, results, section["dtype"], where)
    log.info("%d of %d patched runs audited:\n%s", len(audited), len(results), "\n".join(audit_summary_lines(summary)))
    write_csv(summary, snakemake.output.audit)
    write_table(audited, snakemake.output.rows, AUDIT_ROW_COLUMNS)
