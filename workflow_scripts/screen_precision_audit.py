"""The precision audit of one half-precision screen table: the screen of the pairs the patching audit
recomputed, again on the model in float32 (rule `screen_precision_audit`)."""

from notice.files.tables import PAIR_COLUMNS, read_table, write_csv
from notice.method.precision import AUDIT_ROW_COLUMNS, summarise_audit
from notice.method.precision_audit import audit_screen
from notice.method.screen import TABLE_COLUMNS
from notice.workflow.runtime import load_float32_model, load_image, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    section, model_path = snakemake.params.model, snakemake.params.model_path
    adapter, where = load_float32_model(model_path, section, snakemake.params.audit["device"])
    log.info("the float32 screen runs on %s", where)
    screen = read_table(snakemake.input.screen, TABLE_COLUMNS)
    audited = read_table(snakemake.input.rows, AUDIT_ROW_COLUMNS)
    pairs = read_table(snakemake.input.pairs, PAIR_COLUMNS)
    # No inference mode here: the screen backpropagates through the model.
    rows = audit_screen(
        adapter, pairs, screen, audited, load_image, snakemake.params.screen, snakemake.params.corruption
    )
    summary = summarise_audit(rows, screen, section["dtype"], where, value="estimate")
    log.info("%d of %d screen estimates audited:\n%s", len(rows), len(screen), summary.to_string(index=False))
    write_csv(summary, snakemake.output.audit)
