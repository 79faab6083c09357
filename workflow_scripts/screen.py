"""Attribution screen of one corruption manifest (rule `screen`)."""

from notice.files.sharding import take_shard
from notice.files.tables import PAIR_COLUMNS, PROMPT_COLUMNS, RESULT_COLUMNS, read_table, write_table
from notice.method.screen import TABLE_COLUMNS, save_maps, screen_pairs
from notice.patching.engines import get_engine
from notice.workflow.runtime import load_image, load_model, logged, set_threads

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    adapter = load_model(snakemake.params.model_path, snakemake.params.model)
    selected = read_table(snakemake.input.selected, PROMPT_COLUMNS)
    pairs = take_shard(read_table(snakemake.input.pairs, PAIR_COLUMNS), 0, 1, universe=selected["sample_id"])
    masks = dict(zip(selected["sample_id"].astype(str), selected["mask_path"].fillna("").astype(str)))
    # No inference mode here: the screen backpropagates through the model.
    screen, confirmed, maps = screen_pairs(
        adapter,
        pairs,
        load_image,
        engine=get_engine(snakemake.params.patching["engine"], snakemake.params.patching["batch_size"]),
        settings=snakemake.params.screen,
        corruption_settings=snakemake.params.corruption,
        labels={"model": snakemake.wildcards.model, "dataset": snakemake.wildcards.dataset},
        masks=masks,
    )
    log.info(
        "%d estimates over %d pairs; %d sites confirmed exactly; %d image maps",
        len(screen),
        len(pairs),
        len(confirmed),
        len(maps),
    )
    if len(maps) < len(pairs):
        log.info("no image maps for %d pairs: the screen's sites do not reach the image tokens", len(pairs) - len(maps))
    write_table(screen, snakemake.output.screen, TABLE_COLUMNS)
    write_table(confirmed, snakemake.output.confirmed, RESULT_COLUMNS)
    save_maps(maps, snakemake.output.maps)
