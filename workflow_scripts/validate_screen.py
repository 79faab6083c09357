"""The attribution screen of one model against exact patching, and its image maps (rule `validate_screen`)."""

from pathlib import Path

import pandas as pd

from notice.files.tables import RESULT_COLUMNS, read_table, write_csv
from notice.method.screen import (
    TABLE_COLUMNS,
    has_image_effect,
    load_maps,
    object_fraction_table,
    paired_effects,
    validation_tables,
)
from notice.present.charts import safe_stem
from notice.present.screen import screen_image_maps, screen_scatter
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    inputs, settings, model = snakemake.input, snakemake.params.screen, snakemake.wildcards.model
    screen = pd.concat([read_table(path, TABLE_COLUMNS) for path in inputs.screens], ignore_index=True)
    exact = pd.concat([read_table(path, RESULT_COLUMNS) for path in inputs.exact], ignore_index=True)
    confirmed = pd.concat([read_table(path, RESULT_COLUMNS) for path in inputs.confirmed], ignore_index=True)
    paired = paired_effects(screen, [exact, confirmed])
    validation, misses = validation_tables(paired, int(settings["top_k"]), snakemake.params.dtype)
    log.info(
        "%d of %d screened sites have an exact effect (%d confirmed by the screen)",
        len(paired),
        len(screen),
        len(confirmed),
    )
    write_csv(validation, snakemake.output.validation)
    write_csv(misses, snakemake.output.misses)
    out_dir = Path(snakemake.output.figures)
    out_dir.mkdir(parents=True, exist_ok=True)
    fractions = []
    for (dataset, corruption), maps_dir in zip(snakemake.params.conditions, inputs.maps):
        condition = paired[(paired["dataset"] == dataset) & (paired["corruption"] == corruption)]
        if len(condition):
            screen_scatter(
                condition,
                out_dir / safe_stem("screenscatter", dataset, corruption),
                f"{model}, {dataset}, {corruption}: screen estimate vs exact patching",
            )
        records = load_maps(maps_dir)
        labels = {"model": model, "dataset": dataset, "corruption": corruption}
        fractions.append(object_fraction_table(records, labels))
        drawn = [record for record in records if has_image_effect(record)]
        if len(drawn) < len(records):
            log.info(
                "%s %s: %d pairs without an image-token effect, not drawn",
                dataset,
                corruption,
                len(records) - len(drawn),
            )
        for task in sorted({record["task"] for record in drawn}):
            screen_image_maps(
                [record for record in drawn if record["task"] == task],
                out_dir / safe_stem("screenmap", dataset, corruption, task),
                f"{model}, {dataset}, {corruption}, {task}: where in the image the screen's effects fall",
                int(settings["map_samples"]),
            )
    write_csv(pd.concat(fractions, ignore_index=True), snakemake.output.object_fraction)
