"""SD-inpainted SIP corrupt images for a model's selected samples (rule `inpaint_sip`)."""

from notice.data.inpainting import InpaintSettings, MaskSpec, inpaint_samples, load_inpaint_pipeline
from notice.files.tables import (
    EXCLUSION_COLUMNS,
    IMAGE_POOL_COLUMNS,
    PROMPT_COLUMNS,
    SAMPLE_COLUMNS,
    read_table,
    write_table,
)
from notice.workflow.runtime import logged, resolve_device, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    options = snakemake.params.settings
    selected = read_table(snakemake.input.selected, PROMPT_COLUMNS)
    samples = read_table(snakemake.input.samples, SAMPLE_COLUMNS + ("corrupt_triplet",))
    # The selected samples with the dataset's columns (pool_key, image_id, triplets) and their distractor.
    merged = selected[["sample_id", "distractor"]].merge(samples, on="sample_id", how="left", validate="one_to_one")
    mask = options["mask"]
    pipe = load_inpaint_pipeline(options["model"], resolve_device(options["device"]), options["dtype"])
    pool, exclusions = inpaint_samples(
        pipe,
        merged,
        snakemake.params.out_dir,
        MaskSpec(mask["source"], mask.get("dir", ""), tuple(mask["box"])),  # dir: only for source dir
        InpaintSettings(
            steps=options["steps"],
            guidance=options["guidance"],
            size=options["size"],
            prompt_template=options["prompt_template"],
        ),
        snakemake.params.seed,
    )
    log.info("%d selected samples: %d corrupt images, %d excluded", len(selected), len(pool), len(exclusions))
    write_table(pool, snakemake.output.pool, IMAGE_POOL_COLUMNS)
    write_table(exclusions, snakemake.output.exclusions, EXCLUSION_COLUMNS)
